"""Stage 2 of BLIP-2, generative learning: frozen ViT -> ln_vision -> Q-Former -> projection -> frozen LLM.

`Blip2Stage2(cfg)(batch)` returns a `Stage2Output` whose `.loss` is the LM loss (OPT) or the prefix-LM
loss (FlanT5) of `llm_bridge.py`. Trainable: `ln_vision`, the Q-Former (queries included) and the
projection; the ViT and the LLM are frozen (unless fine-tuning unfreezes the ViT).

In pretraining the Q-Former only runs its queries, so its text-only parts (word/position embeddings, the
text FFNs, the LM head) are dropped, as in the reference code and in transformers'
Blip2ForConditionalGeneration (`qformer_text_input=False`). VQA fine-tuning feeds the question into
the Q-Former: keep them there.

Batch: a dict or dataclass with `images` (B, 3, H, W), `captions` (B strings) and optional `prompts`
(B strings; instructed generation / VQA). Captions are raw text: the LLM's tokenizer lives in the bridge.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
from torch import nn

from blip2_core.config import Blip2Config
from blip2_core.generate import CAPTION_GENERATION, GenerationConfig, generate_with_llm
from blip2_core.llm_bridge import LLMBridge, load_llm
from blip2_core.qformer import QFormer


@dataclass
class Stage2Batch:
    images: torch.Tensor  # (B, 3, H, W) normalised pixels
    captions: list[str]
    prompts: list[str] | None = None

    @classmethod
    def from_any(cls, batch: Any) -> Stage2Batch:
        if isinstance(batch, cls):
            return batch
        if is_dataclass(batch):
            batch = {f.name: getattr(batch, f.name) for f in fields(batch)}
        if not isinstance(batch, dict):
            raise TypeError(f"batch must be a dict or dataclass, got {type(batch).__name__}")
        missing = [name for name in ("images", "captions") if name not in batch]
        if missing:
            raise KeyError(f"stage-2 batch lacks {', '.join(missing)} (has {', '.join(batch)})")
        if len(batch["captions"]) != len(batch["images"]):
            raise ValueError(f"captions: {len(batch['captions'])} captions for {len(batch['images'])} images")
        return cls(batch["images"], list(batch["captions"]), batch.get("prompts"))


@dataclass
class Stage2Output:
    loss: torch.Tensor  # scalar
    logits: torch.Tensor  # decoder: (B, Q + T, V); encoder-decoder: (B, S, V)
    labels: torch.Tensor  # aligned with logits' positions, -100 where no loss
    query_output: torch.Tensor  # (B, Q, D) Q-Former outputs before the projection


def drop_qformer_text_branch(qformer: QFormer) -> None:
    """Remove what only text tokens use: embeddings, text FFNs, LM head (queries never touch them)."""
    qformer.embeddings = None
    qformer.cls = None
    for layer in qformer.encoder.layer:
        layer.intermediate = None
        layer.output = None


def build_visual_encoder(cfg: Blip2Config, device: str | torch.device = "cpu") -> nn.Module:
    """The open_clip encoder of the preset (imported here so that the rest works without open_clip)."""
    from blip2_core.vision import VisionEncoder

    return VisionEncoder(cfg.vision, device=device)


def build_bridge(cfg: Blip2Config) -> LLMBridge:
    """The frozen LLM of the preset, read from the local folder `llm.name` (the one loading place)."""
    llm, tokenizer = load_llm(cfg.llm.name, cfg.llm.precision)
    return LLMBridge(llm, tokenizer, cfg.qformer.hidden_size, max_text_len=cfg.llm.max_text_len)


class Blip2Stage2(nn.Module):
    def __init__(
        self,
        cfg: Blip2Config,
        bridge: LLMBridge | None = None,
        visual_encoder: nn.Module | None = None,
        qformer_text_input: bool = False,
    ):
        """bridge / visual_encoder default to the preset's (local weights); pass them to reuse or replace
        (tests, the HF vision tower of `hf_interop`, benchmarks without open_clip)."""
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = visual_encoder if visual_encoder is not None else build_visual_encoder(cfg)
        self.ln_vision = nn.LayerNorm(cfg.vision.width)
        self.qformer = QFormer(cfg.qformer)
        self.qformer_text_input = qformer_text_input
        if not qformer_text_input:
            drop_qformer_text_branch(self.qformer)
        self.bridge = bridge if bridge is not None else build_bridge(cfg)
        if self.bridge.llm_projection.in_features != cfg.qformer.hidden_size:
            raise ValueError(
                f"bridge: projection takes {self.bridge.llm_projection.in_features} features, "
                f"the Q-Former gives {cfg.qformer.hidden_size}"
            )

    def query_output(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, Q, D): the queries after cross-attending to ln_vision(ViT tokens)."""
        image_embeds = self.ln_vision(self.visual_encoder(images))  # (B, S, W)
        queries = self.qformer.expand_queries(images.shape[0])
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state

    def forward(self, batch: Any) -> Stage2Output:
        batch = Stage2Batch.from_any(batch)
        query_output = self.query_output(batch.images)
        prompts = batch.prompts if batch.prompts is not None else self._default_prompts(len(batch.captions))
        out = self.bridge(query_output, batch.captions, prompts)
        return Stage2Output(out.loss, out.logits, out.labels, query_output)

    def _default_prompts(self, batch_size: int) -> list[str] | None:
        return [self.cfg.llm.prompt] * batch_size if self.cfg.llm.prompt else None

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        prompts: list[str] | None = None,
        cfg: GenerationConfig = CAPTION_GENERATION,
    ) -> list[str]:
        """Instructed zero-shot generation: each prompt follows the visual prompt. Texts, one per row."""
        prompts = prompts if prompts is not None else self._default_prompts(images.shape[0])
        texts, _ = generate_with_llm(self.bridge, self.query_output(images), prompts, cfg)
        return texts

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]


@torch.no_grad()
def load_stage1_weights(model: Blip2Stage2, stage1_state: dict[str, torch.Tensor]) -> list[str]:
    """Start stage 2 from a stage-1 state dict: ln_vision and the Q-Former. Returns the keys not used
    (stage-1 heads, dropped text parts); raises if a stage-2 Q-Former or ln_vision weight is missing."""
    ours = model.state_dict()
    wanted = [k for k in ours if k.startswith(("ln_vision.", "qformer."))]
    missing = [k for k in wanted if k not in stage1_state]
    if missing:
        raise KeyError(f"stage-1 state lacks {len(missing)} stage-2 weights, e.g. {missing[:3]}")
    for key in wanted:
        ours[key].copy_(stage1_state[key])
    return sorted(set(stage1_state) - set(wanted))
