"""CapFilt throughput: our batched pipeline against a naive per-image loop, same images, same models.

Naive (what a first script does): per image, BLIP's `generate(num_return_sequences=10, do_sample=True)`,
then CLIP scores that image's 11 texts. Batched (`blip2_core.capfilt.run_capfilt`): B images through
each ViT once, one `generate` for all B*10 captions, one CLIP text pass for the batch.

    python benchmarks/capfilt_throughput.py                  # CPU: configs tiny and mid, random weights
    python benchmarks/capfilt_throughput.py --gpu            # device: BLIP-large + ViT-L/14 shapes, bf16

The GPU mode needs only torch + transformers (no open_clip): its ranker is transformers' CLIPModel with
ViT-L/14 dimensions. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "blip2_core")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import capfilt_fixtures as fx  # noqa: E402

from blip2_core import capfilt as cf  # noqa: E402

CPU_CONFIGS = {"tiny": (fx.TINY_CAPTIONER, fx.TINY_RANKER), "mid": (fx.MID_CAPTIONER, fx.MID_RANKER)}


@dataclass(frozen=True)
class Measurement:
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    def __add__(self, other: Measurement) -> Measurement:
        return Measurement(self.images + other.images, self.seconds + other.seconds)


# ------------------------------------------------------------------------------------------ naive loop


def naive_capfilt(
    images: Sequence[Image.Image], captions: Sequence[str], cfg: cf.CapFiltConfig, models
) -> list:
    """One image at a time: BLIP generate with 10 return sequences, then CLIP on its 11 texts."""
    return [_naive_one(image, caption, cfg, models) for image, caption in zip(images, captions, strict=True)]


@torch.inference_mode()
def _naive_one(image: Image.Image, web_caption: str, cfg: cf.CapFiltConfig, models) -> tuple[str, ...]:
    captioner, ranker = models.captioner, models.ranker
    inputs = captioner.processor(images=image, text=cfg.prompt, return_tensors="pt").to(cfg.device)
    tokens = captioner.model.generate(
        pixel_values=inputs.pixel_values.to(cfg.torch_dtype),
        input_ids=inputs.input_ids,
        do_sample=True,
        num_return_sequences=cfg.num_captions,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        repetition_penalty=cfg.repetition_penalty,
        min_length=cfg.min_length,
        max_length=cfg.max_length,
    )
    texts = captioner.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    texts = [t[len(cfg.prompt) :].strip() for t in texts] + [web_caption]
    pixels = ranker.preprocess(image).unsqueeze(0).to(cfg.device, cfg.torch_dtype)
    image_features = F.normalize(ranker.model.encode_image(pixels).float(), dim=-1)  # (1, E)
    text_features = F.normalize(
        ranker.model.encode_text(ranker.tokenizer(texts).to(cfg.device)).float(), dim=-1
    )
    scores = (text_features @ image_features[0]).tolist()  # (11,)
    order = sorted(range(len(texts)), key=lambda i: -scores[i])
    return tuple(texts[i] for i in order[: cfg.keep_top])


# ------------------------------------------------------------------------------------------------ timing


def run_batched(samples: Sequence[cf.Sample], cfg: cf.CapFiltConfig, models) -> list[cf.CapFiltRecord]:
    return list(cf.run_capfilt(samples, cfg, models))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], n_images: int, device: str) -> Measurement:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return Measurement(n_images, time.perf_counter() - start)


def compare(
    name: str, cfg: cf.CapFiltConfig, models, n_images: int, n_naive: int, mode: str
) -> dict[str, object]:
    images = [fx.noise_image(i, size=256) for i in range(n_images)]
    captions = [f"a web caption number {i} about a photo" for i in range(n_images)]
    samples = list(zip([f"{i:06d}" for i in range(n_images)], images, captions, strict=True))
    # Warm-up: first calls pay for allocator growth, kernel selection and lazy imports.
    list(cf.run_capfilt(samples[: cfg.batch_size], cfg, models))
    naive_capfilt(images[:1], captions[:1], cfg, models)

    # Alternate the two per batch-sized chunk, so that both see the same load on a shared machine.
    batched, naive = Measurement(0, 0.0), Measurement(0, 0.0)
    naive_per_chunk = max(1, round(cfg.batch_size * n_naive / n_images))
    for start in range(0, n_images, cfg.batch_size):
        chunk = samples[start : start + cfg.batch_size]
        few = slice(start, min(start + naive_per_chunk, start + len(chunk)))
        batched += timed(partial(run_batched, chunk, cfg, models), len(chunk), cfg.device)
        naive += timed(
            partial(naive_capfilt, images[few], captions[few], cfg, models), len(images[few]), cfg.device
        )
    return {
        "mode": mode,
        "config": name,
        "device": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu",
        "dtype": str(cfg.torch_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "batch_size": cfg.batch_size,
        "images_batched": batched.images,
        "images_naive": naive.images,
        "batched_images_per_s": round(batched.images_per_s, 3),
        "naive_images_per_s": round(naive.images_per_s, 3),
        "speedup": round(batched.images_per_s / naive.images_per_s, 2),
    }


# --------------------------------------------------------------------------------------------- CPU mode


def cpu_models(name: str, root: Path, batch_size: int) -> tuple[cf.CapFiltConfig, cf.CapFiltModels]:
    """Save random models in the on-disk formats and load them through CapFilt's own loader."""
    captioner_shape, ranker_shape = CPU_CONFIGS[name]
    fx.save_captioner(root / name / "captioner", captioner_shape)
    clip_name = f"capfilt-bench-{name}"
    config_path, weights_path = fx.save_ranker(root / name / "ranker", ranker_shape, name=clip_name)
    ranker = cf.RankerConfig(model=clip_name, weights=str(weights_path), model_config=str(config_path))
    cfg = cf.CapFiltConfig(captioner=str(root / name / "captioner"), ranker=ranker, batch_size=batch_size)
    return cfg, cf.load_capfilt_models(cfg)


# --------------------------------------------------------------------------------------------- GPU mode


class HFClip(torch.nn.Module):
    """transformers' CLIPModel behind open_clip's encode_image / encode_text interface."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_text_features(input_ids=tokens))


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns an output object with the projected features as pooler_output; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def clip_preprocess(size: int) -> Callable[[Image.Image], torch.Tensor]:
    def preprocess(image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((size, size), Image.BICUBIC)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(size, size, 3).permute(2, 0, 1).float() / 255  # (3, H, W)
        return (pixels - CLIP_MEAN) / CLIP_STD

    return preprocess


def clip_config(large: bool):
    from transformers import CLIPConfig

    if large:  # ViT-L/14 at 224 px, as open_clip's ViT-L-14
        vision = {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
        }
        vision |= {"image_size": 224, "patch_size": 14}
        text = {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        }
        return CLIPConfig(text_config=text | {"vocab_size": 49408}, vision_config=vision, projection_dim=768)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    vision |= {"image_size": 32, "patch_size": 8}
    return CLIPConfig(text_config=text | {"vocab_size": 49408}, vision_config=vision, projection_dim=16)


def gpu_models(cfg: cf.CapFiltConfig, large: bool) -> cf.CapFiltModels:
    """Random BLIP-large-shaped captioner + ViT-L/14-shaped transformers CLIP, built on the device."""
    from transformers import CLIPModel

    shape = fx.BLIP_LARGE_CAPTIONER if large else fx.TINY_CAPTIONER
    with torch.device(cfg.device):
        captioner_model, processor = fx.build_captioner(shape)
        clip_model = CLIPModel(clip_config(large))
    captioner_model = captioner_model.to(cfg.torch_dtype).eval().requires_grad_(False)
    clip = HFClip(clip_model.to(cfg.torch_dtype).eval().requires_grad_(False))
    # CLIP's BPE vocabulary ships with open_clip only; a WordPiece one of the same size costs the same.
    clip_tokenizer = fx.build_blip_tokenizer(49408)

    def tokenize(texts: list[str]) -> torch.Tensor:
        return clip_tokenizer(
            texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids

    image_size = clip_model.config.vision_config.image_size
    ranker = cf.Ranker(clip, clip_preprocess(image_size), tokenize, cfg.device, cfg.torch_dtype)
    return cf.CapFiltModels(captioner=cf.Captioner(captioner_model, processor, cfg), ranker=ranker)


def gpu_cfg(device: str, batch_size: int) -> cf.CapFiltConfig:
    # Models are built in memory, so the config's paths are never read.
    return cf.CapFiltConfig(
        captioner="in-memory", ranker=cf.RankerConfig(), device=device, batch_size=batch_size
    )


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="BLIP-large + ViT-L/14 shapes in bf16 on CUDA")
    parser.add_argument(
        "--smoke", action="store_true", help="with --gpu: tiny shapes on any device (a check)"
    )
    parser.add_argument("--configs", default="tiny,mid", help="CPU mode: comma-separated, of tiny, mid")
    parser.add_argument("--images", type=int, default=None, help="images for the batched run")
    parser.add_argument("--naive-images", type=int, default=None, help="images for the naive loop")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.gpu:
        run_gpu(args)
    else:
        run_cpu(args)


def run_cpu(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-") as tmp:
        for name in args.configs.split(","):
            batch_size = args.batch_size or 16
            n_images = args.images or (64 if name == "tiny" else 32)
            cfg, models = cpu_models(name, Path(tmp), batch_size)
            n_naive = min(args.naive_images or n_images // 2, n_images)
            print(json.dumps(compare(name, cfg, models, n_images, n_naive, "cpu")), flush=True)


def run_gpu(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.smoke and device != "cuda":
        sys.exit("--gpu needs a CUDA device (use --smoke to check the code path on CPU)")
    batch_size = args.batch_size or (4 if args.smoke else 64)
    n_images = args.images or (8 if args.smoke else 256)
    n_naive = min(args.naive_images or math.ceil(n_images / 8), n_images)
    cfg = gpu_cfg(device, batch_size)
    models = gpu_models(cfg, large=not args.smoke)
    name = "smoke" if args.smoke else "blip-large+vit-l-14"
    print(json.dumps(compare(name, cfg, models, n_images, n_naive, "gpu")), flush=True)


if __name__ == "__main__":
    main()
