"""CapFilt, the model side: caption each web image 10 times, rank with CLIP, keep the top two.

The paper (BLIP-2, section 3.4, following BLIP): a BLIP-large captioner generates 10 captions per image by
nucleus sampling (top-p 0.9; repetition penalty 1.1, 10-30 tokens, prompt "a picture of " as in the BLIP
code); the 10 synthetic captions and the web caption are ranked by CLIP ViT-L/14 image-text similarity;
the top two are kept, and each training step samples one of them.

Throughput comes from batching across images: a batch of B images goes through the captioner's ViT once,
each image's embeddings are shared by its 10 samples, and one cached decoding loop samples all B*10
captions (with an O(V) nucleus sampler instead of a sort of the vocabulary per row and step); the ranker
encodes the B images once and all candidate texts of the batch in one text pass.

Per shard the result is a Parquet sidecar beside the image data (images are never rewritten), written
atomically so that a killed run leaves nothing a re-run would trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import math
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from blip2_core.fileio import UnsafeKeyError, atomic_path, check_sample_key

# Bump when a change to this file changes what a sidecar contains; it is part of `config_hash`.
CAPFILT_CODE_VERSION = "2"  # 2: each sample its own random stream

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RankerConfig:
    """An open_clip model: a registered name ("ViT-L-14") or a custom JSON config, plus a local weights file.

    `model_config`, when given, is an open_clip model-config JSON whose stem is the model name, as
    open_clip registers it.
    """

    model: str = "ViT-L-14"
    weights: str = ""
    model_config: str | None = None


@dataclass(frozen=True)
class CapFiltConfig:
    """Everything that decides a sidecar's contents. Defaults are the paper's.

    `captioner` is a local directory in save_pretrained format (e.g. a copy of
    "Salesforce/blip-image-captioning-large"); nothing is ever fetched from a hub.
    `min_length` / `max_length` count tokens including the prompt, as the BLIP code passes them to
    `generate`. `top_k` 0 is pure nucleus sampling, as the paper says (the BLIP code inherited
    transformers' default top-k 50 on top of top-p). `dtype` "auto" is float32 on CPU, bfloat16 on CUDA.
    """

    captioner: str
    ranker: RankerConfig
    num_captions: int = 10
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.1
    min_length: int = 10
    max_length: int = 30
    prompt: str = "a picture of "
    keep_top: int = 2
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "num_captions": self.num_captions >= 1,
            "top_p": 0.0 < self.top_p <= 1.0,
            "top_k": self.top_k >= 0,
            "repetition_penalty": self.repetition_penalty > 0.0,
            "min_length": 0 <= self.min_length <= self.max_length,
            "max_length": self.max_length >= 1,
            "keep_top": 1 <= self.keep_top <= self.num_captions + 1,
            "batch_size": self.batch_size >= 1,
            "dtype": self.dtype == "auto" or self.dtype in DTYPES,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"CapFiltConfig.{field}: invalid value {getattr(self, field)!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return DTYPES[self.dtype]


def config_hash(cfg: CapFiltConfig) -> str:
    """A short stable hash of everything that decides a sidecar: the cache key of a CapFilt run.

    Model paths enter by their last component (the model id) plus a fingerprint of the files' content,
    so the same weights copied elsewhere keep the hash while retrained weights change it.
    """
    fields = dataclasses.asdict(cfg)
    fields["captioner"] = Path(cfg.captioner).name
    fields["ranker"] = {
        "model": cfg.ranker.model,
        "weights": _file_fingerprint(Path(cfg.ranker.weights)) if cfg.ranker.weights else None,
        "model_config": _file_fingerprint(Path(cfg.ranker.model_config)) if cfg.ranker.model_config else None,
    }
    payload = {
        "code_version": CAPFILT_CODE_VERSION,
        "config": fields,
        "captioner_files": _dir_fingerprint(Path(cfg.captioner)),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


_SAMPLE_BYTES = 1 << 20


def _file_fingerprint(path: Path) -> str:
    """sha256 of size + content; files over 3 MiB are sampled at start, middle and end.

    Sampling keeps hashing a 2 GB checkpoint instant. The first MiB holds a safetensors header (names,
    shapes, offsets); the middle and end chunks change whenever the weights are retrained.
    """
    if not path.is_file():
        raise FileNotFoundError(f"CapFilt model file {path} does not exist")
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= 3 * _SAMPLE_BYTES:
            digest.update(fh.read())
        else:
            for offset in (0, size // 2, size - _SAMPLE_BYTES):
                fh.seek(offset)
                digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _dir_fingerprint(path: Path) -> dict[str, str]:
    if not path.is_dir():
        raise FileNotFoundError(f"CapFilt captioner directory {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return {p.name: _file_fingerprint(p) for p in files}


# ----------------------------------------------------------------------------------------------- models


class ClipLike(Protocol):
    """What the ranker needs of a CLIP model (open_clip's interface)."""

    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor) -> torch.Tensor: ...


class Captioner:
    """BLIP captioner: B images -> B x num_captions nucleus-sampled captions, prompt stripped."""

    def __init__(self, model: Any, processor: Any, cfg: CapFiltConfig) -> None:
        self.model = model  # BlipForConditionalGeneration, eval, on cfg.device
        self.processor = processor  # BlipProcessor
        self.cfg = cfg
        self.prompt_ids = self._prompt_ids()
        # transformers 5 calls the decoder's KV cache argument `cache`; 4.x `past_key_values`.
        forward_args = inspect.signature(model.text_decoder.forward).parameters
        self.cache_arg = "cache" if "cache" in forward_args else "past_key_values"

    def _prompt_ids(self) -> torch.Tensor:
        # As BlipForConditionalGeneration.generate: [CLS] prompt [SEP] -> [DEC] prompt, shape (1, P).
        ids = self.processor.tokenizer(self.cfg.prompt, return_tensors="pt").input_ids
        ids[:, 0] = self.model.config.text_config.bos_token_id
        return ids[:, :-1].to(self.cfg.device)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor.image_processor(list(images), return_tensors="pt").pixel_values
        return pixels.to(self.cfg.device, self.cfg.torch_dtype)  # (B, 3, H, W)

    @torch.inference_mode()
    def caption(
        self, images: Sequence[Image.Image], seed: int, keys: Sequence[str] | None = None
    ) -> list[list[str]]:
        """Returns B lists of num_captions captions. Sample j of an image draws its tokens from a random
        stream of its own, fixed by (seed, the image's key, j): an image gets the same captions whatever
        batch, shard order or thread it comes in. `keys` default to the images' positions in the call."""
        n = self.cfg.num_captions
        keys = [str(i) for i in range(len(images))] if keys is None else list(keys)
        if len(keys) != len(images):
            raise ValueError(f"Captioner.caption: {len(images)} images but {len(keys)} keys")
        image_embeds = self.model.vision_model(pixel_values=self.pixel_values(images))[0]  # (B, N, D)
        # Row b*n + j is sample j of image b: the ViT ran once per image, its output is shared.
        image_embeds = image_embeds.repeat_interleave(n, dim=0)  # (B*n, N, D)
        prompt = self.prompt_ids.expand(image_embeds.shape[0], -1)  # (B*n, P)
        streams = SampleStreams([f"{seed}\n{key}\n{j}" for key in keys for j in range(n)], self.cfg.device)
        tokens = self._sample(prompt, image_embeds, streams)  # (B*n, <= max_length)
        texts = self.processor.tokenizer.batch_decode(tokens[:, prompt.shape[1] :], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        return [texts[i * n : (i + 1) * n] for i in range(len(images))]

    def _sample(
        self, prompt: torch.Tensor, image_embeds: torch.Tensor, streams: SampleStreams
    ) -> torch.Tensor:
        """Decode all rows together with the KV cache, sampling each token from its top-p nucleus.

        Our own loop rather than `generate`, whose top-p sorts the whole vocabulary for every row and
        step (on CPU most of the captioning time at BLIP's 30524 tokens); `nucleus_sample` draws from
        the same distribution in O(V). Repetition penalty and minimum length follow transformers' rules.
        """
        text_config = self.model.config.text_config
        eos, pad = text_config.sep_token_id, text_config.pad_token_id
        tokens = prompt  # (R, T), grows by one column per step
        finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        cache, step_ids = None, prompt
        while tokens.shape[1] < self.cfg.max_length and not finished.all():
            logits, cache = self._decoder_step(step_ids, image_embeds, cache)  # (R, V)
            logits = self._process_logits(logits, tokens, eos)
            probs = logits.softmax(dim=-1)
            next_ids = nucleus_sample(probs, self.cfg.top_p, streams.at(tokens.shape[1]))  # (R,)
            next_ids = torch.where(finished, pad, next_ids)
            finished |= next_ids == eos
            step_ids = next_ids[:, None]
            tokens = torch.cat([tokens, step_ids], dim=1)
        return tokens

    def _decoder_step(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor, cache: Any
    ) -> tuple[Any, Any]:
        """New tokens (R, t) -> last-position logits (R, V) in float32 and the updated KV cache."""
        out = self.model.text_decoder(
            input_ids=input_ids,
            encoder_hidden_states=image_embeds,
            use_cache=True,
            return_dict=True,
            **{self.cache_arg: cache},
        )
        return out.logits[:, -1].float(), getattr(out, self.cache_arg)

    def _process_logits(self, logits: torch.Tensor, tokens: torch.Tensor, eos: int) -> torch.Tensor:
        """(R, V) logits -> penalised, length-constrained, top-k filtered logits; `tokens` (R, T) so far."""
        seen = logits.gather(1, tokens)
        penalty = self.cfg.repetition_penalty
        logits = logits.scatter(1, tokens, torch.where(seen < 0, seen * penalty, seen / penalty))
        if tokens.shape[1] < self.cfg.min_length:
            logits[:, eos] = -math.inf
        if self.cfg.top_k > 0:
            kth = logits.topk(min(self.cfg.top_k, logits.shape[1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        return logits


# uniform(rows, attempt) -> (len(rows),) draws in [0, 1) for those rows of `probs`, at that redraw
Uniforms = Callable[[torch.Tensor, int], torch.Tensor]


def nucleus_sample(probs: torch.Tensor, top_p: float, uniform: Uniforms | None = None) -> torch.Tensor:
    """One token per row of `probs` (R, V), drawn from the row's top-p nucleus; returns (R,).

    The nucleus (transformers' rule) holds the tokens whose strictly more probable tokens hold less than
    top_p of the mass; tokens of equal probability are kept or dropped together. Instead of sorting the
    vocabulary, draw from the whole distribution and redraw rows whose token falls outside the nucleus:
    an accepted draw is distributed exactly as the renormalised nucleus, and as the nucleus holds at
    least top_p of the mass a row needs 1 / top_p draws on average, each O(V). `uniform` supplies the
    draws (default: torch's global RNG).
    """
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    pending = torch.arange(probs.shape[0], device=probs.device)
    attempt = 0
    while pending.numel() > 0:
        p = probs[pending]  # (R', V)
        cdf = p.cumsum(dim=-1)
        if uniform is None:
            u = torch.rand(p.shape[0], 1, device=p.device, dtype=cdf.dtype)
        else:
            u = uniform(pending, attempt).to(cdf.dtype)[:, None]
        u = u * cdf[:, -1:]
        draw = torch.searchsorted(cdf, u, right=True).clamp_max(p.shape[1] - 1)  # (R', 1)
        mass_above = (p * (p > p.gather(1, draw))).sum(dim=-1)  # (R',)
        accepted = mass_above < top_p
        tokens[pending[accepted]] = draw[accepted, 0]
        pending = pending[~accepted]
        attempt += 1
    return tokens


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), in two 16-bit halves so that no product overflows."""
    return (((x >> 16) * c & 0xFFFF) << 16) + (x & 0xFFFF) * c & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 x in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class SampleStreams:
    """One counter-based random stream per sampled row, named by a string (CapFilt: seed, key, sample).

    A draw is a hash of (the row's name, the decoding step, the redraw), so a row's draws do not depend on
    which other rows share its batch or in what order, and no generator state is shared between threads.
    """

    def __init__(self, names: Sequence[str], device: str | torch.device = "cpu") -> None:
        words = [hashlib.sha256(name.encode()).digest() for name in names]
        halves = [[int.from_bytes(w[i : i + 4], "little") for i in (0, 4)] for w in words]
        self.keys = torch.tensor(halves, dtype=torch.int64, device=device).reshape(-1, 2)  # (R, 2)

    def at(self, step: int) -> Uniforms:
        """The draws of decoding step `step`, as `nucleus_sample` takes them."""
        return lambda rows, attempt: self.uniform(rows, step, attempt)

    def uniform(self, rows: torch.Tensor, step: int, attempt: int) -> torch.Tensor:
        """(len(rows),) float64 draws in [0, 1) of the given rows at (step, attempt)."""
        counter = torch.tensor((step * 65536 + attempt) & _MASK32, dtype=torch.int64, device=self.keys.device)
        k = self.keys[rows]
        h = _mix32(k[:, 0] ^ _mix32(k[:, 1] ^ _mix32(counter)))
        return h.double() / 2.0**32


class Ranker:
    """CLIP image-text cosine similarity, each image encoded once, all texts of a batch in one pass."""

    def __init__(
        self,
        model: ClipLike,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: str,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype

    @torch.inference_mode()
    def similarities(
        self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Cosine similarity of image b with each of texts[b]; returns floats shaped like `texts`."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        image_features = F.normalize(self.model.encode_image(pixels).float(), dim=-1)  # (B, E)
        unique = sorted({t for group in texts for t in group})  # a caption sampled twice is encoded once
        text_features = self._encode_texts(unique)  # (T, E)
        row = {text: i for i, text in enumerate(unique)}
        sims = []
        for b, group in enumerate(texts):
            rows = torch.tensor([row[t] for t in group], dtype=torch.long, device=text_features.device)
            sims.append((text_features[rows] @ image_features[b]).tolist())
        return sims

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, 1, device=self.device)
        tokens = self.tokenizer(texts).to(self.device)  # (T, context_length)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


@dataclass
class CapFiltModels:
    captioner: Captioner
    ranker: Ranker


def load_capfilt_models(cfg: CapFiltConfig) -> CapFiltModels:
    """Load both models from local files only, in eval mode, frozen, cast to cfg's dtype on cfg.device."""
    return CapFiltModels(captioner=_load_captioner(cfg), ranker=_load_ranker(cfg))


def _load_captioner(cfg: CapFiltConfig) -> Captioner:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    path = Path(cfg.captioner)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"CapFilt captioner: {path} is not a save_pretrained directory (no config.json); "
            "CapFilt loads the BLIP captioner from a local copy only"
        )
    model = BlipForConditionalGeneration.from_pretrained(path, dtype=cfg.torch_dtype, local_files_only=True)
    processor = BlipProcessor.from_pretrained(path, local_files_only=True)
    model = model.to(cfg.device).eval().requires_grad_(False)
    return Captioner(model, processor, cfg)


def _load_ranker(cfg: CapFiltConfig) -> Ranker:
    import open_clip  # only here: a ranker can also be any ClipLike model built elsewhere

    rc = cfg.ranker
    if rc.model_config is not None:
        if Path(rc.model_config).stem != rc.model:
            raise ValueError(
                f"CapFilt ranker: model {rc.model!r} must be the stem of its config file {rc.model_config}"
            )
        open_clip.add_model_config(rc.model_config)
    # open_clip treats a `pretrained` string that is not an existing file as a hub tag and downloads it.
    if not Path(rc.weights).is_file():
        raise FileNotFoundError(f"CapFilt ranker: weights file {rc.weights!r} does not exist")
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[cfg.torch_dtype]
    model, _, preprocess = open_clip.create_model_and_transforms(
        rc.model, pretrained=rc.weights, precision=precision, device=cfg.device, pretrained_text=False
    )
    model = model.eval().requires_grad_(False)
    return Ranker(model, preprocess, open_clip.get_tokenizer(rc.model), cfg.device, cfg.torch_dtype)


# ------------------------------------------------------------------------------------------- filtering


def _words(text: str) -> list[str]:
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).split()


def degenerate_reason(text: str, prompt: str) -> str | None:
    """Why a candidate caption is not worth ranking, or None if it is fine."""
    words = _words(text)
    if not words:
        return "empty"
    if words == _words(prompt):
        return "prompt echo"
    if len(words) < 2:
        return "too short"
    if Counter(words).most_common(1)[0][1] * 2 > len(words):
        return "repetition"
    return None


# ----------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CapFiltRecord:
    """One sample's CapFilt result.

    `candidates`: the num_captions generated captions. `scores`: num_captions + 1 CLIP similarities,
    web caption last, NaN where a candidate was dropped as degenerate. `top`: up to keep_top distinct
    captions, best first. `web_caption_rank`: 1-based rank of the web caption among the scored candidates,
    None if it was dropped. A sample that could not be read has `error` set and empty fields.
    """

    key: str
    web_caption: str
    candidates: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    top: tuple[str, ...] = ()
    top_scores: tuple[float, ...] = ()
    web_caption_rank: int | None = None
    error: str | None = None


def rank_candidates(
    key: str, web_caption: str, candidates: Sequence[str], scores: Sequence[float], keep_top: int
) -> CapFiltRecord:
    """Rank candidates + web caption by score; ties go to the earlier candidate, the web caption last.

    `scores` has one entry per candidate and the web caption last; NaN marks an unscored candidate.
    Candidates equal up to case and punctuation count once, at their best rank.
    """
    texts = [*candidates, web_caption]
    order = sorted((i for i, s in enumerate(scores) if not math.isnan(s)), key=lambda i: (-scores[i], i))
    web_index = len(texts) - 1
    web_rank = order.index(web_index) + 1 if web_index in order else None
    top, seen = [], set()
    for i in order:
        words = tuple(_words(texts[i]))
        if words not in seen:
            seen.add(words)
            top.append(i)
    top = top[:keep_top]
    return CapFiltRecord(
        key=key,
        web_caption=web_caption,
        candidates=tuple(candidates),
        scores=tuple(float(s) for s in scores),
        top=tuple(texts[i] for i in top),
        top_scores=tuple(float(scores[i]) for i in top),
        web_caption_rank=web_rank,
    )


# ----------------------------------------------------------------------------------------------- running

Sample = tuple[str, Image.Image | bytes | None, str]  # (key, image or its encoded bytes, web caption)


def decode_image(image: Image.Image | bytes | None) -> Image.Image:
    """An RGB PIL image, fully decoded so that truncated files fail here rather than in the model."""
    if image is None:
        raise ValueError("missing image")
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
        image.load()
    return image.convert("RGB")


def _decode_batch(batch: Sequence[Sample]) -> tuple[dict[int, Image.Image], dict[int, str]]:
    images, errors = {}, {}
    for i, (_, image, _) in enumerate(batch):
        try:
            images[i] = decode_image(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            errors[i] = f"image: {type(e).__name__}: {e}"
    return images, errors


def _capfilt_batch(batch: Sequence[Sample], cfg: CapFiltConfig, models: CapFiltModels) -> list[CapFiltRecord]:
    images, errors = _decode_batch(batch)
    ok = sorted(images)
    keys = [batch[i][0] for i in ok]
    captions = models.captioner.caption([images[i] for i in ok], cfg.seed, keys) if ok else []
    texts = [[*caps, batch[i][2]] for i, caps in zip(ok, captions, strict=True)]
    keep = [[t for t in group if degenerate_reason(t, cfg.prompt) is None] for group in texts]
    sims = models.ranker.similarities([images[i] for i in ok], keep) if ok else []
    records: dict[int, CapFiltRecord] = {}
    for i, group, kept, sim in zip(ok, texts, keep, sims, strict=True):
        scored = dict(zip(kept, sim, strict=True))
        scores = [scored.get(t, math.nan) for t in group]
        records[i] = rank_candidates(batch[i][0], batch[i][2], group[:-1], scores, cfg.keep_top)
    for i, error in errors.items():
        records[i] = CapFiltRecord(key=batch[i][0], web_caption=batch[i][2], error=error)
    return [records[i] for i in range(len(batch))]


def _batched(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_capfilt(
    samples: Iterable[Sample], cfg: CapFiltConfig, models: CapFiltModels
) -> Iterator[CapFiltRecord]:
    """CapFilt records in input order, one per sample; an unreadable image gives a record with `error`."""
    for batch in _batched(samples, cfg.batch_size):
        yield from _capfilt_batch(batch, cfg, models)


# ------------------------------------------------------------------------------------------------ shards


class ShardReadError(RuntimeError):
    """A shard tar that cannot be read (missing, not a tar, truncated)."""


_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset's rule: key = path up to the first dot


def read_shard(tar_path: str | Path) -> Iterator[Sample]:
    """Samples of a WebDataset tar in img2dataset's layout (<key>.jpg, <key>.txt, <key>.json).

    A sample with no image member yields None as its image, so that it is recorded as failed.
    """
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise ShardReadError(f"shard {tar_path}: file does not exist")
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            yield from _group_members(tar)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardReadError(f"shard {tar_path}: not a readable tar archive ({type(e).__name__}: {e})") from e


def _group_members(tar: tarfile.TarFile) -> Iterator[Sample]:
    key, parts = None, {}
    for member in tar:
        match = _MEMBER.match(member.name)
        if not member.isfile() or match is None:
            continue
        if match.group(1) != key:
            if key is not None:
                yield _sample(key, parts)
            key, parts = _safe_key(match.group(1)), {}
        parts[match.group(2).lower()] = tar.extractfile(member).read()
    if key is not None:
        yield _sample(key, parts)
    _check_end_of_archive(tar)


def _safe_key(key: str) -> str:
    # The key is written into the sidecar and joined on by the trainer: one from a hostile tar that could
    # name a path outside a folder makes the whole shard unreadable.
    try:
        return check_sample_key(key)
    except UnsafeKeyError as err:
        raise tarfile.ReadError(str(err)) from err


def _check_end_of_archive(tar: tarfile.TarFile) -> None:
    # tarfile ends iteration quietly at a truncated or garbled header past the first one, so a cut-off
    # shard would read as a shorter valid one. A complete archive ends with a zero block there.
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive marker at byte {tar.offset}: truncated or corrupt")


def _sample(key: str, parts: dict[str, bytes]) -> Sample:
    image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
    if "txt" in parts:
        caption = parts["txt"].decode("utf-8", errors="replace")
    else:
        caption = json.loads(parts.get("json", b"{}") or b"{}").get("caption") or ""
    return key, image, caption.strip()


@dataclass(frozen=True)
class ShardResult:
    """What the flow records for a shard. Means are over successful samples; None when there are none."""

    n_ok: int
    n_failed: int
    web_kept_share: float | None  # share of samples whose web caption made the top-k
    top1_score_mean: float | None
    web_score_mean: float | None  # over samples whose web caption was scored
    degenerate_share: float | None  # share of generated captions dropped before ranking


def shard_result(records: Sequence[CapFiltRecord], num_captions: int) -> ShardResult:
    ok = [r for r in records if r.error is None]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    web_scores = [r.scores[-1] for r in ok if not math.isnan(r.scores[-1])]
    dropped = [math.isnan(s) for r in ok for s in r.scores[:num_captions]]
    return ShardResult(
        n_ok=len(ok),
        n_failed=len(records) - len(ok),
        web_kept_share=mean([float(r.web_caption in r.top) for r in ok]),
        top1_score_mean=mean([r.top_scores[0] for r in ok if r.top_scores]),
        web_score_mean=mean(web_scores),
        degenerate_share=mean([float(d) for d in dropped]),
    )


def capfilt_shard(
    tar_path: str | Path,
    out_parquet: str | Path,
    cfg: CapFiltConfig,
    models: CapFiltModels,
    progress: Callable[[int], None] | None = None,
) -> ShardResult:
    """Run CapFilt on one shard and write its sidecar atomically; `progress(n_done)` after each batch.

    Records are held in memory (10k samples are a few MB) and the sidecar appears only when complete.
    Raises ShardReadError if the tar cannot be read; then no sidecar is written.
    """
    records: list[CapFiltRecord] = []
    for record in run_capfilt(read_shard(tar_path), cfg, models):
        records.append(record)
        if progress is not None and len(records) % cfg.batch_size == 0:
            progress(len(records))
    write_sidecar(records, out_parquet)
    return shard_result(records, cfg.num_captions)


# ----------------------------------------------------------------------------------------------- sidecar

SIDECAR_COLUMNS = (
    "key",
    "web_caption",
    "candidates",
    "scores",
    "top",
    "top_scores",
    "top1",
    "top2",
    "top1_score",
    "top2_score",
    "web_caption_rank",
    "error",
)


def _sidecar_schema() -> Any:
    # pyarrow is imported where it is used: GPU workers that only caption need not have it.
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("web_caption", pa.string()),
            ("candidates", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float32())),
            ("top", pa.list_(pa.string())),
            ("top_scores", pa.list_(pa.float32())),
            ("top1", pa.string()),
            ("top2", pa.string()),
            ("top1_score", pa.float32()),
            ("top2_score", pa.float32()),
            ("web_caption_rank", pa.int16()),
            ("error", pa.string()),
        ]
    )


def _nth(values: Sequence[Any], n: int) -> Any:
    return values[n] if len(values) > n else None


def _sidecar_row(r: CapFiltRecord) -> dict[str, Any]:
    return {
        "key": r.key,
        "web_caption": r.web_caption,
        "candidates": list(r.candidates),
        "scores": list(r.scores),
        "top": list(r.top),
        "top_scores": list(r.top_scores),
        "top1": _nth(r.top, 0),
        "top2": _nth(r.top, 1),
        "top1_score": _nth(r.top_scores, 0),
        "top2_score": _nth(r.top_scores, 1),
        "web_caption_rank": r.web_caption_rank,
        "error": r.error,
    }


def write_sidecar(records: Sequence[CapFiltRecord], out_parquet: str | Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([_sidecar_row(r) for r in records], schema=_sidecar_schema())
    with atomic_path(out_parquet) as tmp:
        pq.write_table(table, tmp)


def read_sidecar(path: str | Path) -> dict[str, tuple[str, str]]:
    """key -> (top1, top2) for the training loader. Failed samples and samples with no usable caption
    are left out; a sample with one usable caption gets it twice."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in ("key", "top1", "top2", "error") if c not in table.column_names]
    if missing:
        raise ValueError(f"CapFilt sidecar {path}: missing columns {missing}")
    result = {}
    for row in table.select(["key", "top1", "top2", "error"]).to_pylist():
        check_sample_key(row["key"])  # UnsafeKeyError: a sidecar that was not ours
        if row["error"] is None and row["top1"] is not None:
            result[row["key"]] = (row["top1"], row["top2"] or row["top1"])
    return result
