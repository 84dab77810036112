"""Checkpoint interop with Hugging Face BLIP-2 (and the LAVIS reference code's key names).

Vision tower: transformers' `Blip2VisionModel` is its own ViT (fused `qkv` with q/v biases, no pre-norm),
not open_clip's. We do NOT squeeze its weights into the open_clip tower; `HFVisionEncoder` below is a
plain-PyTorch ViT with exactly its parameter names and maths, returning the last kept block's tokens
(HF already stores the ViT minus its last block). HF's `vision_model.post_layernorm` IS our `ln_vision`.
The same class is the fallback image tower of the GPU benchmark when open_clip is not installed.

Key map (HF -> ours):
    vision_model.embeddings.* / .encoder.*  -> visual_encoder.embeddings.* / .encoder.*
    vision_model.post_layernorm.*           -> ln_vision.*
    query_tokens                            -> qformer.query_tokens
    qformer.*                               -> qformer.*        (our Q-Former uses HF's names)
    embeddings.{word,position}_embeddings.* -> qformer.embeddings.*   (retrieval model)
    language_projection.*                   -> bridge.llm_projection.*
    language_model.*                        -> bridge.llm.*     (saved on its own with save_pretrained)
    vision_projection / text_projection / itm_head: unchanged names (retrieval model)

An imported folder holds `model.safetensors` (our names, LLM excluded), `blip2_import.json` (our config,
the vision dims, the architecture and the original HF config for export) and `llm/` (the language model
and tokenizer in save_pretrained format). Nothing is unpickled except through safetensors.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from blip2_core.config import (
    Blip2Config,
    LLMConfig,
    QFormerConfig,
    VisionConfig,
    config_from_dict,
    config_to_dict,
)
from blip2_core.llm_bridge import LLMBridge, load_llm
from blip2_core.qformer import QFormer
from blip2_core.stage2 import Blip2Stage2

META_FILE = "blip2_import.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION = "Blip2ForConditionalGeneration"
RETRIEVAL = "Blip2ForImageTextRetrieval"


# ---------------------------------------------------------------------------------------------------------
# The HF-layout vision tower


@dataclass(frozen=True)
class ViTDims:
    width: int = 1408  # EVA ViT-g/14 minus its last block: HF's Blip2VisionConfig defaults
    layers: int = 39
    heads: int = 16
    mlp: int = 6144
    patch: int = 14
    image_size: int = 224
    eps: float = 1e-6


class ViTAttention(nn.Module):
    def __init__(self, dims: ViTDims):
        super().__init__()
        self.heads = dims.heads
        self.qkv = nn.Linear(dims.width, 3 * dims.width)  # HF stores the key bias as zeros
        self.projection = nn.Linear(dims.width, dims.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, Dh)
        return self.projection(out.transpose(1, 2).reshape(batch, length, width))


class ViTMLP(nn.Module):
    def __init__(self, dims: ViTDims):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dims.width, dims.mlp), nn.Linear(dims.mlp, dims.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTLayer(nn.Module):
    def __init__(self, dims: ViTDims):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dims.width, eps=dims.eps)
        self.self_attn = ViTAttention(dims)
        self.layer_norm2 = nn.LayerNorm(dims.width, eps=dims.eps)
        self.mlp = ViTMLP(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # pre-norm block
        return x + self.mlp(self.layer_norm2(x))


class ViTEmbeddings(nn.Module):
    def __init__(self, dims: ViTDims):
        super().__init__()
        num_positions = (dims.image_size // dims.patch) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, dims.width))
        self.patch_embedding = nn.Conv2d(3, dims.width, kernel_size=dims.patch, stride=dims.patch)
        self.position_embedding = nn.Parameter(torch.randn(1, num_positions, dims.width) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(images).flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = self.class_embedding.expand(len(images), -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding  # (B, 1 + g*g, W)


class ViTEncoder(nn.Module):
    def __init__(self, dims: ViTDims):
        super().__init__()
        self.layers = nn.ModuleList(ViTLayer(dims) for _ in range(dims.layers))


class HFVisionEncoder(nn.Module):
    """HF Blip2VisionModel's ViT without post_layernorm; forward(images (B, 3, H, W)) -> (B, N, W) fp32.
    Frozen like `vision.VisionEncoder`: requires_grad_(False) and eval() kept across .train()."""

    def __init__(self, dims: ViTDims, freeze: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dims = dims
        self.embeddings = ViTEmbeddings(dims)
        self.encoder = ViTEncoder(dims)
        self.frozen = freeze
        if freeze:
            self.requires_grad_(False)
            self.to(dtype).eval()

    def train(self, mode: bool = True) -> HFVisionEncoder:
        return super().train(mode and not self.frozen)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(images.to(self.embeddings.patch_embedding.weight.dtype))
        for layer in self.encoder.layers:
            x = layer(x)
        return x.float()


# ---------------------------------------------------------------------------------------------------------
# The stage-1 model with the HF tower (retrieval): Blip2Stage1's maths, this vision encoder


def retrieval_model(cfg: Blip2Config, dims: ViTDims) -> nn.Module:
    """A `stage1.Blip2Stage1` whose image tower is `HFVisionEncoder` (all feature helpers reused)."""
    from blip2_core.stage1 import Blip2Stage1

    class HFStage1(Blip2Stage1):
        def __init__(self):
            nn.Module.__init__(self)  # Blip2Stage1.__init__ would build the open_clip tower
            self.cfg, self.match_same_image = cfg, False
            self.label_smoothing = cfg.stage1.label_smoothing
            self.visual_encoder = HFVisionEncoder(dims)
            self.ln_vision = nn.LayerNorm(dims.width, eps=dims.eps)
            self.qformer = QFormer(cfg.qformer)
            hidden, embed = cfg.qformer.hidden_size, cfg.qformer.embed_dim
            self.vision_projection = nn.Linear(hidden, embed)
            self.text_projection = nn.Linear(hidden, embed)
            self.itm_head = nn.Linear(hidden, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))

    return HFStage1()


# ---------------------------------------------------------------------------------------------------------
# Configs


def _dims_from_hf(vision: dict) -> ViTDims:
    return ViTDims(
        width=vision["hidden_size"],
        layers=vision["num_hidden_layers"],
        heads=vision["num_attention_heads"],
        mlp=vision["intermediate_size"],
        patch=vision["patch_size"],
        image_size=vision["image_size"],
        eps=vision.get("layer_norm_eps", 1e-6),
    )


def _config_from_hf(hf: dict, llm_dir: Path | None) -> Blip2Config:
    q, dims = hf["qformer_config"], _dims_from_hf(hf["vision_config"])
    vocab = q.get("vocab_size", 30522)
    qformer = QFormerConfig(
        hidden_size=q["hidden_size"],
        num_hidden_layers=q["num_hidden_layers"],
        num_attention_heads=q["num_attention_heads"],
        intermediate_size=q["intermediate_size"],
        hidden_act=q.get("hidden_act", "gelu"),
        layer_norm_eps=q.get("layer_norm_eps", 1e-12),
        max_position_embeddings=q.get("max_position_embeddings", 512),
        vocab_size=vocab,
        dec_token_id=min(30522, vocab - 1),
        cross_attention_freq=q.get("cross_attention_frequency", 2),
        num_query_tokens=hf.get("num_query_tokens", 32),
        embed_dim=hf.get("image_text_hidden_size", 256),
        init_checkpoint=None,
    )
    vision = VisionConfig(model_name="hf-blip2-vision", width=dims.width, image_size=dims.image_size)
    llm = LLMConfig(name=str(llm_dir) if llm_dir else "", precision="fp32")
    if hf.get("text_config"):
        t = hf["text_config"]
        llm = LLMConfig(
            kind="t5" if t.get("model_type") == "t5" else "opt",
            name=str(llm_dir),
            hidden_size=t.get("hidden_size", t.get("d_model", 0)),
            vocab_size=t.get("vocab_size", 0),
            precision="fp32",
        )
    return Blip2Config(name="hf-import", vision=vision, qformer=qformer, llm=llm)


# ---------------------------------------------------------------------------------------------------------
# Key maps


def hf_key_to_ours(key: str) -> str | None:
    """HF BLIP-2 name -> our name; None for the language model (stored separately)."""
    if key.startswith("language_model."):
        return None
    if key.startswith("vision_model.post_layernorm."):
        return key.replace("vision_model.post_layernorm.", "ln_vision.")
    if key.startswith("vision_model."):
        return key.replace("vision_model.", "visual_encoder.", 1)
    if key == "query_tokens":
        return "qformer.query_tokens"
    if key.startswith("embeddings."):
        return "qformer." + key
    if key.startswith("language_projection."):
        return key.replace("language_projection.", "bridge.llm_projection.")
    return key


def ours_key_to_hf(key: str) -> str | None:
    """Inverse of `hf_key_to_ours`; None for what HF has no place for (our ITC temperature, LM head)."""
    if key == "temp" or key.startswith(("qformer.cls.", "bridge.llm.")):
        return None
    if key.startswith("ln_vision."):
        return key.replace("ln_vision.", "vision_model.post_layernorm.")
    if key.startswith("visual_encoder."):
        return key.replace("visual_encoder.", "vision_model.", 1)
    if key == "qformer.query_tokens":
        return "query_tokens"
    if key.startswith("qformer.embeddings."):
        return key.removeprefix("qformer.")
    if key.startswith("bridge.llm_projection."):
        return key.replace("bridge.llm_projection.", "language_projection.")
    return key


LAVIS_RENAMES = [
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
    ("Qformer.bert.embeddings.", "qformer.embeddings."),
    ("Qformer.bert.encoder.", "qformer.encoder."),
    ("Qformer.cls.", "qformer.cls."),
    ("query_tokens", "qformer.query_tokens"),
    ("opt_proj.", "bridge.llm_projection."),
    ("t5_proj.", "bridge.llm_projection."),
    ("vision_proj.", "vision_projection."),
    ("text_proj.", "text_projection."),
    ("visual_encoder.patch_embed.proj.", "visual_encoder.embeddings.patch_embedding."),
    ("visual_encoder.cls_token", "visual_encoder.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "visual_encoder.embeddings.position_embedding"),
    ("visual_encoder.blocks.", "visual_encoder.encoder.layers."),
]
LAVIS_BLOCK_RENAMES = [
    (".norm1.", ".layer_norm1."),
    (".norm2.", ".layer_norm2."),
    (".attn.qkv.", ".self_attn.qkv."),
    (".attn.proj.", ".self_attn.projection."),
]


def lavis_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS reference-code state dict (blip2 / blip2_opt / blip2_t5) -> our names.

    BERT's `attention.self` becomes HF's `attention.attention`; EVA's separate q/v biases become one fused
    qkv bias with a zero key part (HF's convention); the tied LM-head decoder is dropped.
    """
    out = {}
    for key, tensor in state.items():
        if key.startswith(("opt_model.", "t5_model.")) or key.endswith("cls.predictions.decoder.weight"):
            continue  # frozen LLM (loaded from its own folder) / tied to the word embeddings
        if key.endswith(("attn.q_bias", "attn.v_bias")):
            continue  # folded into qkv.bias below
        new = key
        for old, rep in LAVIS_RENAMES:
            if new.startswith(old):
                new = rep + new[len(old) :]
                break
        if new.startswith("visual_encoder.encoder.layers."):
            for old, rep in LAVIS_BLOCK_RENAMES:
                new = new.replace(old, rep)
        new = new.replace(".attention.self.", ".attention.attention.")
        new = new.replace(".crossattention.self.", ".crossattention.attention.")
        out[new] = tensor
        if key.endswith("attn.qkv.weight") and key.replace("qkv.weight", "q_bias") in state:
            q_bias, v_bias = (
                state[key.replace("qkv.weight", "q_bias")],
                state[key.replace("qkv.weight", "v_bias")],
            )
            out[new.replace(".weight", ".bias")] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return out


# ---------------------------------------------------------------------------------------------------------
# Import / export


def read_safetensors_dir(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a save_pretrained folder, single file or sharded."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(src / f)).items()}
    if not (src / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"src_dir: {src} has no {WEIGHTS_FILE} (only safetensors checkpoints load)")
    return load_file(str(src / WEIGHTS_FILE))


def import_hf(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Convert a HF Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval folder into ours."""
    src, dst = Path(src_dir), Path(dst_dir)
    hf_config = json.loads((src / "config.json").read_text())
    architecture = (hf_config.get("architectures") or [GENERATION])[0]
    if architecture not in (GENERATION, RETRIEVAL):
        raise ValueError(f"architectures: {architecture!r} is not {GENERATION} or {RETRIEVAL}")
    state = read_safetensors_dir(src)
    dst.mkdir(parents=True, exist_ok=True)
    llm_dir = None
    if architecture == GENERATION:
        llm_dir = dst / "llm"
        _save_language_model(hf_config, state, src, llm_dir)
    ours = {hf_key_to_ours(k): v for k, v in state.items() if hf_key_to_ours(k) is not None}
    save_file({k: v.contiguous() for k, v in ours.items()}, str(dst / WEIGHTS_FILE))
    cfg = _config_from_hf(hf_config, llm_dir)
    meta = {
        "architecture": architecture,
        "config": config_to_dict(cfg),
        "vision": vars(_dims_from_hf(hf_config["vision_config"])),
        "qformer_text_input": any(k.startswith("embeddings.") for k in state),
        "hf_config": hf_config,
    }
    (dst / META_FILE).write_text(json.dumps(meta, indent=2))
    return dst


def _save_language_model(hf_config: dict, state: dict, src: Path, llm_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    text = dict(hf_config["text_config"])
    config = AutoConfig.for_model(text.pop("model_type"), **text)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    llm = auto.from_config(config)
    lm_state = {
        k.removeprefix("language_model."): v for k, v in state.items() if k.startswith("language_model.")
    }
    missing, unexpected = llm.load_state_dict(lm_state, strict=False)
    tied = {k for k in missing if _is_tied(llm, k)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"language_model: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    llm.tie_weights()
    llm.save_pretrained(llm_dir)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
    ):
        if (src / name).is_file():
            shutil.copy(src / name, llm_dir / name)


def _is_tied(llm: nn.Module, key: str) -> bool:
    out = llm.get_output_embeddings()
    return out is not None and key.endswith("lm_head.weight") and llm.config.tie_word_embeddings


def load_imported(dst_dir: str | Path) -> nn.Module:
    """Our model (Blip2Stage2 or the retrieval Blip2Stage1) with the weights of an imported folder."""
    dst = Path(dst_dir)
    meta = json.loads((dst / META_FILE).read_text())
    cfg = config_from_dict(meta["config"], source=str(dst / META_FILE))
    dims = ViTDims(**meta["vision"])
    if meta["architecture"] == GENERATION:
        llm, tokenizer = load_llm(dst / "llm")
        bridge = LLMBridge(llm, tokenizer, cfg.qformer.hidden_size, max_text_len=cfg.llm.max_text_len)
        model = Blip2Stage2(cfg, bridge, HFVisionEncoder(dims), qformer_text_input=meta["qformer_text_input"])
        model.ln_vision = nn.LayerNorm(dims.width, eps=dims.eps)
    else:
        model = retrieval_model(cfg, dims)
    state = load_file(str(dst / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("bridge.llm.", "qformer.cls.")) and k != "temp"]
    if missing or unexpected:
        raise ValueError(f"{dst}: weights missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def export_hf(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Write an imported folder back as a transformers BLIP-2 folder (config.json + model.safetensors)."""
    src, dst = Path(src_dir), Path(dst_dir)
    meta = json.loads((src / META_FILE).read_text())
    state = {}
    for key, tensor in load_file(str(src / WEIGHTS_FILE)).items():
        hf_key = ours_key_to_hf(key)
        if hf_key is not None:
            state[hf_key] = tensor
    if meta["architecture"] == GENERATION:
        lm = read_safetensors_dir(src / "llm")
        state.update({"language_model." + k: v for k, v in lm.items()})
    dst.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(dst / WEIGHTS_FILE), metadata={"format": "pt"}
    )
    (dst / "config.json").write_text(json.dumps(meta["hf_config"], indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / "llm" / name).is_file():
            shutil.copy(src / "llm" / name, dst / name)
    return dst
