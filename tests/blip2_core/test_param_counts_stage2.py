"""Paper parameter counts from configs alone, built on the meta device (no memory, no weights)."""

import pytest
import torch
from tiny_models import build_tokenizer

from blip2_core.config import load_preset
from blip2_core.hf_interop import HFVisionEncoder, ViTDims
from blip2_core.llm_bridge import LLMBridge, hf_llm_config, llm_from_config
from blip2_core.stage2 import Blip2Stage2


def meta_stage2(preset: str) -> Blip2Stage2:
    cfg = load_preset(preset)
    tokenizer = build_tokenizer("opt")  # only its "\n" id is read; the counts come from the configs
    with torch.device("meta"):
        vision = HFVisionEncoder(ViTDims(width=cfg.vision.width))  # EVA ViT-g/14 minus its last block
        bridge = LLMBridge(llm_from_config(hf_llm_config(cfg.llm)), tokenizer, cfg.qformer.hidden_size)
        return Blip2Stage2(cfg, bridge=bridge, visual_encoder=vision)


def count(params) -> int:
    return sum(p.numel() for p in params)


def test_vitg_opt27b_trains_about_107m_parameters():
    model = meta_stage2("paper-vitg-opt2.7b")
    trainable = count(p for _, p in model.trainable_parameters())
    print(f"stage-2 ViT-g OPT-2.7B trainable parameters: {trainable:,}")
    assert trainable == pytest.approx(107e6, rel=0.03)  # SPEC.md: about 107M
    llm = count(model.bridge.llm.parameters())
    assert llm == pytest.approx(2.65e9, rel=0.03)  # OPT-2.7B
    vit = count(model.visual_encoder.parameters())
    assert vit == pytest.approx(0.985e9, rel=0.03)  # EVA ViT-g/14 (1.0B) minus one block
    assert all(not p.requires_grad for p in model.bridge.llm.parameters())


def test_flant5xl_bridge_differs_only_by_projection_width():
    opt, t5 = meta_stage2("paper-vitg-opt2.7b"), meta_stage2("paper-vitg-flant5xl")
    difference = count(p for _, p in opt.trainable_parameters()) - count(
        p for _, p in t5.trainable_parameters()
    )
    assert difference == (768 + 1) * (2560 - 2048)  # weight and bias of the projection
    assert count(t5.bridge.llm.parameters()) == pytest.approx(2.85e9, rel=0.03)  # FlanT5-XL
