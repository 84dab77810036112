"""BLIP-2 configuration: frozen dataclasses, JSON presets and one strict loader.

A preset is a JSON file in `blip2_core/presets/` (or any path) with the sections `vision`, `qformer`,
`llm`, `stage1` and `stage2`. Every key must be a field of its section's dataclass; anything else is
rejected with an error naming the key and the file, so a typo never silently falls back to a default.

Derived fields are set in exactly one place, `Blip2Config.__post_init__`:
  - `qformer.encoder_hidden_size` = `vision.width`  (cross-attention keys/values read image features)
  - `language_projection_dim`     = `llm.hidden_size` (the stage-2 bridge maps queries to LLM embeddings)
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "presets"

# open_clip model configs shipped beside the presets (registered with open_clip by `vision.py`);
# they are image-tower architectures, not BLIP-2 presets.
OPEN_CLIP_CONFIG_NAMES = ("blip2-tiny-clip",)

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class VisionConfig:
    """The frozen image encoder: an open_clip image tower, cut before its last block."""

    model_name: str = "ViT-L-14"  # open_clip architecture ("ViT-L-14", "EVA01-g-14", "blip2-tiny-clip")
    pretrained: str | None = None  # local path to open_clip weights; None = random init (tests, meta)
    quick_gelu: bool = False  # OpenAI CLIP weights were trained with QuickGELU
    width: int = 1024  # token width of the tower; becomes the Q-Former cross-attention width
    image_size: int = 224  # position embeddings are interpolated when this differs from the tower's
    drop_last_block: bool = True
    precision: str = "fp16"  # cast of the frozen weights; features leave the encoder as fp32
    freeze: bool = True  # fine-tuning (captioning, VQA, retrieval) trains the encoder


@dataclass(frozen=True)
class QFormerConfig:
    """BERT-base dimensions plus the Q-Former additions (cross-attention, queries, [DEC])."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    vocab_size: int = 30523  # bert-base-uncased 30522 + [DEC]
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    dec_token_id: int = 30522  # the added [DEC] token, BOS for image-grounded generation
    cross_attention_freq: int = 2  # cross-attention in layers 0, freq, 2*freq, ...
    num_query_tokens: int = 32
    embed_dim: int = 256  # width of the ITC projections
    max_text_len: int = 32
    init_checkpoint: str | None = "bert-base-uncased"  # local folder in the HF layout, or None
    encoder_hidden_size: int = field(default=0, init=False)  # derived: vision.width


@dataclass(frozen=True)
class LLMConfig:
    """The frozen language model of stage 2, with the dims needed to build it on the meta device.

    OPT uses `num_layers`, `num_heads`, `ffn_dim`; T5 also uses `num_decoder_layers` and `d_kv`.
    """

    kind: str = "opt"  # "opt" | "t5"
    name: str = ""  # HF model name (informative) or local folder with the weights
    hidden_size: int = 2560
    num_layers: int = 32
    num_decoder_layers: int = 0  # T5 only
    num_heads: int = 32
    ffn_dim: int = 10240
    d_kv: int = 0  # T5 only
    vocab_size: int = 50272
    max_position_embeddings: int = 2048  # OPT only
    precision: str = "fp16"
    prompt: str = ""
    max_text_len: int = 32


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyperparameters of one stage (paper values, SPEC.md)."""

    steps: int = 250_000
    batch_size: int = 2320
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 2000
    warmup_start_lr: float = 1e-6
    beta1: float = 0.9
    beta2: float = 0.98
    weight_decay: float = 0.05
    image_size: int = 224
    crop_scale_min: float = 0.5  # random resized crop scale (min, 1.0)
    hflip: bool = True
    label_smoothing: float = 0.1


@dataclass(frozen=True)
class Blip2Config:
    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    stage1: TrainConfig = field(default_factory=TrainConfig)
    stage2: TrainConfig = field(default_factory=TrainConfig)
    language_projection_dim: int = field(default=0, init=False)  # derived: llm.hidden_size

    def __post_init__(self) -> None:
        _validate(self)
        # The single place where derived fields are set (on a copy: a QFormerConfig may be shared).
        qformer = dataclasses.replace(self.qformer)
        object.__setattr__(qformer, "encoder_hidden_size", self.vision.width)
        object.__setattr__(self, "qformer", qformer)
        object.__setattr__(self, "language_projection_dim", self.llm.hidden_size)


def _validate(cfg: Blip2Config) -> None:
    checks = [
        (cfg.vision.precision in PRECISIONS, f"vision.precision must be one of {PRECISIONS}"),
        (cfg.llm.precision in PRECISIONS, f"llm.precision must be one of {PRECISIONS}"),
        (cfg.llm.kind in ("opt", "t5"), f"llm.kind must be 'opt' or 't5', got {cfg.llm.kind!r}"),
        (
            cfg.qformer.hidden_size % cfg.qformer.num_attention_heads == 0,
            "qformer.hidden_size must be a multiple of qformer.num_attention_heads",
        ),
        (cfg.qformer.dec_token_id < cfg.qformer.vocab_size, "qformer.dec_token_id must be < vocab_size"),
        (cfg.qformer.cross_attention_freq >= 1, "qformer.cross_attention_freq must be >= 1"),
        (cfg.qformer.num_query_tokens >= 1, "qformer.num_query_tokens must be >= 1"),
        (
            cfg.qformer.max_text_len <= cfg.qformer.max_position_embeddings,
            "qformer.max_text_len must be <= qformer.max_position_embeddings",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"config {cfg.name!r}: {message}")


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json") if p.stem not in OPEN_CLIP_CONFIG_NAMES)


def load_preset(name_or_path: str | Path) -> Blip2Config:
    """Load a preset by name (`tiny`, `paper-vitg-opt2.7b`, ...) or from a JSON file path."""
    path = Path(name_or_path)
    if not path.is_file():
        if path.suffix == ".json" or len(path.parts) > 1:
            raise FileNotFoundError(f"preset file {str(path)!r} does not exist")
        if str(name_or_path) not in preset_names():
            raise ValueError(f"unknown preset {str(name_or_path)!r}; available: {', '.join(preset_names())}")
        path = PRESET_DIR / f"{name_or_path}.json"
    data = json.loads(path.read_text())
    return config_from_dict(data, source=str(path))


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Blip2Config:
    """Build a Blip2Config from nested dicts, rejecting unknown keys and wrong types."""
    return _build(Blip2Config, data, source, prefix="")


def config_to_dict(cfg: Blip2Config) -> dict[str, Any]:
    """The loadable form of a config (derived fields left out), e.g. to save beside a checkpoint."""

    def strip(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: strip(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        return obj

    return strip(cfg)


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise TypeError(f"{source}: {where} must be an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    derived = {f.name for f in dataclasses.fields(cls) if not f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key in derived:
            raise ValueError(f"{source}: key {prefix}{key!r} is derived and must not be set")
        if key not in fields:
            raise ValueError(f"{source}: unknown key {prefix}{key} (known: {', '.join(fields)})")
        kwargs[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, prefix=f"{key}.")
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for typ in allowed:
        if typ is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ in (str, bool) and isinstance(value, typ):
            return value
    names = " | ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise TypeError(f"{source}: key {key} must be {names}, got {value!r}")
