"""Process-group helpers that also work in a single process with no group initialised."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B, ...) from every rank along dim 0 -> (world * B, ...), rank order.

    Gradients flow only into this rank's slice (the other slices are detached copies); DDP's gradient
    averaging then combines the ranks. Every rank must pass the same shape.
    """
    world = get_world_size()
    if world == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x.detach().contiguous())
    gathered[get_rank()] = x
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, without gradients (ids, masks, sampling weights)."""
    return all_gather_with_local_grad(x).detach()


def all_gather_rows(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's rows along dim 0, in rank order, when ranks hold different row counts.

    `sizes[r]` is rank r's row count, known to every rank (e.g. from `metrics.retrieval.owned_rows`);
    `x` is (sizes[rank], ...). Parts are padded to the largest for the collective, then trimmed.
    """
    world = get_world_size()
    if len(sizes) != world or x.shape[0] != sizes[get_rank()]:
        raise ValueError(f"all_gather_rows: {x.shape[0]} rows on rank {get_rank()}, sizes {list(sizes)}")
    if world == 1:
        return x
    padded = x.new_zeros((max(1, *sizes), *x.shape[1:]))  # at least one row: no empty collective
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


@contextlib.contextmanager
def torchrun_process_group(device: torch.device) -> Iterator[None]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...) for the block:
    nccl on CUDA, gloo on CPU. Nothing to join in a single process or when a group already exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or is_distributed():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
