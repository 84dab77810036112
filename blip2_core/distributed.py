"""Process-group helpers that also work in a single process with no group initialised."""

from __future__ import annotations

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
