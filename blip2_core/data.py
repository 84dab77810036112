"""Pretraining data: WebDataset shards joined with CapFilt sidecars, augmented, split by rank and worker.

`ShardData(sources, LoaderConfig, AugmentConfig, Collate)` is a `train.DataSource`: iterating it yields
one epoch of batches, `state_dict()` is the position reached (counting batches already handed out) and
`load_state_dict()` resumes at exactly the next batch.

Per logical worker, one epoch is this pipeline (all randomness seeded, nothing from global RNGs):

  per source: epoch shard order (seed, epoch, source) -> this rank's and this worker's part
      -> tar samples (webdataset) -> sidecar row by key -> shuffle buffer (per pass)
  -> weighted mixing of the sources -> decode + caption choice + augmentation (bad samples skipped)
  -> batches -> DataLoader

Choices, each documented where it is made:
- Captions. With a CapFilt run (`SourceSpec.sidecar_dir`), each sample takes top1 or top2 with
  probability 1/2 (the paper: "each training step samples one of the two"). A sample whose sidecar row
  failed (non-null `error`), is absent, or whose sidecar file is missing falls back to its web caption
  and is counted (`LoaderStats.caption_fallbacks`, `missing_sidecar_files`): a CapFilt failure costs
  caption quality, not the image. Without a CapFilt run the web caption is used.
- Epoch length is a fixed number of batches per rank (`batches_per_epoch`), the same on every rank so
  that DDP ranks never wait on one another. A worker whose share of a source runs out before the epoch
  ends starts another pass over it (reshuffled), as webdataset's `with_epoch` would; a source covered
  exactly once per epoch is the common case (the default epoch = all samples once).
- Splitting. Each epoch the shards of a source are permuted (same order on every rank); rank r takes
  every world_size-th shard when there are at least world_size shards, so ranks read disjoint shards.
  With fewer shards every rank reads them all and keeps every world_size-th sample (costs world_size
  times the reading, fine for small sources). DataLoader workers split a rank's part the same way.
- Per-sample randomness (caption choice, crop, flip) comes from a generator seeded by
  (seed, epoch, pass, source, key), so it does not depend on which worker decodes the sample, and a
  resumed run skips samples without drawing their augmentation.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import random
import re
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from blip2_core.capfilt import read_sidecar

log = logging.getLogger(__name__)

# OpenAI CLIP's pixel statistics, shared by EVA/CLIP ViT towers (LAVIS blip_processors).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class SourceSpec:
    """One corpus: its shards, the CapFilt sidecar folder of the run to use (None: web captions) and
    its mixing weight (relative; weights need not sum to 1)."""

    name: str
    shards: Sequence[Path]
    sidecar_dir: Path | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", tuple(Path(s) for s in self.shards))
        if self.sidecar_dir is not None:
            object.__setattr__(self, "sidecar_dir", Path(self.sidecar_dir))
        if not self.shards:
            raise ValueError(f"SourceSpec {self.name!r}: no shards")
        if not self.weight > 0:
            raise ValueError(f"SourceSpec {self.name!r}: weight must be > 0, got {self.weight}")

    def sidecar_path(self, shard: Path) -> Path | None:
        """<sidecar_dir>/<shard stem>.parquet; the flow passes var/capfilt/<config-hash>/<source>."""
        return None if self.sidecar_dir is None else self.sidecar_dir / f"{shard.stem}.parquet"


@dataclass(frozen=True)
class AugmentConfig:
    """Training: RandomResizedCrop(scale 0.5-1.0, bicubic) + horizontal flip + CLIP normalisation
    (SPEC.md). Evaluation (train=False): resize the shorter side + center crop.

    The flip ignores captions, as BLIP does. Captions that name positions ("a cube left of a sphere",
    the synthetic corpus) become wrong on a flipped image: turn `hflip` off or set `swap_left_right`,
    which swaps the words left/right (and leftmost/rightmost...) in the caption of each flipped sample.
    """

    image_size: int = 224  # 224 pretraining, 364 captioning/retrieval, 490 VQA, 64 tiny
    train: bool = True
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    swap_left_right: bool = False
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"AugmentConfig.image_size must be positive, got {self.image_size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"AugmentConfig.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")


@dataclass(frozen=True)
class LoaderConfig:
    """How one rank reads: batch size per rank, the seed every draw derives from, the split, and the
    epoch length. Resuming needs the same seed, split, worker count and epoch length (checked)."""

    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0  # DataLoader processes; 0 decodes in the main process
    # Raw (undecoded) samples held per source and worker: memory ~ buffer x mean sample bytes.
    shuffle_buffer: int = 1000
    samples_per_epoch: int | None = None  # all ranks together; None: every source's samples once
    pin_memory: bool | None = None  # None: when CUDA is available
    prefetch_factor: int = 2  # batches each worker keeps ready
    max_bad_streak: int = 1000  # this many bad samples in a row means the data is broken: raise
    log_every_s: float = 30.0  # at most one "skipped bad samples" line per worker per this interval

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"LoaderConfig.batch_size must be at least 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"LoaderConfig: rank {self.rank} is outside world_size {self.world_size}")
        if self.num_workers < 0:
            raise ValueError(f"LoaderConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(
                f"LoaderConfig.shuffle_buffer must be at least 1 (1 = no shuffle), got {self.shuffle_buffer}"
            )

    @property
    def logical_workers(self) -> int:
        """Streams per rank: num_workers=0 reads like one worker, so 0 and 1 give the same batches."""
        return max(1, self.num_workers)


# ----------------------------------------------------------------------------- samples and batches


@dataclass(frozen=True)
class Sample:
    image: torch.Tensor  # (3, S, S) normalised
    caption: str
    key: str
    source: str


@dataclass(frozen=True)
class Collate:
    """Samples -> the batch dict a model reads. Stage 1 wants token ids: pass `tokenize`, which maps
    the captions to extra tensors (e.g. {"text_ids": (B, T), "text_mask": (B, T)}); it runs in the
    DataLoader workers. Stage 2 reads raw captions: `Collate(text_key="captions")`."""

    image_key: str = "images"
    text_key: str | None = "text"  # None: leave the raw captions out (e.g. when tokenize covers them)
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]] | None = None
    with_keys: bool = False  # add "keys" and "sources" (lists of str) for tracing and tests

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        captions = [s.caption for s in samples]
        batch: dict[str, Any] = {self.image_key: torch.stack([s.image for s in samples])}  # (B, 3, S, S)
        if self.text_key is not None:
            batch[self.text_key] = captions
        if self.tokenize is not None:
            batch.update(self.tokenize(captions))
        if self.with_keys:
            batch["keys"] = [s.key for s in samples]
            batch["sources"] = [s.source for s in samples]
        return batch


@dataclass
class LoaderStats:
    """Running counts over the batches handed out by this process (all workers together)."""

    samples: int = 0
    bad_images: int = 0  # undecodable image or no image member: skipped
    missing_captions: int = 0  # no usable caption at all: skipped
    caption_fallbacks: int = 0  # CapFilt run given but no usable sidecar row: web caption used
    missing_sidecar_files: int = 0  # shards (per pass) whose sidecar file does not exist

    def add(self, other: dict[str, int]) -> None:
        for name, value in other.items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------- augmentation

_LEFT_RIGHT = re.compile(r"\b(left|right)(most|ward|wards)?\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """'left' <-> 'right' as whole words, keeping case. Also swaps 'right' meaning 'correct': rare in
    image captions, and a flipped image with such a caption is no worse than with no swap at all."""

    def swap(match: re.Match) -> str:
        word = match.group(1)
        other = {"left": "right", "right": "left"}[word.lower()]
        if word.isupper():
            other = other.upper()
        elif word[0].isupper():
            other = other.capitalize()
        return other + (match.group(2) or "")

    return _LEFT_RIGHT.sub(swap, text)


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params drawn from `rng`: (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    # Fallback (extreme aspect ratios): the central crop with the ratio clamped, as torchvision does.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The central square: resizing it to S equals 'resize the shorter side to S, center crop S'."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


class ImageTransform:
    """PIL image -> (3, S, S) normalised tensor; crop and resize are one PIL resize over a box."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        # (x / 255 - mean) / std folded into one multiply and one subtract, both in place
        self.scale = (1.0 / (255.0 * torch.tensor(cfg.std))).view(3, 1, 1)
        self.shift = (torch.tensor(cfg.mean) / torch.tensor(cfg.std)).view(3, 1, 1)

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, bool]:
        """Returns the tensor and whether it was flipped (the caller may swap left/right words)."""
        cfg = self.cfg
        if cfg.train:
            box = random_resized_crop_box(*image.size, cfg.scale, cfg.ratio, rng)
            flip = cfg.hflip and rng.random() < 0.5
        else:
            box, flip = center_crop_box(*image.size), False
        image = image.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC, box=box)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (S, S, 3)
        return pixels.permute(2, 0, 1).float().mul_(self.scale).sub_(self.shift), flip  # (3, S, S)


# ----------------------------------------------------------------------------- shard assignment


@dataclass(frozen=True)
class Assignment:
    """What one consumer (rank, worker) reads of a source in one epoch: these shards, in this order,
    keeping stream samples i with i % stride == offset for each (stride, offset) filter in turn."""

    shards: tuple[Path, ...]
    sample_filters: tuple[tuple[int, int], ...] = ()


def _split(shards: tuple[Path, ...], parts: int, part: int) -> Assignment:
    if parts == 1:
        return Assignment(shards)
    if len(shards) >= parts:
        return Assignment(shards[part::parts])
    return Assignment(shards, ((parts, part),))


def assign_shards(
    shards: Sequence[Path], seed: int, epoch: int, source: str, rank: int, world_size: int, worker: int,
    num_workers: int,
) -> Assignment:  # fmt: skip
    """The epoch's permutation of a source's shards (the same on every rank), split by rank then by
    worker: by shard when there are enough of them, else every n-th sample of the stream read."""
    order = list(shards)
    random.Random(f"shards:{seed}:{epoch}:{source}").shuffle(order)
    by_rank = _split(tuple(order), world_size, rank)
    by_worker = _split(by_rank.shards, num_workers, worker)
    return Assignment(by_worker.shards, by_rank.sample_filters + by_worker.sample_filters)


# ----------------------------------------------------------------------------- raw sample streams


@dataclass(frozen=True)
class _Raw:
    """A tar sample before decoding, with its sidecar captions looked up."""

    source: int
    pass_index: int
    key: str
    members: dict[str, Any]  # extension -> bytes, as webdataset groups them
    capfilt: tuple[str, str] | None  # (top1, top2); None: no CapFilt run, or no usable row
    capfilt_expected: bool  # a CapFilt run was given for this source


def _log_tar_error(exn: Exception) -> bool:
    log.warning("skipping unreadable tar data: %s", exn)
    return True  # keep going: one damaged member must not end the epoch


def _every_nth(items: Iterator, stride: int, offset: int) -> Iterator:
    return (item for i, item in enumerate(items) if i % stride == offset)


def _shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: each incoming item replaces a random buffered one, which is emitted."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = rng.randrange(buffer_size)
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class _SourceStream:
    """Endless raw samples of one source for one (rank, worker, epoch): pass 0 is the epoch's
    assignment, later passes reshuffle the same shards (only when the epoch outlasts the source)."""

    def __init__(
        self, spec: SourceSpec, index: int, assignment: Assignment, seed_tag: str, cfg: LoaderConfig
    ):
        self.spec, self.index, self.assignment = spec, index, assignment
        self.seed_tag, self.cfg = seed_tag, cfg
        self.counts = {"missing_sidecar_files": 0}

    def __iter__(self) -> Iterator[_Raw]:
        pass_index = 0
        while True:
            empty = True
            for raw in self._one_pass(pass_index):
                empty = False
                yield raw
            if empty:
                raise RuntimeError(
                    f"source {self.spec.name!r}: no samples for this rank/worker in "
                    f"{len(self.assignment.shards)} shards (filters {self.assignment.sample_filters})"
                )
            pass_index += 1

    def _one_pass(self, pass_index: int) -> Iterator[_Raw]:
        shards = list(self.assignment.shards)
        if pass_index > 0:
            random.Random(f"pass:{self.seed_tag}:{pass_index}").shuffle(shards)
        items: Iterator[_Raw] = (raw for shard in shards for raw in self._read_shard(shard, pass_index))
        for stride, offset in self.assignment.sample_filters:
            items = _every_nth(items, stride, offset)
        rng = random.Random(f"buffer:{self.seed_tag}:{pass_index}")
        return _shuffled(items, self.cfg.shuffle_buffer, rng)

    def _read_shard(self, shard: Path, pass_index: int) -> Iterator[_Raw]:
        captions = self._sidecar(shard)
        expected = self.spec.sidecar_dir is not None
        for sample in wds.tarfile_samples([{"url": str(shard)}], handler=_log_tar_error):
            key = sample["__key__"].rsplit("/", 1)[-1]
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            capfilt = captions.get(key) if captions else None
            yield _Raw(self.index, pass_index, key, members, capfilt, expected)

    def _sidecar(self, shard: Path) -> dict[str, tuple[str, str]] | None:
        path = self.spec.sidecar_path(shard)
        if path is None:
            return None
        if not path.exists():
            # Not fatal: CapFilt may still be running for this shard; its samples use web captions.
            log.warning("source %s: no CapFilt sidecar %s; using web captions", self.spec.name, path)
            self.counts["missing_sidecar_files"] += 1
            return None
        return read_sidecar(path)  # key -> (top1, top2); failed rows are absent


def _mixed(streams: Sequence[Iterator[_Raw]], weights: Sequence[float], rng: random.Random) -> Iterator[_Raw]:
    """Each step draws the source by weight (with replacement), so proportions hold in expectation."""
    if len(streams) == 1:
        yield from streams[0]
        return
    population, cum_weights = range(len(streams)), list(itertools.accumulate(weights))
    while True:
        yield next(streams[rng.choices(population, cum_weights=cum_weights)[0]])


# ----------------------------------------------------------------------------- decoding


class _RateLimitedLog:
    """At most one warning per `interval_s`, carrying the running count of skipped samples."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s, self.count, self.last = interval_s, 0, -math.inf

    def skipped(self, reason: str, key: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            log.warning("skipped %d bad samples so far (latest: %s, key %s)", self.count, reason, key)


def _web_caption(members: dict[str, Any]) -> str | None:
    """The .txt member, else the metadata's "caption"; None when neither is a non-empty string."""
    text = members.get("txt")
    if text is None and "json" in members:
        try:
            text = json.loads(members["json"]).get("caption")
        except (ValueError, AttributeError):
            text = None
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text.strip() if isinstance(text, str) and text.strip() else None


def _decode_image(members: dict[str, Any]) -> Image.Image | None:
    data = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")  # convert() loads all pixels: truncated files fail here
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        return None


class _SampleMaker:
    """Raw -> Sample, or None for a bad sample (counted and logged, rate-limited)."""

    def __init__(
        self, names: Sequence[str], augment: AugmentConfig, seed: int, epoch: int, cfg: LoaderConfig
    ):
        self.names, self.augment, self.seed, self.epoch, self.cfg = names, augment, seed, epoch, cfg
        self.transform = ImageTransform(augment)
        self.bad_log = _RateLimitedLog(cfg.log_every_s)
        self.counts = {"samples": 0, "bad_images": 0, "missing_captions": 0, "caption_fallbacks": 0}
        self.bad_streak = 0

    def accept(self, raw: _Raw) -> Image.Image | None:
        """The decoded image of a good sample (counted), or None for a bad one (counted, logged).
        A resumed run calls only this for the batches it replays, so good/bad is decided the same way."""
        image = _decode_image(raw.members)
        has_caption = raw.capfilt is not None or _web_caption(raw.members) is not None
        if image is None or not has_caption:
            return self._bad(raw, "undecodable image" if image is None else "no caption")
        self.bad_streak = 0
        self.counts["samples"] += 1
        if raw.capfilt is None and raw.capfilt_expected:
            self.counts["caption_fallbacks"] += 1
        return image

    def build(self, raw: _Raw, image: Image.Image) -> Sample:
        """Caption choice and augmentation, from the sample's own generator."""
        rng = random.Random(f"sample:{self.seed}:{self.epoch}:{raw.pass_index}:{raw.source}:{raw.key}")
        caption = _web_caption(raw.members) if raw.capfilt is None else raw.capfilt[rng.random() < 0.5]
        tensor, flipped = self.transform(image, rng)
        if flipped and self.augment.swap_left_right:
            caption = swap_left_right(caption)
        return Sample(tensor, caption, raw.key, self.names[raw.source])

    def _bad(self, raw: _Raw, reason: str) -> None:
        self.counts["bad_images" if reason == "undecodable image" else "missing_captions"] += 1
        self.bad_log.skipped(reason, f"{self.names[raw.source]}/{raw.key}")
        self.bad_streak += 1
        if self.bad_streak >= self.cfg.max_bad_streak:
            raise RuntimeError(
                f"{self.bad_streak} bad samples in a row (latest {self.names[raw.source]}/{raw.key}: "
                f"{reason}); the shards look broken"
            )


# ----------------------------------------------------------------------------- the dataset


def _worker_batches(total: int, workers: int, worker: int, below: int) -> int:
    """How many of the epoch's batch numbers 0..total-1 below `below` belong to `worker` (j % workers)."""
    return len(range(worker, min(below, total), workers))


class ShardDataset(IterableDataset):
    """One epoch of (batch, counts) from `start` on, for one rank. Batch j of the epoch comes from
    logical worker j % W. DataLoader worker slot k plays logical worker (k + start) % W, because the
    DataLoader asks slot 0 first: so a resumed epoch gets its batches in the uninterrupted order."""

    def __init__(
        self, sources: Sequence[SourceSpec], cfg: LoaderConfig, augment: AugmentConfig, collate: Collate,
        batches_per_epoch: int, epoch: int, start: int,
    ) -> None:  # fmt: skip
        super().__init__()
        self.sources, self.cfg, self.augment, self.collate = tuple(sources), cfg, augment, collate
        self.batches_per_epoch, self.epoch, self.start = batches_per_epoch, epoch, start

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, int]]]:
        info = get_worker_info()
        workers = self.cfg.logical_workers
        slot = 0 if info is None else info.id
        worker = (slot + self.start) % workers
        quota = _worker_batches(self.batches_per_epoch, workers, worker, self.batches_per_epoch)
        skip = _worker_batches(self.batches_per_epoch, workers, worker, self.start)
        return self._batches(worker, quota, skip)

    def _streams(self, worker: int) -> list[_SourceStream]:
        cfg = self.cfg
        streams = []
        for index, spec in enumerate(self.sources):
            assignment = assign_shards(
                spec.shards, cfg.seed, self.epoch, spec.name, cfg.rank, cfg.world_size, worker,
                cfg.logical_workers,
            )  # fmt: skip
            tag = f"{cfg.seed}:{self.epoch}:{spec.name}:{cfg.rank}:{worker}"
            streams.append(_SourceStream(spec, index, assignment, tag, cfg))
        return streams

    def _batches(self, worker: int, quota: int, skip: int) -> Iterator[tuple[dict[str, Any], dict[str, int]]]:
        cfg = self.cfg
        streams = self._streams(worker)
        mix_rng = random.Random(f"mix:{cfg.seed}:{self.epoch}:{cfg.rank}:{worker}")
        raws = _mixed([iter(s) for s in streams], [s.weight for s in self.sources], mix_rng)
        maker = _SampleMaker([s.name for s in self.sources], self.augment, cfg.seed, self.epoch, cfg)
        for _ in range(skip):  # a resumed epoch: replay the batches already handed out
            self._one_batch(raws, maker, build=False)
        self._take_counts(maker, streams)  # stats cover the batches handed out, not the replay
        for _ in range(quota - skip):
            yield self.collate(self._one_batch(raws, maker, build=True)), self._take_counts(maker, streams)

    def _one_batch(self, raws: Iterator[_Raw], maker: _SampleMaker, build: bool) -> list[Sample]:
        """The next batch_size good samples; with build=False only decided good/bad, not augmented."""
        samples: list[Sample] = []
        good = 0
        while good < self.cfg.batch_size:
            raw = next(raws)
            image = maker.accept(raw)
            if image is None:
                continue
            good += 1
            if build:
                samples.append(maker.build(raw, image))
        return samples

    @staticmethod
    def _take_counts(maker: _SampleMaker, streams: Sequence[_SourceStream]) -> dict[str, int]:
        counts = dict(maker.counts)
        counts["missing_sidecar_files"] = sum(s.counts["missing_sidecar_files"] for s in streams)
        for source in [maker.counts, *(s.counts for s in streams)]:
            for name in source:
                source[name] = 0
        return counts


# ----------------------------------------------------------------------------- epoch length


def shard_sample_count(shard: Path) -> int:
    """Samples in an img2dataset shard: `<shard>_stats.json` "successes", else the `<shard>.parquet`
    rows with status "success", else the image members of the tar (slowest: reads the whole file)."""
    shard = Path(shard)
    stats = shard.with_name(f"{shard.stem}_stats.json")
    if stats.exists():
        successes = json.loads(stats.read_text()).get("successes")
        if isinstance(successes, int):
            return successes
    parquet = shard.with_suffix(".parquet")
    if parquet.exists():
        import pyarrow.parquet as pq

        table = pq.read_table(parquet, columns=["status"])
        return sum(1 for status in table.column("status").to_pylist() if status == "success")
    with tarfile.open(shard) as tar:
        names = {
            m.name.rsplit(".", 1)[0]
            for m in tar.getmembers()
            if m.name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS
        }
    return len(names)


def batches_per_epoch(sources: Sequence[SourceSpec], cfg: LoaderConfig) -> int:
    """Batches each rank yields per epoch: samples_per_epoch // (batch_size * world_size)."""
    samples = cfg.samples_per_epoch
    if samples is None:
        samples = sum(shard_sample_count(shard) for spec in sources for shard in spec.shards)
    batches = samples // (cfg.batch_size * cfg.world_size)
    if batches < 1:
        raise ValueError(
            f"{samples} samples per epoch cannot fill one batch of {cfg.batch_size} on each of "
            f"{cfg.world_size} ranks"
        )
    return batches


# ----------------------------------------------------------------------------- the DataSource


@dataclass
class _Position:
    epoch: int = 0
    index: int = 0  # batches handed out in this epoch


class ShardData:
    """The training DataSource over WebDataset shards (see the module docstring).

    Resuming replays: the workers re-read the epoch up to the saved batch, decoding images to decide
    good/bad exactly as before but skipping augmentation, collation and the transfer to the main
    process. Cost: about the decode time of the batches skipped, parallel over workers, at most one
    epoch. A faster path (not done) would save each worker's raw-sample offset and shuffle-buffer keys
    with the batch, so a resume could seek in the tars without decoding.
    """

    def __init__(
        self,
        sources: Sequence[SourceSpec],
        cfg: LoaderConfig,
        augment: AugmentConfig | None = None,
        collate: Collate | None = None,
    ) -> None:
        if not sources:
            raise ValueError("ShardData: no sources")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"ShardData: source names must be unique, got {names}")
        self.sources, self.cfg = tuple(sources), cfg
        self.augment = augment or AugmentConfig()
        self.collate = collate or Collate()
        self.world_size, self.rank = cfg.world_size, cfg.rank  # train() checks world_size against torchrun
        self.batches_per_epoch = batches_per_epoch(self.sources, cfg)
        self.position = _Position()
        self.stats = LoaderStats()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.position.index >= self.batches_per_epoch:
            self.position = _Position(self.position.epoch + 1, 0)
        for batch, counts in self._loader():
            self.position.index += 1  # before the yield: the state counts the batch as handed out
            self.stats.add(counts)
            yield batch

    def _loader(self) -> DataLoader:
        cfg = self.cfg
        dataset = ShardDataset(
            self.sources, cfg, self.augment, self.collate, self.batches_per_epoch,
            self.position.epoch, self.position.index,
        )  # fmt: skip
        pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
        # Starting an iterator draws a base seed; from the global generator it would shift the model's
        # dropout masks after a resume (the global state is restored before the loader starts).
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.position.epoch)
        return DataLoader(
            dataset,
            batch_size=None,  # the dataset yields whole batches
            num_workers=cfg.num_workers,
            pin_memory=pin,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
            generator=generator,
        )

    def state_dict(self) -> dict:
        cfg = self.cfg
        return {
            "epoch": self.position.epoch,
            "index": self.position.index,
            "seed": cfg.seed,
            "rank": cfg.rank,
            "world_size": cfg.world_size,
            "workers": cfg.logical_workers,
            "batches_per_epoch": self.batches_per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        # A different seed, split or epoch length would silently replay other batches: refuse.
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "workers", "batches_per_epoch"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"ShardData.load_state_dict: saved {key}={state[key]}, this loader has {mine[key]}"
                )
        self.position = _Position(int(state["epoch"]), int(state["index"]))
