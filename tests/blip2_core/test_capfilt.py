"""CapFilt model side on tiny random models: batching, seeding, ranking, filtering, sidecars, faults."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from blip2_core import capfilt as cf

sys.path.insert(0, str(Path(__file__).parent))
import capfilt_fixtures as fx  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("capfilt-models")
    fx.save_captioner(root / "captioner")
    fx.save_ranker(root / "ranker")
    return root


def make_cfg(model_dir: Path, **overrides) -> cf.CapFiltConfig:
    ranker = cf.RankerConfig(
        model="capfilt-tiny-clip",
        weights=str(model_dir / "ranker" / "capfilt-tiny-clip.safetensors"),
        model_config=str(model_dir / "ranker" / "capfilt-tiny-clip.json"),
    )
    return cf.CapFiltConfig(
        captioner=str(model_dir / "captioner"), ranker=ranker, **{"batch_size": 3, **overrides}
    )


@pytest.fixture(scope="module")
def models(model_dir: Path) -> cf.CapFiltModels:
    return cf.load_capfilt_models(make_cfg(model_dir))


def colour_samples(n: int) -> list[tuple[str, bytes, str]]:
    colours = [fx.COLOURS[i % len(fx.COLOURS)] for i in range(n)]
    return [
        (f"{i:06d}", fx.jpeg_bytes(fx.solid_image(c)), f"a {c} square on a table")
        for i, c in enumerate(colours)
    ]


# ------------------------------------------------------------------------------------- captioner batching


def test_every_image_gets_num_captions_candidates_and_one_score_each(model_dir, models):
    cfg = make_cfg(model_dir)
    records = list(cf.run_capfilt(colour_samples(5), cfg, models))
    assert [r.key for r in records] == [f"{i:06d}" for i in range(5)]
    for r in records:
        assert r.error is None
        assert len(r.candidates) == cfg.num_captions
        assert len(r.scores) == cfg.num_captions + 1
        assert 1 <= len(r.top) <= cfg.keep_top
        assert all(-1.0 <= s <= 1.0 for s in r.scores if not math.isnan(s))


def test_images_are_encoded_once_per_batch_by_both_models(model_dir, models):
    cfg = make_cfg(model_dir)
    seen = {"captioner": [], "ranker": []}
    hooks = [
        models.captioner.model.vision_model.register_forward_hook(
            lambda m, args, kwargs, out: seen["captioner"].append(kwargs["pixel_values"].shape[0]),
            with_kwargs=True,
        ),
        models.ranker.model.visual.register_forward_hook(
            lambda m, args, out: seen["ranker"].append(args[0].shape[0])
        ),
    ]
    try:
        list(cf.run_capfilt(colour_samples(7), cfg, models))
    finally:
        for hook in hooks:
            hook.remove()
    # 7 images in batches of 3: three vision passes of 3, 3, 1 images, never 10x as many.
    assert seen["captioner"] == [3, 3, 1]
    assert seen["ranker"] == [3, 3, 1]


def test_decoding_loop_matches_transformers_generate_when_the_nucleus_is_one_token(model_dir, models):
    """With top-p near 0 sampling is greedy, so our cached loop (shared ViT output, repetition penalty,
    minimum length, prompt handling) must produce exactly what BLIP's own `generate` does greedily."""
    cfg = make_cfg(model_dir, top_p=1e-9, min_length=12, max_length=20)
    captioner = cf.Captioner(models.captioner.model, models.captioner.processor, cfg)
    images = [fx.solid_image(c) for c in fx.COLOURS]
    ours = captioner.caption(images, seed=0)

    prompt = captioner.processor.tokenizer([cfg.prompt] * len(images), return_tensors="pt").input_ids
    tokens = captioner.model.generate(
        pixel_values=captioner.pixel_values(images),
        input_ids=prompt,
        do_sample=False,
        repetition_penalty=cfg.repetition_penalty,
        min_length=cfg.min_length,
        max_length=cfg.max_length,
    )
    decode = captioner.processor.tokenizer.batch_decode
    n_prompt = captioner.prompt_ids.shape[1]
    assert decode(tokens[:, :n_prompt], skip_special_tokens=True) == [cfg.prompt.strip()] * len(images)
    theirs = [t.strip() for t in decode(tokens[:, n_prompt:], skip_special_tokens=True)]
    assert [[t] * cfg.num_captions for t in theirs] == ours


def nucleus_reference(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' own top-p filter, renormalised: the distribution nucleus sampling must follow."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = TopPLogitsWarper(top_p=top_p)(None, probs.log())
    return logits.softmax(dim=-1)


@pytest.mark.parametrize("top_p", [0.9, 0.5])
def test_nucleus_sample_follows_the_top_p_distribution(top_p):
    generator = torch.Generator().manual_seed(0)
    probs = (torch.randn(1, 40, generator=generator) * 1.5).softmax(dim=-1)  # (1, V)
    expected = nucleus_reference(probs, top_p)[0]
    torch.manual_seed(0)
    draws = cf.nucleus_sample(probs.expand(40_000, -1), top_p)
    observed = torch.bincount(draws, minlength=probs.shape[1]).float() / draws.numel()
    assert set(draws.tolist()) == set(expected.nonzero()[:, 0].tolist())
    assert (observed - expected).abs().max() < 0.01


def test_a_rerun_reproduces_and_another_seed_differs(model_dir, models):
    samples = colour_samples(4)
    first = list(cf.run_capfilt(samples, make_cfg(model_dir), models))
    torch.manual_seed(99)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    again = list(cf.run_capfilt(samples, make_cfg(model_dir), models))
    # The caller's RNG stream is untouched by CapFilt's seeding.
    assert torch.equal(torch.rand(3), expected_next)
    other = list(cf.run_capfilt(samples, make_cfg(model_dir, seed=1), models))
    assert first == again
    assert [r.candidates for r in other] != [r.candidates for r in first]


def test_an_image_gets_the_same_captions_in_any_batch_and_order(model_dir, models):
    """Each sample draws from a stream named by (seed, key, sample): re-sharded, re-batched or re-ordered
    (img2dataset writes samples as their downloads finish), an image keeps its captions."""
    samples = colour_samples(7)
    by_key = {r.key: r for r in cf.run_capfilt(samples, make_cfg(model_dir), models)}  # batches of 3
    shuffled = [samples[i] for i in (5, 0, 6, 3, 1, 4, 2)]
    for cfg in (make_cfg(model_dir, batch_size=2), make_cfg(model_dir, batch_size=7)):
        again = {r.key: r for r in cf.run_capfilt(shuffled, cfg, models)}
        assert again.keys() == by_key.keys()
        for key, record in again.items():
            assert (record.candidates, record.top) == (by_key[key].candidates, by_key[key].top)
            # The ranker's matrix products may round differently in another batch shape: by about 1e-8,
            # which is more than rel=1e-5 of a score near 0 (seen: -0.00105911 against -0.00105912).
            assert record.scores == pytest.approx(by_key[key].scores, rel=1e-5, abs=1e-6, nan_ok=True)
    # Not one stream for all: the samples of one image differ, and a key of its own changes them.
    assert len(set(by_key["000000"].candidates)) > 1
    renamed = [("other", image, caption) for _, image, caption in samples[:1]]
    assert (
        next(cf.run_capfilt(renamed, make_cfg(model_dir), models)).candidates != by_key["000000"].candidates
    )


def test_sample_streams_are_uniform_and_named_not_placed():
    streams = cf.SampleStreams([f"0\n{i}" for i in range(50_000)])
    rows = torch.arange(50_000)
    u = streams.uniform(rows, 7, 0)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert counts.min() > 4_700 and counts.max() < 5_300
    for other in (streams.uniform(rows, 8, 0), streams.uniform(rows, 7, 1)):  # another step, a redraw
        assert abs(torch.corrcoef(torch.stack([u, other]))[0, 1].item()) < 0.02
    # A row's draws follow its name, not its place among the rows.
    reordered = cf.SampleStreams(["0\n7", "0\n3"])
    assert reordered.uniform(torch.tensor([1, 0]), 7, 0).tolist() == u[[3, 7]].tolist()
    assert cf._mul32(torch.tensor([2**32 - 1, 123_456_789]), 0x846CA68B).tolist() == [
        (2**32 - 1) * 0x846CA68B % 2**32,
        123_456_789 * 0x846CA68B % 2**32,
    ]


def test_threads_captioning_at_once_get_the_captions_of_a_run_alone(model_dir, models):
    """The flow runs shard tasks in threads: a batch's captions must not depend on what runs beside it."""
    import threading

    batches = [colour_samples(6)[:3], colour_samples(6)[3:]]
    alone = [list(cf.run_capfilt(b, make_cfg(model_dir), models)) for b in batches]
    together: list = [None, None]
    start = threading.Barrier(2)

    def work(i: int) -> None:
        start.wait()
        together[i] = [list(cf.run_capfilt(batches[i], make_cfg(model_dir), models)) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert all(run == alone[i] for run in together[i])


# ------------------------------------------------------------------------------------------ ranking


class ColourClip(torch.nn.Module):
    """A rigged CLIP: an image embeds as its mean RGB; a text as its count of 'red', 'green', 'blue'.

    So an image's best caption names its colour alone, then its colour mixed with another, then the rest.
    """

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))  # (B, 3)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.float() + 1e-3  # (T, 3); the epsilon gives colourless texts a direction


def colour_tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[cf._words(t).count(c) for c in fx.COLOURS] for t in texts])  # (T, 3)


def to_tensor(image) -> torch.Tensor:
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)  # (H*W, 3)
    return pixels.T.reshape(3, image.height, image.width) / 255


class ScriptedCaptioner:
    """Returns fixed candidates per image, keyed by the image's colour."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script

    def caption(self, images, seed, keys=None):
        return [self.script[colour_of(image)] for image in images]


def colour_of(image) -> str:
    r, g, b = image.resize((1, 1)).getpixel((0, 0))
    return fx.COLOURS[max(range(3), key=lambda i: (r, g, b)[i])]


def rigged_models(script: dict[str, list[str]], texts_seen: list[str] | None = None) -> cf.CapFiltModels:
    def tokenizer(texts: list[str]) -> torch.Tensor:
        if texts_seen is not None:
            texts_seen.extend(texts)
        return colour_tokenize(texts)

    ranker = cf.Ranker(ColourClip(), to_tensor, tokenizer, "cpu", torch.float32)
    return cf.CapFiltModels(captioner=ScriptedCaptioner(script), ranker=ranker)


def candidates_for(colour: str) -> list[str]:
    other = next(c for c in fx.COLOURS if c != colour)
    return [
        "two people near a table",  # no colour
        f"a {other} ball on the floor",  # wrong colour
        f"a {colour} and {other} striped flag",  # half right
        f"a {colour} square on a wall",  # right
        f"A {colour.upper()} square, on a wall!",  # the same caption again, differently written
        f"a {colour} box in a room",  # right, ties with the earlier right one
        "a picture of",
        "",
        "square",
        "dog dog dog dog cat",
    ]


def test_ranker_puts_the_caption_naming_the_image_colour_first(model_dir):
    script = {c: candidates_for(c) for c in fx.COLOURS}
    cfg = make_cfg(model_dir)
    samples = []
    for colour in fx.COLOURS:
        other = next(c for c in fx.COLOURS if c != colour)
        samples.append(
            (colour, fx.jpeg_bytes(fx.solid_image(colour)), f"a {colour} {colour} and {other} thing")
        )
    records = {r.key: r for r in cf.run_capfilt(samples, cfg, rigged_models(script))}
    assert set(records) == set(fx.COLOURS)
    for colour, r in records.items():
        candidates = candidates_for(colour)
        # Equal scores go to the earlier candidate; the re-written duplicate is kept once.
        assert r.top == (candidates[3], candidates[5])
        assert r.scores[3] == pytest.approx(r.scores[4]) == pytest.approx(r.scores[5])
        assert r.top_scores[0] > r.scores[2] > r.scores[0] > r.scores[1]
        # The web caption names the image's colour twice and another once: after the three right
        # captions, before the half-right one.
        assert r.scores[3] > r.scores[-1] > r.scores[2]
        assert r.web_caption_rank == 4


def test_degenerate_candidates_are_dropped_before_ranking(model_dir):
    seen: list[str] = []
    script = {c: candidates_for(c) for c in fx.COLOURS}
    cfg = make_cfg(model_dir)
    samples = [("k", fx.jpeg_bytes(fx.solid_image("green")), "   ")]
    (record,) = cf.run_capfilt(samples, cfg, rigged_models(script, seen))
    dropped = ["a picture of", "", "square", "dog dog dog dog cat"]
    assert [math.isnan(s) for s in record.scores] == [c in dropped for c in record.candidates] + [True]
    assert not set(dropped) & set(seen)
    assert not set(dropped) & set(record.top)
    assert record.web_caption_rank is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("  ,. ", "empty"),
        ("a picture of", "prompt echo"),
        ("A picture of.", "prompt echo"),
        ("dog", "too short"),
        ("the the the dog", "repetition"),
        ("a dog on a mat", None),
        ("a picture of a dog", None),
    ],
)
def test_degenerate_reason(text, reason):
    assert cf.degenerate_reason(text, "a picture of ") == reason


# -------------------------------------------------------------------------------------- shards + faults


def write_test_shard(path: Path, n: int, bad: dict[int, bytes | None] | None = None) -> Path:
    samples = colour_samples(n)
    for i, image in (bad or {}).items():
        samples[i] = (samples[i][0], image, samples[i][2])
    return fx.write_shard(path, samples)


def test_corrupt_or_missing_images_are_recorded_not_fatal(model_dir, models, tmp_path):
    good = fx.jpeg_bytes(fx.solid_image("red"))
    shard = write_test_shard(
        tmp_path / "00000.tar", 6, bad={1: b"not an image", 3: good[: len(good) // 3], 4: None}
    )
    result = cf.capfilt_shard(shard, tmp_path / "00000.parquet", make_cfg(model_dir), models)
    records = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    errors = {r["key"]: r["error"] for r in records}
    assert [r["key"] for r in records] == [f"{i:06d}" for i in range(6)]
    assert {k for k, e in errors.items() if e is not None} == {"000001", "000003", "000004"}
    assert "missing image" in errors["000004"]
    assert (result.n_ok, result.n_failed) == (3, 3)
    assert set(cf.read_sidecar(tmp_path / "00000.parquet")) == {"000000", "000002", "000005"}


def test_sidecar_has_the_documented_schema_and_reads_back(model_dir, models, tmp_path):
    shard = write_test_shard(tmp_path / "00001.tar", 4)
    out = tmp_path / "capfilt" / "00001.parquet"
    result = cf.capfilt_shard(shard, out, make_cfg(model_dir), models)
    table = pq.read_table(out)
    assert table.schema.names == list(cf.SIDECAR_COLUMNS)
    assert table.schema.field("candidates").type == pa.list_(pa.string())
    assert table.schema.field("scores").type == pa.list_(pa.float32())
    rows = table.to_pylist()
    assert all(len(r["candidates"]) == 10 and len(r["scores"]) == 11 for r in rows)
    assert all(r["top1_score"] >= r["top2_score"] for r in rows)
    assert cf.read_sidecar(out) == {r["key"]: (r["top1"], r["top2"]) for r in rows}
    kept = [r["web_caption"] in (r["top1"], r["top2"]) for r in rows]
    assert result.n_ok == 4 and result.web_kept_share == pytest.approx(sum(kept) / 4)
    assert os.listdir(out.parent) == [out.name]


def test_read_sidecar_names_missing_columns(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": ["a"], "top1": ["x"]}), path)
    with pytest.raises(ValueError, match=r"bad\.parquet.*'top2', 'error'"):
        cf.read_sidecar(path)


def test_unreadable_shards_raise_shard_read_error_and_write_nothing(model_dir, models, tmp_path):
    garbage = tmp_path / "garbage.tar"
    cut_in_data = write_test_shard(tmp_path / "cut_in_data.tar", 6)
    cut_in_data.write_bytes(cut_in_data.read_bytes()[: cut_in_data.stat().st_size // 2 + 100])
    # Cut exactly at a member's header: tarfile alone would read this as a shorter, valid shard.
    cut_at_header = write_test_shard(tmp_path / "cut_at_header.tar", 6)
    with tarfile.open(cut_at_header) as tar:
        fourth_header = tar.getmembers()[3].offset
    cut_at_header.write_bytes(cut_at_header.read_bytes()[:fourth_header])
    garbage.write_bytes(b"\x00\x01 this is not a tar " * 50)
    out_dir = tmp_path / "out"
    for shard in (garbage, cut_in_data, cut_at_header, tmp_path / "absent.tar"):
        with pytest.raises(cf.ShardReadError, match=shard.name):
            cf.capfilt_shard(shard, out_dir / f"{shard.stem}.parquet", make_cfg(model_dir), models)
    assert not out_dir.exists() or os.listdir(out_dir) == []


def test_an_exception_mid_run_or_mid_write_leaves_no_file(model_dir, models, tmp_path, monkeypatch):
    shard = write_test_shard(tmp_path / "00002.tar", 6)
    out = tmp_path / "out" / "00002.parquet"

    def stop(n_done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cf.capfilt_shard(shard, out, make_cfg(model_dir), models, progress=stop)
    assert not out.parent.exists() or os.listdir(out.parent) == []

    def half_write(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", half_write)
    with pytest.raises(OSError, match="disk full"):
        cf.capfilt_shard(shard, out, make_cfg(model_dir), models)
    assert os.listdir(out.parent) == []


def test_a_run_killed_mid_shard_leaves_no_sidecar(model_dir, tmp_path):
    shard = write_test_shard(tmp_path / "00003.tar", 6)
    out = tmp_path / "out" / "00003.parquet"
    script = textwrap.dedent(
        """
        import json, sys, time
        import torch
        from blip2_core import capfilt as cf
        torch.set_num_threads(1)
        spec = json.loads(sys.argv[1])
        ranker = cf.RankerConfig(**spec["ranker"])
        cfg = cf.CapFiltConfig(captioner=spec["captioner"], ranker=ranker, batch_size=2)
        def report(n_done):
            print(n_done, flush=True)
            time.sleep(60)  # keep the shard unfinished until the parent kills us
        cf.capfilt_shard(spec["shard"], spec["out"], cfg, cf.load_capfilt_models(cfg), progress=report)
        """
    )
    cfg = make_cfg(model_dir)
    spec = {
        "captioner": cfg.captioner,
        "ranker": dataclasses.asdict(cfg.ranker),
        "shard": str(shard),
        "out": str(out),
    }
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(spec)], stdout=subprocess.PIPE, stderr=err, env=env
        )
    try:
        line = proc.stdout.readline().strip()
        assert line == b"2", stderr.read_text()[-2000:]  # one batch done, four samples to go
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    assert not out.exists()
    assert not out.parent.exists() or not [p for p in os.listdir(out.parent) if p.startswith(out.stem)]


# ------------------------------------------------------------------------------------------------ config


def test_config_hash_is_stable_and_changes_with_every_field(model_dir, tmp_path):
    base = make_cfg(model_dir)
    other_captioner = fx.save_captioner(tmp_path / "captioner", seed=1)
    other_config, other_weights = fx.save_ranker(tmp_path / "ranker", seed=1)
    changes = {
        "captioner": str(other_captioner),
        "ranker": dataclasses.replace(base.ranker, weights=str(other_weights)),
        "num_captions": 5,
        "top_p": 0.8,
        "top_k": 50,
        "repetition_penalty": 1.0,
        "min_length": 5,
        "max_length": 20,
        "prompt": "a photo of ",
        "keep_top": 1,
        "batch_size": 8,
        "device": "cuda",
        "dtype": "float16",
        "seed": 7,
    }
    assert set(changes) == {f.name for f in dataclasses.fields(cf.CapFiltConfig)}
    h = cf.config_hash(base)
    assert h == cf.config_hash(make_cfg(model_dir)) and len(h) == 16
    hashes = {
        name: cf.config_hash(dataclasses.replace(base, **{name: value})) for name, value in changes.items()
    }
    assert h not in hashes.values()
    assert len(set(hashes.values())) == len(changes)
    # A different custom ranker config (same stem, other content) changes it too.
    other_config.write_text(other_config.read_text().replace('"layers": 2', '"layers": 3', 1))
    ranker = dataclasses.replace(base.ranker, model_config=str(other_config))
    assert cf.config_hash(dataclasses.replace(base, ranker=ranker)) != h


def test_config_hash_follows_content_not_location(model_dir, tmp_path):
    base = make_cfg(model_dir)
    copy = shutil.copytree(base.captioner, tmp_path / "elsewhere" / Path(base.captioner).name)
    assert cf.config_hash(dataclasses.replace(base, captioner=str(copy))) == cf.config_hash(base)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert cf.config_hash(dataclasses.replace(base, captioner=str(copy))) != cf.config_hash(base)


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_captions", 0), ("top_p", 1.5), ("min_length", 40), ("keep_top", 12), ("dtype", "int8")],
)
def test_config_rejects_invalid_values_naming_the_field(model_dir, field, value):
    with pytest.raises(ValueError, match=f"CapFiltConfig.{field}"):
        make_cfg(model_dir, **{field: value})


def test_loading_refuses_paths_that_are_not_local_models(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        cf.load_capfilt_models(dataclasses.replace(make_cfg(model_dir), captioner=str(tmp_path)))
    ranker = cf.RankerConfig(model="ViT-L-14", weights="openai")
    with pytest.raises(FileNotFoundError, match="'openai' does not exist"):
        cf._load_ranker(dataclasses.replace(make_cfg(model_dir), ranker=ranker))
