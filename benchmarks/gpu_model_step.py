"""Training-step throughput of the two BLIP-2 stages on one GPU: samples/s and model FLOPs utilisation.

    python benchmarks/gpu_model_step.py                 # ViT-g stage 1 and ViT-g + OPT-2.7B stage 2, bf16
    python benchmarks/gpu_model_step.py --cpu-smoke     # tiny configs on CPU: proves the script runs

Random weights (nothing downloads). The frozen ViT and LLM are cast to --dtype, the trainable part runs
under autocast. FLOPs of one training step are counted by torch.utils.flop_counter (matmuls/attention,
forward + backward); MFU = FLOPs / step time / the GPU's dense peak. Prints one JSON object.
The image tower is always `hf_interop.HFVisionEncoder`, a plain-PyTorch ViT with the dimensions of EVA
ViT-g/14 minus its last block (39 x 1408, 16 heads, MLP 6144), so the figures do not depend on open_clip
being installed (the GPU image has transformers and timm, not open_clip).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "blip2_core")]  # the package, and tiny_models' tokenizer

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
if not HAS_OPEN_CLIP:
    # blip2_core.vision imports open_clip at module level; it is only called when building that tower,
    # which this script then never does, so a placeholder module lets stage1/stage2 import.
    sys.modules["open_clip"] = types.ModuleType("open_clip")

from tiny_models import build_tokenizer  # noqa: E402

from blip2_core.config import load_preset  # noqa: E402
from blip2_core.hf_interop import HFVisionEncoder, ViTDims, retrieval_model  # noqa: E402
from blip2_core.llm_bridge import LLMBridge, hf_llm_config, llm_from_config  # noqa: E402
from blip2_core.stage2 import Blip2Stage2  # noqa: E402

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16/fp16 tensor-core peaks
CAPTION = "a photo of two green circles next to a yellow triangle on a table in a room"


def vision_dims(cfg, smoke: bool) -> ViTDims:
    if smoke:
        return ViTDims(
            width=cfg.vision.width, layers=2, heads=4, mlp=4 * cfg.vision.width, patch=8, image_size=64
        )
    return ViTDims(width=cfg.vision.width)  # EVA ViT-g/14 minus its last block


def build_stage1(cfg, dims: ViTDims, dtype: torch.dtype, device: str):
    with torch.device(device):
        model = retrieval_model(cfg, dims)  # Blip2Stage1's objectives with the plain-PyTorch ViT
    model.visual_encoder.to(dtype)
    return model


def build_stage2(cfg, dims: ViTDims, dtype: torch.dtype, device: str):
    with torch.device(device):
        llm = llm_from_config(hf_llm_config(cfg.llm), dtype=dtype)
        vision = HFVisionEncoder(dims, dtype=dtype)
        bridge = LLMBridge(
            llm, build_tokenizer("opt"), cfg.qformer.hidden_size, max_text_len=cfg.llm.max_text_len
        )
        return Blip2Stage2(cfg, bridge=bridge, visual_encoder=vision)


def stage1_batch(cfg, batch: int, image_size: int, device: str) -> dict:
    text_ids = torch.randint(1000, 30000, (batch, cfg.qformer.max_text_len), device=device)
    text_ids[:, 0] = cfg.qformer.cls_token_id
    return {
        "images": torch.randn(batch, 3, image_size, image_size, device=device),
        "text_ids": text_ids,
        "text_mask": torch.ones_like(text_ids),
    }


def stage2_batch(batch: int, image_size: int, device: str) -> dict:
    return {
        "images": torch.randn(batch, 3, image_size, image_size, device=device),
        "captions": [CAPTION] * batch,
    }


def time_steps(model, batch: dict, warmup: int, steps: int, device: str, autocast_dtype) -> dict:
    optimizer = torch.optim.AdamW(
        [p for _, p in model.trainable_parameters()], lr=1e-5, fused=device == "cuda"
    )
    model.train()

    def step():
        with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=device == "cuda"):
            loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    return {"step_s": seconds, "flops_per_step": counter.get_total_flops()}


def report(name: str, result: dict, batch: int, peak: float | None) -> dict:
    achieved = result["flops_per_step"] / result["step_s"]
    return {
        "stage": name,
        "batch": batch,
        "step_s": round(result["step_s"], 4),
        "samples_per_s_per_gpu": round(batch / result["step_s"], 2),
        "tflops_per_step": round(result["flops_per_step"] / 1e12, 3),
        "achieved_tflops": round(achieved / 1e12, 2),
        "mfu": round(achieved / peak, 4) if peak else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny configs on CPU")
    parser.add_argument("--batch-stage1", type=int, default=64)
    parser.add_argument("--batch-stage2", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = parser.parse_args()

    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = load_preset("paper-vitg-opt2.7b")
    if smoke:
        torch.set_num_threads(1)
        tiny = load_preset("tiny")
        llm = dataclasses.replace(tiny.llm, vocab_size=512)
        cfg = dataclasses.replace(
            tiny, llm=llm, qformer=dataclasses.replace(tiny.qformer, num_hidden_layers=2)
        )
        args.batch_stage1 = args.batch_stage2 = 4
        args.warmup, args.steps = 1, 2
    dims = vision_dims(cfg, smoke)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in gpu), None)

    results = []
    model = build_stage1(cfg, dims, dtype, device)
    batch = stage1_batch(cfg, args.batch_stage1, dims.image_size, device)
    results.append(
        report(
            "stage1_vitg",
            time_steps(model, batch, args.warmup, args.steps, device, dtype),
            args.batch_stage1,
            peak,
        )
    )
    del model, batch
    if device == "cuda":
        torch.cuda.empty_cache()
    model = build_stage2(cfg, dims, dtype, device)
    batch = stage2_batch(args.batch_stage2, dims.image_size, device)
    results.append(
        report(
            "stage2_vitg_opt2.7b",
            time_steps(model, batch, args.warmup, args.steps, device, dtype),
            args.batch_stage2,
            peak,
        )
    )
    print(
        json.dumps(
            {
                "device": gpu,
                "dtype": str(dtype),
                "open_clip": HAS_OPEN_CLIP,
                "smoke": smoke,
                "vision_tower": "HFVisionEncoder (plain PyTorch)",
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
