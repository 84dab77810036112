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

Export of models trained here (`export_model`, or `export_hf` on a checkpoint folder): HF's vision tower IS
an EVA01 ViT, so an open_clip EVA tower (timm `Eva`, the paper's EVA01-g-14) maps one to one (timm -> HF):
    patch_embed.proj / cls_token / pos_embed  -> embeddings.patch_embedding / class_embedding /
                                                 embeddings.position_embedding
    blocks.i.norm1 / norm2                    -> encoder.layers.i.layer_norm1 / layer_norm2
    blocks.i.attn.qkv.weight, q_bias, v_bias  -> encoder.layers.i.self_attn.qkv.weight, .bias = [q | 0 | v]
    blocks.i.attn.proj / mlp.fc1 / mlp.fc2    -> encoder.layers.i.self_attn.projection / mlp.fc1 / mlp.fc2
with num_hidden_layers = the kept blocks. Parts HF lacks (open_clip's ln_pre, rope, layer scale, SwiGLU...)
are refused by name. The one approximation: HF has a single layer_norm_eps, ours ln_vision uses 1e-5 and
EVA's blocks 1e-6 (see `_check_ln_vision_eps`).
"""

from __future__ import annotations

import copy
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
    """Write a transformers BLIP-2 folder (config.json + model.safetensors [+ tokenizer]) that
    Blip2ForConditionalGeneration (stage 2) / Blip2ForImageTextRetrieval (stage 1) load with from_pretrained.

    src_dir is either
      - an imported folder (holds blip2_import.json, written by `import_hf`): written back bit-identically;
      - a training checkpoint folder (checkpoints.py's `model.safetensors` of trainable weights) whose run
        config `blip2_config.json` (`config_to_dict` of the run's Blip2Config) sits in it or up to two
        folders above; the frozen tower loads from `vision.pretrained`, the LLM from the `llm.name` folder.
        Only EVA image towers (EVA01-g-14 presets) export; others raise ExportError (see export_model).
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if (src / META_FILE).is_file():
        return _export_imported(src, dst)
    return export_model(load_trained(src), dst)


def _export_imported(src: Path, dst: Path) -> Path:
    """An imported folder back as the transformers folder it came from: bit-identical weights."""
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


# ---------------------------------------------------------------------------------------------------------
# Export of models trained here (open_clip / timm image towers)
#
# transformers' Blip2VisionModel is exactly an EVA ViT of the EVA01 kind (BLIP-2's released towers):
# conv patch embedding with bias, CLS token, learned absolute positions, pre-norm blocks with fused qkv
# (q and v biases, no k bias), exact GELU MLP, no layer scale, no rope, no pre-norm. Blocks map one to one;
# HF's num_hidden_layers is the number of KEPT blocks and our `ln_vision` is its post_layernorm.

RUN_CONFIG_FILE = "blip2_config.json"  # config_to_dict(cfg) of a run; read by export_hf from a checkpoint
LN_VISION_EPS_TOLERANCE = 1e-5  # see _check_ln_vision_eps


class ExportError(ValueError):
    """The model has a part that transformers' BLIP-2 classes cannot represent exactly."""


def _exportable_presets() -> list[str]:
    """Presets whose image tower is a timm EVA (the only towers HF's Blip2VisionModel represents)."""
    import open_clip

    from blip2_core.config import load_preset, preset_names

    def is_eva(name: str) -> bool:
        model_cfg = open_clip.get_model_config(load_preset(name).vision.model_name) or {}
        return str(model_cfg.get("vision_cfg", {}).get("timm_model_name", "")).startswith("eva")

    return [name for name in preset_names() if is_eva(name)]


def _open_clip_refusal(model_name: str) -> ExportError:
    return ExportError(
        f"cannot export the open_clip VisionTransformer tower {model_name!r}: it applies a pre-layernorm "
        "(ln_pre) to the patch + position embeddings before the first block, and transformers' "
        "Blip2VisionModel has no such layer (a LayerNorm cannot be folded into the patch embedding), so "
        "no exported model would compute the same features. Exportable: EVA towers (timm Eva inside "
        f"open_clip, e.g. EVA01-g-14), i.e. the presets {', '.join(_exportable_presets())}"
    )


def _unsupported_eva_parts(trunk: nn.Module) -> list[str]:
    """Names of the parts of a timm Eva that Blip2VisionModel lacks (empty: the map is exact)."""
    from timm.layers import Mlp
    from timm.models.eva import EvaAttention, EvaBlock

    checks = [
        (trunk.rope is not None, "rotary position embeddings (rope)"),
        (trunk.pos_embed is None, "no absolute position embeddings (pos_embed)"),
        (trunk.cls_token is None or trunk.reg_token is not None, "a token layout other than one CLS token"),
        (trunk.no_embed_class, "position embeddings that skip the CLS token (no_embed_class)"),
        (trunk.dynamic_img_size, "dynamic image size"),
        (not isinstance(trunk.norm_pre, nn.Identity), "a pre-transformer norm (norm_pre)"),
        (not isinstance(trunk.patch_embed.norm, nn.Identity), "a norm after the patch embedding"),
    ]
    width = trunk.embed_dim
    for block in trunk.blocks:
        attn, mlp = block.attn, block.mlp
        if type(block) is not EvaBlock or type(attn) is not EvaAttention:
            checks.append((True, f"{type(block).__name__} blocks (post-norm or rope attention)"))
            continue
        checks += [
            (block.gamma_1 is not None or block.gamma_2 is not None, "layer scale (gamma_1 / gamma_2)"),
            (attn.qkv is None, "separate q/k/v projections"),
            (attn.head_dim * attn.num_heads != width, "an attention head width other than width / heads"),
            (not isinstance(attn.q_norm, nn.Identity), "q/k normalisation (qk_norm)"),
            (not isinstance(attn.norm, nn.Identity), "a norm inside attention (scale_attn_inner)"),
            (attn.gate is not None, "gated attention"),
            (type(mlp) is not Mlp, f"a {type(mlp).__name__} MLP (SwiGLU / gated)"),
            (type(mlp) is Mlp and not isinstance(mlp.norm, nn.Identity), "a norm inside the MLP (scale_mlp)"),
            (type(mlp) is Mlp and not _is_exact_gelu(mlp.act), "an MLP activation other than exact GELU"),
        ]
        checks += [
            (not _is_layer_norm(norm), "a block norm that is not an affine LayerNorm")
            for norm in (block.norm1, block.norm2)
        ]
    return sorted({part for failed, part in checks if failed})


def _is_exact_gelu(act: nn.Module) -> bool:
    return isinstance(act, nn.GELU) and act.approximate == "none"


def _is_layer_norm(norm: nn.Module) -> bool:
    return isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None


def _block_eps(trunk: nn.Module) -> float:
    eps = {norm.eps for block in trunk.blocks for norm in (block.norm1, block.norm2)}
    if len(eps) != 1:
        raise ExportError(f"vision tower: its block LayerNorms use several eps {sorted(eps)}; HF has one")
    return eps.pop()


def _check_ln_vision_eps(ln_vision: nn.LayerNorm, eps: float) -> None:
    """HF has ONE layer_norm_eps (default 1e-6) for the blocks and post_layernorm. Ours, as LAVIS's: EVA
    blocks 1e-6, ln_vision torch's default 1e-5. Exporting with the blocks' eps (exact for every block)
    changes ln_vision's output by about (eps_ln - eps) / (2 var) relative, var being the variance of the
    last kept block's tokens: far below the fp16 rounding of the frozen tower; the export tests measure
    its effect on LM logits / ITM / ITC (< 1e-5) and show it is the only difference. Larger gaps raise."""
    if abs(ln_vision.eps - eps) > LN_VISION_EPS_TOLERANCE:
        raise ExportError(
            f"ln_vision: eps {ln_vision.eps} differs from the tower's {eps} by more than "
            f"{LN_VISION_EPS_TOLERANCE}; HF's Blip2VisionModel has one layer_norm_eps"
        )


def eva_vision_to_hf(encoder: nn.Module, ln_vision: nn.LayerNorm) -> tuple[dict, dict[str, torch.Tensor]]:
    """A `vision.VisionEncoder` over a timm EVA + our ln_vision -> (HF vision_config, vision_model.* tensors).

    Raises ExportError naming any part HF cannot represent (open_clip's ln_pre, rope, layer scale, ...).
    """
    from timm.models.eva import Eva

    if not getattr(encoder, "is_timm", False):
        raise _open_clip_refusal(encoder.cfg.model_name)
    trunk = encoder.visual.trunk
    if not isinstance(trunk, Eva):
        raise ExportError(
            f"vision tower: timm {type(trunk).__name__} is not an EVA tower; exportable "
            f"presets: {', '.join(_exportable_presets())}"
        )
    parts = _unsupported_eva_parts(trunk)
    if parts:
        raise ExportError(
            f"vision tower {encoder.cfg.model_name!r} has parts that transformers' "
            f"Blip2VisionModel lacks: {'; '.join(parts)}"
        )
    eps = _block_eps(trunk)
    _check_ln_vision_eps(ln_vision, eps)
    patch = trunk.patch_embed
    first = trunk.blocks[0]
    vision_config = dict(
        hidden_size=trunk.embed_dim,
        intermediate_size=first.mlp.fc1.out_features,
        num_hidden_layers=len(trunk.blocks),  # the kept blocks: the last one is already dropped
        num_attention_heads=first.attn.num_heads,
        image_size=patch.img_size[0],
        patch_size=patch.patch_size[0],
        hidden_act="gelu",
        layer_norm_eps=eps,
        qkv_bias=True,
    )
    if patch.img_size[0] != patch.img_size[1] or patch.patch_size[0] != patch.patch_size[1]:
        raise ExportError(f"vision tower: HF needs square images and patches, got {patch.img_size}")
    conv = patch.proj
    out = {
        "embeddings.patch_embedding.weight": conv.weight,
        "embeddings.patch_embedding.bias": conv.bias
        if conv.bias is not None
        else conv.weight.new_zeros(conv.out_channels),
        "embeddings.class_embedding": trunk.cls_token,  # (1, 1, W)
        "embeddings.position_embedding": trunk.pos_embed,  # (1, 1 + g*g, W)
        "post_layernorm.weight": ln_vision.weight,
        "post_layernorm.bias": ln_vision.bias,
    }
    for i, block in enumerate(trunk.blocks):
        out.update({f"encoder.layers.{i}.{k}": v for k, v in _eva_block_to_hf(block).items()})
    return vision_config, {"vision_model." + k: v.detach() for k, v in out.items()}


def _eva_block_to_hf(block: nn.Module) -> dict[str, torch.Tensor]:
    attn = block.attn
    if attn.q_bias is not None:  # EVA keeps q and v biases apart; HF fuses them with a zero k bias
        qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    else:
        qkv_bias = attn.qkv.weight.new_zeros(attn.qkv.out_features)
    return {
        "layer_norm1.weight": block.norm1.weight,
        "layer_norm1.bias": block.norm1.bias,
        "self_attn.qkv.weight": attn.qkv.weight,
        "self_attn.qkv.bias": qkv_bias,
        "self_attn.projection.weight": attn.proj.weight,
        "self_attn.projection.bias": attn.proj.bias,
        "layer_norm2.weight": block.norm2.weight,
        "layer_norm2.bias": block.norm2.bias,
        "mlp.fc1.weight": block.mlp.fc1.weight,
        "mlp.fc1.bias": block.mlp.fc1.bias,
        "mlp.fc2.weight": block.mlp.fc2.weight,
        "mlp.fc2.bias": block.mlp.fc2.bias,
    }


def hf_vision_to_hf(
    encoder: HFVisionEncoder, ln_vision: nn.LayerNorm
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The HF-layout tower of an imported model: names only (vision_config from its dims)."""
    d = encoder.dims
    vision_config = dict(
        hidden_size=d.width,
        intermediate_size=d.mlp,
        num_hidden_layers=d.layers,
        num_attention_heads=d.heads,
        image_size=d.image_size,
        patch_size=d.patch,
        layer_norm_eps=d.eps,
        hidden_act="gelu",
        qkv_bias=True,
    )
    _check_ln_vision_eps(ln_vision, d.eps)
    state = {"vision_model." + k: v.detach() for k, v in encoder.state_dict().items()}
    state |= {"vision_model.post_layernorm." + k: v.detach() for k, v in ln_vision.state_dict().items()}
    return vision_config, state


def _vision_to_hf(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    if isinstance(model.visual_encoder, HFVisionEncoder):
        return hf_vision_to_hf(model.visual_encoder, model.ln_vision)
    return eva_vision_to_hf(model.visual_encoder, model.ln_vision)


def _qformer_config(cfg: QFormerConfig, text_input: bool) -> dict:
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id,
        cross_attention_frequency=cfg.cross_attention_freq,
        encoder_hidden_size=cfg.encoder_hidden_size,
        use_qformer_text_input=text_input,
    )


def _renamed(model: nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Our Q-Former / projection / head tensors under their HF names (LM head and temperature dropped)."""
    out = {}
    for key, tensor in model.state_dict().items():
        hf_key = ours_key_to_hf(key) if key.startswith(prefixes) else None
        if hf_key is not None:
            out[hf_key] = tensor
    return out


def image_token_id(llm: nn.Module, tokenizer) -> int:
    """transformers 5 marks the query slots with an image token: the first id the tokenizer does not use
    (as the released checkpoints' "<image>"), which must still have an embedding row."""
    token_id = len(tokenizer)
    rows = llm.get_input_embeddings().num_embeddings
    if token_id >= rows:
        raise ExportError(
            f"language model: its {rows} embedding rows are all tokenizer ids ({len(tokenizer)}), so there "
            "is no spare row for transformers' image token; resize the LLM's embeddings before training"
        )
    return token_id


def _generation_parts(model: nn.Module) -> tuple[type, dict, dict[str, torch.Tensor]]:
    from transformers import Blip2ForConditionalGeneration

    if model.qformer_text_input:
        raise ExportError(
            "the Q-Former of this stage-2 model reads the prompt text (qformer_text_input, VQA fine-tuning); "
            "transformers' Blip2ForConditionalGeneration feeds its Q-Former queries only"
        )
    bridge = model.bridge
    text_config = bridge.llm.config.to_dict()
    text_config.pop("dtype", None)
    text_config.pop("torch_dtype", None)
    config = dict(
        qformer_config=_qformer_config(model.cfg.qformer, text_input=False),
        text_config=text_config,
        num_query_tokens=model.cfg.qformer.num_query_tokens,
        image_token_index=image_token_id(bridge.llm, bridge.tokenizer),
    )
    state = _renamed(model, ("qformer.", "bridge.llm_projection."))
    state |= {"language_model." + k: v for k, v in bridge.llm.state_dict().items()}
    return Blip2ForConditionalGeneration, config, state


def _retrieval_parts(model: nn.Module) -> tuple[type, dict, dict[str, torch.Tensor]]:
    from transformers import Blip2ForImageTextRetrieval

    config = dict(
        qformer_config=_qformer_config(model.cfg.qformer, text_input=True),
        num_query_tokens=model.cfg.qformer.num_query_tokens,
        image_text_hidden_size=model.cfg.qformer.embed_dim,
    )
    state = _renamed(model, ("qformer.", "vision_projection.", "text_projection.", "itm_head."))
    return Blip2ForImageTextRetrieval, config, state


def export_model(model: nn.Module, dst_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write our Blip2Stage2 (-> Blip2ForConditionalGeneration) or Blip2Stage1 (-> Blip2ForImageTextRetrieval)
    as a transformers folder: config.json + model.safetensors (sharded when large), + the LLM's tokenizer.

    The image tower must be an EVA (or the HF-layout tower of an imported model); anything else raises
    ExportError naming the missing piece. Weights are written in `dtype` (fp32: an exact upcast of fp16/bf16
    frozen towers; the ITC temperature and the Q-Former's LM head have no place in HF and are left out).
    """
    from transformers import Blip2Config as HFBlip2Config

    from blip2_core.stage1 import Blip2Stage1

    if isinstance(model, Blip2Stage2):
        hf_class, config_kwargs, state = _generation_parts(model)
    elif isinstance(model, Blip2Stage1):
        hf_class, config_kwargs, state = _retrieval_parts(model)
    else:
        raise TypeError(f"model: expected Blip2Stage1 or Blip2Stage2, got {type(model).__name__}")
    vision_config, vision_state = _vision_to_hf(model)
    config = HFBlip2Config(vision_config=vision_config, **config_kwargs)
    with torch.device("meta"):
        hf_model = hf_class(config)
    # strict + assign: every HF weight must come from ours (a missing or extra name raises here)
    hf_model.load_state_dict(
        {k: v.to(dtype) for k, v in (state | vision_state).items()}, strict=True, assign=True
    )
    hf_model.tie_weights()
    dst = Path(dst_dir)
    hf_model.save_pretrained(dst)
    if isinstance(model, Blip2Stage2):
        _save_tokenizer(model.bridge.tokenizer, config.image_token_index, dst)
    return dst


def _save_tokenizer(tokenizer, token_id: int, dst: Path) -> None:
    """The LLM's tokenizer with "<image>" added at the image token id (what Blip2Processor expands)."""
    tokenizer = copy.deepcopy(tokenizer)
    if len(tokenizer) == token_id:
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.save_pretrained(dst)


# ---------------------------------------------------------------------------------------------------------
# Trained checkpoints


def find_run_config(checkpoint_dir: Path) -> Path:
    """The run's `blip2_config.json`: in the checkpoint folder, or up to two folders above it
    (`<run>/checkpoints/step-000100/` finds `<run>/blip2_config.json`)."""
    for folder in [checkpoint_dir, *list(checkpoint_dir.resolve().parents)[:2]]:
        if (folder / RUN_CONFIG_FILE).is_file():
            return folder / RUN_CONFIG_FILE
    raise FileNotFoundError(
        f"{checkpoint_dir}: no {RUN_CONFIG_FILE} here or in the two folders above (write the run's config "
        f"there with config_to_dict, or pass an imported folder holding {META_FILE})"
    )


def load_trained(checkpoint_dir: str | Path) -> nn.Module:
    """Our model from a training checkpoint folder (checkpoints.py's model.safetensors of trainable
    weights) and its run config: Blip2Stage1 if the weights hold `itm_head.*`, Blip2Stage2 if
    `bridge.llm_projection.*`.
    Frozen parts load from where the config names them: the image tower from `vision.pretrained` (unless the
    checkpoint holds a fine-tuned `visual_encoder.*`), the LLM from the `llm.name` folder."""
    from safetensors import safe_open

    from blip2_core.checkpoints import load_trainable_weights
    from blip2_core.config import load_preset
    from blip2_core.stage1 import Blip2Stage1

    src = Path(checkpoint_dir)
    cfg = load_preset(find_run_config(src))
    with safe_open(str(src / WEIGHTS_FILE), framework="pt") as fh:
        names = set(fh.keys())
    tower_trained = any(k.startswith("visual_encoder.") for k in names)
    if not tower_trained and cfg.vision.pretrained is None:
        raise ValueError(
            f"{src}: the frozen image tower has no weights: vision.pretrained is unset and the checkpoint "
            "holds no visual_encoder.* tensors"
        )
    if "itm_head.weight" in names:
        model = Blip2Stage1(cfg)
    elif "bridge.llm_projection.weight" in names:
        text_input = any(k.startswith("qformer.embeddings.") for k in names)
        model = Blip2Stage2(cfg, qformer_text_input=text_input)
    else:
        raise ValueError(
            f"{src}: neither a stage-1 (itm_head.*) nor a stage-2 (bridge.llm_projection.*) checkpoint"
        )
    if tower_trained:
        model.visual_encoder.unfreeze()  # fine-tuned: its weights are in the checkpoint
    load_trainable_weights(model, src)
    return model.eval()
