"""The pretraining loader: sidecar join, caption fallback, augmentation, rank/worker splits, source
mixing, bad samples, and exact resumption, on small shards written here."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from blip2_core import data as D
from blip2_core.train import DataSource

torch.set_num_threads(1)

TINY = D.AugmentConfig(image_size=16)


# ----------------------------------------------------------------------------- fixtures


def jpeg(seed: int, size: int = 24) -> bytes:
    """A noisy image unique to `seed`, so crops, flips and samples are told apart."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def web_caption(key: str) -> str:
    return f"web caption of {key}"


def write_shard(
    path: Path, keys: Iterable[str], bad_image: set[str] = frozenset(), no_caption: set[str] = frozenset()
) -> Path:
    """An img2dataset-layout tar (<key>.jpg/.txt/.json) plus its _stats.json."""
    keys = list(keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key in keys:
            caption = None if key in no_caption else web_caption(key)
            image = b"\xff\xd8 not a jpeg" if key in bad_image else jpeg(int(key))
            meta = {"key": key, "url": f"http://x/{key}.jpg", "caption": caption, "status": "success"}
            members = [(f"{key}.jpg", image), (f"{key}.json", json.dumps(meta).encode())]
            if caption is not None:
                members.append((f"{key}.txt", caption.encode()))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (path.parent / f"{path.stem}_stats.json").write_text(json.dumps({"successes": len(keys)}))
    return path


def top_captions(key: str) -> tuple[str, str]:
    return f"top1 of {key}", f"top2 of {key}"


def write_sidecar(path: Path, keys: Iterable[str], errors: set[str] = frozenset()) -> Path:
    """A CapFilt sidecar with the columns of DESIGN.md; rows in `errors` failed."""
    rows = []
    for key in keys:
        top1, top2 = top_captions(key)
        failed = key in errors
        rows.append(
            {
                "key": key,
                "web_caption": web_caption(key),
                "candidates": [] if failed else [top1, top2, "a third"],
                "scores": [] if failed else [0.3, 0.2, 0.1],
                "top1": None if failed else top1,
                "top2": None if failed else top2,
                "top1_score": None if failed else 0.3,
                "top2_score": None if failed else 0.2,
                "web_caption_rank": None if failed else 3,
                "error": "decode failed" if failed else None,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def keys_of(shard: int, n: int) -> list[str]:
    return [f"{100_000_000 + shard * 1000 + i:09d}" for i in range(n)]


def make_source(
    root: Path, name: str, shards: int, per_shard: int, sidecars: bool = False, **kw
) -> D.SourceSpec:
    paths = [write_shard(root / name / f"{s:05d}.tar", keys_of(s, per_shard)) for s in range(shards)]
    sidecar_dir = None
    if sidecars:
        sidecar_dir = root / "capfilt" / "hash" / name
        for s, path in enumerate(paths):
            write_sidecar(sidecar_dir / f"{path.stem}.parquet", keys_of(s, per_shard))
    return D.SourceSpec(name, paths, sidecar_dir, **kw)


def loader(sources, batch_size=4, augment=TINY, **cfg) -> D.ShardData:
    cfg.setdefault("shuffle_buffer", 8)
    return D.ShardData(
        sources, D.LoaderConfig(batch_size=batch_size, **cfg), augment, D.Collate(with_keys=True)
    )


def epoch_samples(data: D.ShardData) -> list[tuple[str, str, str]]:
    """(source, key, caption) of one epoch, in order."""
    return [s for batch in data for s in zip(batch["sources"], batch["keys"], batch["text"], strict=True)]


# ----------------------------------------------------------------------------- captions


def test_sidecar_join_samples_top1_or_top2_seeded(tmp_path):
    source = make_source(tmp_path, "web", shards=2, per_shard=12, sidecars=True)
    data = loader([source], seed=3)
    choices: dict[str, set[str]] = {}
    epochs = [epoch_samples(data) for _ in range(4)]
    for epoch in epochs:
        assert sorted(k for _, k, _ in epoch) == sorted(keys_of(0, 12) + keys_of(1, 12))  # each once
        for _, key, caption in epoch:
            assert caption in top_captions(key)  # never the web caption: every row is usable
            choices.setdefault(key, set()).add(caption)
    both = sum(len(c) == 2 for c in choices.values())
    assert both >= 0.75 * len(choices)  # P(one caption in all 4 epochs) = 1/8 per key
    assert data.stats.caption_fallbacks == 0 and data.stats.samples == 4 * 24

    again = loader([source], seed=3)
    assert [epoch_samples(again) for _ in range(4)] == epochs  # the seed fixes every draw
    other = loader([source], seed=4)
    assert epoch_samples(other) != epochs[0]


def test_failed_or_absent_sidecar_rows_fall_back_to_web_caption(tmp_path):
    keys = keys_of(0, 16)
    shard = write_shard(tmp_path / "web" / "00000.tar", keys)
    failed, absent = set(keys[:3]), set(keys[3:5])
    write_sidecar(tmp_path / "capfilt" / "00000.parquet", [k for k in keys if k not in absent], errors=failed)
    data = loader([D.SourceSpec("web", [shard], tmp_path / "capfilt")])
    samples = epoch_samples(data)
    assert len(samples) == 16
    for _, key, caption in samples:
        expected = {web_caption(key)} if key in failed | absent else set(top_captions(key))
        assert caption in expected
    assert data.stats.caption_fallbacks == len(failed | absent)


def test_missing_sidecar_file_uses_web_captions_and_is_counted(tmp_path, caplog):
    source = make_source(tmp_path, "web", shards=2, per_shard=8, sidecars=True)
    (source.sidecar_dir / "00001.parquet").unlink()  # CapFilt has not reached shard 1 yet
    data = loader([source])
    with caplog.at_level(logging.WARNING, logger="blip2_core.data"):
        samples = epoch_samples(data)
    by_key = {key: caption for _, key, caption in samples}
    assert all(by_key[k] == web_caption(k) for k in keys_of(1, 8))
    assert all(by_key[k] in top_captions(k) for k in keys_of(0, 8))
    assert data.stats.missing_sidecar_files == 1 and data.stats.caption_fallbacks == 8
    assert "00001.parquet" in caplog.text


def test_without_capfilt_run_the_web_caption_is_used_and_not_counted_as_fallback(tmp_path):
    data = loader([make_source(tmp_path, "web", shards=1, per_shard=8)])
    samples = epoch_samples(data)
    assert [c for _, _, c in samples] == [web_caption(k) for _, k, _ in samples]
    assert data.stats.caption_fallbacks == 0


# ----------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("train", [True, False])
def test_transform_shapes_and_normalisation(size, train):
    image = Image.open(io.BytesIO(jpeg(1, size=48))).convert("RGB").resize((60, 40))
    tensor, flipped = D.ImageTransform(D.AugmentConfig(image_size=size, train=train))(image, random.Random(0))
    assert tensor.shape == (3, size, size) and tensor.dtype == torch.float32
    if not train:
        assert not flipped
    # CLIP normalisation maps [0, 1] pixels to about [-1.8, 2.2]
    assert tensor.min() >= (0 - max(D.CLIP_MEAN)) / min(D.CLIP_STD) - 1e-4
    assert tensor.max() <= (1 - min(D.CLIP_MEAN)) / min(D.CLIP_STD) + 1e-4


def test_augmentation_is_determined_by_the_seed_and_varies_between_draws():
    image = Image.open(io.BytesIO(jpeg(2, size=64))).convert("RGB")
    transform = D.ImageTransform(D.AugmentConfig(image_size=32))
    a, flip_a = transform(image, random.Random(7))
    b, flip_b = transform(image, random.Random(7))
    assert torch.equal(a, b) and flip_a == flip_b
    draws = [transform(image, random.Random(seed))[0] for seed in range(8)]
    assert len({d.sum().item() for d in draws}) > 1
    eval_transform = D.ImageTransform(D.AugmentConfig(image_size=32, train=False))
    assert torch.equal(eval_transform(image, random.Random(0))[0], eval_transform(image, random.Random(1))[0])


def test_crop_box_follows_the_scale_range():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = D.random_resized_crop_box(100, 80, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 80
        area = (right - left) * (bottom - top) / (100 * 80)
        assert 0.45 <= area <= 1.0  # rounding of w, h lets it dip just under 0.5


def test_flip_mirrors_the_image_and_can_swap_left_right_words():
    pixels = torch.zeros(32, 32, 3, dtype=torch.uint8)
    pixels[:, :16, 0] = 255  # red on the left half
    image = Image.fromarray(pixels.numpy())
    cfg = D.AugmentConfig(image_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    transform = D.ImageTransform(cfg)
    outputs = [transform(image, random.Random(seed)) for seed in range(10)]
    flipped = [t for t, f in outputs if f]
    kept = [t for t, f in outputs if not f]
    assert flipped and kept
    assert torch.allclose(flipped[0], kept[0].flip(-1), atol=1e-5)
    assert all(
        not f
        for _, f in (
            D.ImageTransform(D.AugmentConfig(hflip=False))(image, random.Random(s)) for s in range(10)
        )
    )

    assert D.swap_left_right("A cube left of the sphere, Right side; leftmost RIGHT") == (
        "A cube right of the sphere, Left side; rightmost LEFT"
    )
    assert D.swap_left_right("a bright light") == "a bright light"  # whole words only


def test_loader_swaps_positional_words_exactly_on_flipped_samples(tmp_path):
    keys = keys_of(0, 16)
    shard = write_shard(tmp_path / "pos" / "00000.tar", keys)
    captions = {k: (f"a cube left of {k}", f"a cube left of {k}") for k in keys}
    sidecar = tmp_path / "cf" / "00000.parquet"
    sidecar.parent.mkdir()
    pq.write_table(
        pa.Table.from_pylist(
            [{"key": k, "top1": a, "top2": b, "error": None} for k, (a, b) in captions.items()]
        ),
        sidecar,
    )
    source = D.SourceSpec("pos", [shard], sidecar.parent)
    plain = epoch_samples(loader([source], augment=D.AugmentConfig(image_size=16, hflip=True)))
    swapped = epoch_samples(loader([source], augment=D.AugmentConfig(image_size=16, swap_left_right=True)))
    assert [k for _, k, _ in plain] == [k for _, k, _ in swapped]
    assert all(c == captions[k][0] for _, k, c in plain)
    n_swapped = sum(c == f"a cube right of {k}" for _, k, c in swapped)
    assert 0 < n_swapped < 16 and all(c in (f"a cube right of {k}", captions[k][0]) for _, k, c in swapped)


# ----------------------------------------------------------------------------- splits


def test_assign_shards_splits_by_shard_or_by_sample():
    shards = [Path(f"{i:05d}.tar") for i in range(5)]
    parts = [D.assign_shards(shards, 0, 3, "s", rank, 2, 0, 1) for rank in range(2)]
    assert not set(parts[0].shards) & set(parts[1].shards)
    assert set(parts[0].shards) | set(parts[1].shards) == set(shards)
    assert all(p.sample_filters == () for p in parts)
    other_epoch = D.assign_shards(shards, 0, 4, "s", 0, 2, 0, 1)
    assert other_epoch.shards != parts[0].shards  # the order changes with the epoch
    few = D.assign_shards(shards[:1], 0, 0, "s", 1, 2, 1, 2)  # one shard, 2 ranks x 2 workers
    assert few.shards == (shards[0],) and few.sample_filters == ((2, 1), (2, 1))


@pytest.mark.parametrize("shards,per_shard", [(4, 12), (1, 48)])
def test_ranks_read_disjoint_samples_covering_the_epoch(tmp_path, shards, per_shard):
    source = make_source(tmp_path, "web", shards=shards, per_shard=per_shard)
    everything = {k for s in range(shards) for k in keys_of(s, per_shard)}
    for epoch in range(2):
        per_rank = []
        for rank in range(2):
            data = loader([source], rank=rank, world_size=2, seed=1)
            data.load_state_dict({"epoch": epoch, "index": 0})
            per_rank.append([k for _, k, _ in epoch_samples(data)])
        assert len(per_rank[0]) == len(per_rank[1]) == len(everything) // 2
        assert not set(per_rank[0]) & set(per_rank[1])
        assert set(per_rank[0]) | set(per_rank[1]) == everything


def test_two_workers_cover_the_epoch_once(tmp_path):
    source = make_source(tmp_path, "web", shards=4, per_shard=10)
    data = loader([source], num_workers=2)
    keys = [k for _, k, _ in epoch_samples(data)]
    assert sorted(keys) == sorted(k for s in range(4) for k in keys_of(s, 10))
    assert data.stats.samples == 40


def test_workers_started_from_a_thread_pool_exit_cleanly(tmp_path):
    """Prefect runs tasks in a thread pool; workers forked there used to exit with status 1, which
    torch's SIGCHLD handler reports as a crashed worker when it wins a race with the loader's shutdown."""
    source = make_source(tmp_path, "web", shards=2, per_shard=10)
    data = loader([source], num_workers=1)

    def read_two_batches_then_stop() -> list[int | None]:
        stream = data._loader()
        batches = iter(stream)
        next(batches), next(batches)
        workers = list(batches._workers)
        batches._shutdown_workers()
        return [w.exitcode for w in workers]

    with ThreadPoolExecutor(1) as pool:
        codes = pool.submit(read_two_batches_then_stop).result()
    assert codes == [0]


# ----------------------------------------------------------------------------- mixing and bad samples


def test_sources_mix_in_proportion_to_their_weights(tmp_path):
    big = make_source(tmp_path, "big", shards=2, per_shard=20, weight=3.0)
    small = make_source(tmp_path, "small", shards=1, per_shard=20, weight=1.0)
    data = loader([big, small], batch_size=8, samples_per_epoch=1200, seed=5)
    counts = Counter(source for source, _, _ in epoch_samples(data))
    total = sum(counts.values())
    assert total == 1200
    # Binomial(1200, 0.75): sd 0.0125; 0.04 is over 3 sd
    assert abs(counts["big"] / total - 0.75) < 0.04


def test_bad_samples_are_skipped_counted_and_logged_rate_limited(tmp_path, caplog):
    keys = keys_of(0, 20)
    shard = write_shard(
        tmp_path / "web" / "00000.tar", keys, bad_image={keys[2], keys[5]}, no_caption={keys[7]}
    )
    data = loader([D.SourceSpec("web", [shard])], samples_per_epoch=16, log_every_s=3600.0)
    with caplog.at_level(logging.WARNING, logger="blip2_core.data"):
        seen = {k for _, k, _ in epoch_samples(data)}
    assert not seen & {keys[2], keys[5], keys[7]}
    assert len(seen) == 16
    assert data.stats.bad_images == 2 and data.stats.missing_captions == 1
    lines = [r for r in caplog.records if "bad samples" in r.getMessage()]
    assert len(lines) == 1 and "skipped 1 bad samples so far" in lines[0].getMessage()


def test_a_broken_source_raises_instead_of_spinning(tmp_path):
    keys = keys_of(0, 6)
    shard = write_shard(tmp_path / "web" / "00000.tar", keys, bad_image=set(keys))
    data = loader([D.SourceSpec("web", [shard])], batch_size=2, samples_per_epoch=6, max_bad_streak=20)
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        next(iter(data))


# ----------------------------------------------------------------------------- resumption


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a["keys"] == b["keys"] and a["text"] == b["text"]
        assert torch.equal(a["images"], b["images"])


def take(data: D.ShardData, n: int) -> list[dict]:
    """n batches across epoch boundaries, as train._endless reads them."""
    out: list[dict] = []
    while len(out) < n:
        for batch in data:
            out.append(batch)
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_uninterrupted_batches(tmp_path, num_workers):
    sources = [
        make_source(tmp_path, "cap", shards=3, per_shard=10, sidecars=True, weight=2.0),
        make_source(tmp_path, "web", shards=2, per_shard=10, weight=1.0),
    ]
    make = lambda: loader(sources, num_workers=num_workers, seed=11, samples_per_epoch=40)  # 10 batches
    reference = take(make(), 25)
    for k in (7, 10, 13):  # mid-epoch, exactly at an epoch's end, in the next epoch
        first = make()
        take(first, k)
        state = first.state_dict()
        assert state["epoch"] == (k - 1) // 10 and state["index"] == k - 10 * state["epoch"]
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
        assert_same_batches(take(resumed, 25 - k), reference[k:])


def test_state_refuses_another_split(tmp_path):
    source = make_source(tmp_path, "web", shards=2, per_shard=8)
    state = loader([source], world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        loader([source]).load_state_dict(state)


def test_is_a_train_datasource_and_collate_tokenizes(tmp_path):
    source = make_source(tmp_path, "web", shards=1, per_shard=8)

    def tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(c.split()) for c in captions])
        ids = torch.arange(6).expand(len(captions), 6)
        return {"text_ids": ids, "text_mask": (ids < lengths[:, None]).long()}

    collate = D.Collate(text_key=None, tokenize=tokenize)
    data = D.ShardData([source], D.LoaderConfig(batch_size=4), D.AugmentConfig(image_size=64), collate)
    assert isinstance(data, DataSource) and data.world_size == 1 and data.batches_per_epoch == 2
    batch = next(iter(data))
    assert set(batch) == {"images", "text_ids", "text_mask"}
    assert batch["images"].shape == (4, 3, 64, 64)
    words = len(web_caption(keys_of(0, 1)[0]).split())
    assert batch["text_mask"].sum(1).tolist() == [words] * 4


class ToyModel(torch.nn.Module):
    """Regresses caption length from mean colour; remembers the keys it trained on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(3, 1)
        self.seen: list[str] = []

    def forward(self, batch: dict):
        from types import SimpleNamespace

        self.seen += batch["keys"]
        target = torch.tensor([len(t) / 10 for t in batch["text"]])
        pred = self.head(batch["images"].mean(dim=(2, 3))).squeeze(1)  # (B,)
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(pred, target))


def test_train_resumes_through_a_checkpoint_onto_the_uninterrupted_run(tmp_path):
    from blip2_core.train import TrainConfig, train

    source = make_source(tmp_path, "web", shards=2, per_shard=12, sidecars=True)
    make = lambda: loader([source], seed=2)  # 6 batches per epoch: 8 steps cross an epoch boundary
    # min_lr = lr: a flat schedule, so a 5-step run is the first 5 steps of the 8-step one
    cfg = lambda run, steps: TrainConfig(
        out_dir=str(tmp_path / run), steps=steps, lr=1e-2, min_lr=1e-2, warmup_steps=0,
        log_every=1, ckpt_every=1, device="cpu",
    )  # fmt: skip
    whole = ToyModel()
    train(whole, make(), cfg("whole", 8))
    first = ToyModel()
    train(first, make(), cfg("split", 5))
    second = ToyModel()  # a fresh process would start here: new model, new loader
    result = train(second, make(), cfg("split", 8))
    assert result.resumed_from is not None
    assert first.seen + second.seen == whole.seen
    assert torch.equal(second.head.weight, whole.head.weight)
