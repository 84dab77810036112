"""Stage-1 training step: time and peak memory, ours (SDPA attention) against an eager reference.

The reference runs the same model with attention written out as matmul -> masked softmax -> matmul,
the straightforward implementation of the same math. Each (config, implementation) runs in a fresh
process so that peak-memory figures do not leak into each other.

    .venv/bin/python benchmarks/stage1_step.py --steps 5
    .venv/bin/python benchmarks/stage1_step.py --steps 10 --configs mid --device cuda

CPU memory is the growth of the process's peak resident set over the steps (ru_maxrss minus the
resident set before the first step); CUDA memory is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import resource
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Q-Former sizes on top of the tiny 64 px image tower; "mid" is BERT-small-like with 32 queries.
CONFIGS = {
    "tiny": dict(qformer={}, batch=8, text_len=16),
    "mid": dict(
        qformer=dict(
            hidden_size=256,
            num_hidden_layers=6,
            num_attention_heads=8,
            intermediate_size=1024,
            num_query_tokens=32,
        ),
        batch=16,
        text_len=32,
    ),
}


def eager_attend(q, k, v, mask, dropout_p):
    """(B, H, L, Dh) attention spelled out; mask is additive (0 = may attend), as `attend` receives it."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, H, L, S)
    if mask is not None:
        scores = scores + mask
    probs = torch.nn.functional.dropout(scores.softmax(dim=-1), p=dropout_p)
    return probs @ v


def _batch(cfg, batch: int, text_len: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    ids = torch.randint(1000, 20000, (batch, text_len), generator=g)
    ids[:, 0] = cfg.qformer.cls_token_id
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[: batch // 2, text_len * 3 // 4 :] = 0  # half the captions are padded
    images = torch.randn(batch, 3, size, size, generator=g)
    return {"images": images.to(device), "text_ids": (ids * mask).to(device), "text_mask": mask.to(device)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(config_name: str, impl: str, steps: int, device: str, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    import blip2_core.qformer as qformer_module
    from blip2_core.config import load_preset
    from blip2_core.stage1 import Blip2Stage1

    if impl == "eager":
        qformer_module.attend = eager_attend
    spec = CONFIGS[config_name]
    tiny = load_preset("tiny")
    cfg = dataclasses.replace(tiny, qformer=dataclasses.replace(tiny.qformer, **spec["qformer"]))
    torch.manual_seed(0)
    model = Blip2Stage1(cfg).to(device).train()
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-4, betas=(0.9, 0.98))
    batch = _batch(cfg, spec["batch"], spec["text_len"], device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(batch).loss.backward()
        optimizer.step()

    step()  # warm-up: allocator, lazy init
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    queue.put((statistics.median(times), peak, trainable))


def measure(config_name: str, impl: str, steps: int, device: str, threads: int):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_one, args=(config_name, impl, steps, device, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--configs", default="tiny,mid", help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per implementation")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    mem_name = "peak MiB (CUDA alloc)" if args.device == "cuda" else "peak RSS growth MiB"
    print(
        f"stage-1 step, device={args.device}, threads={args.threads}, steps={args.steps} (median), "
        f"best of {args.repeats} alternating runs"
    )
    header = f"{'config':<6} {'params':>9} {'impl':<6} {'step s':>8} {mem_name:>20}"
    print(header)
    for name in args.configs.split(","):
        # Alternate the two implementations and keep each one's best run: on a shared machine the
        # load changes between runs, and the minimum is the least disturbed figure.
        runs = {"sdpa": [], "eager": []}
        for _ in range(args.repeats):
            for impl in ("eager", "sdpa"):
                runs[impl].append(measure(name, impl, args.steps, args.device, args.threads))
        ours, ref = (min(runs[impl]) for impl in ("sdpa", "eager"))
        for impl, (seconds, peak, params) in (("sdpa", ours), ("eager", ref)):
            print(f"{name:<6} {params / 1e6:>8.2f}M {impl:<6} {seconds:>8.3f} {peak:>20.1f}")
        mem_ratio = ours[1] / ref[1] if ref[1] > 0 else float("nan")
        print(f"{name:<6} ratio ours/eager: time {ours[0] / ref[0]:.2f}x, memory {mem_ratio:.2f}x")


if __name__ == "__main__":
    main()
