"""AdamW parameter groups and the per-iteration warm-up + cosine learning-rate schedule.

Weight decay rule: a parameter is decayed when it has two or more dimensions (linear, attention and
embedding matrices, the 32 query embeddings). One-dimensional and scalar parameters are not: biases,
LayerNorm/BatchNorm weights and biases, the ITC temperature. The paper says "not on biases and norms";
the dimension test catches both without relying on how a module names its norms.

Layer-wise lr decay (fine-tuning the ViT): every group carries an `lr_scale`, and the schedule sets
`group["lr"] = schedule_lr * lr_scale` at every iteration. The reference code wrote `lr_scale` but no
scheduler ever read it, so its layer decay did nothing; here it is applied for real.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

LayerIdFn = Callable[[str], int | None]


def is_decayed(param: torch.Tensor) -> bool:
    return param.ndim >= 2


def layer_scale(layer_id: int | None, layer_decay: float, num_layers: int) -> float:
    """lr multiplier for a parameter in layer `layer_id` of a tower with `num_layers` blocks.

    Layer ids follow BEiT: 0 = patch/position embeddings, i + 1 = block i, num_layers + 1 = whatever
    sits after the last block. The top gets the full lr and each layer below it `layer_decay` times
    less. None means the parameter is outside the decayed tower (e.g. the Q-Former): full lr.
    """
    if layer_id is None:
        return 1.0
    return layer_decay ** (num_layers + 1 - layer_id)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    layer_id_fn: LayerIdFn | None = None,
    num_layers: int | None = None,
) -> list[dict]:
    """Split the trainable parameters into AdamW groups by (decayed or not, lr_scale).

    Frozen parameters (requires_grad False) are left out. Each group holds `params`, `param_names`,
    `weight_decay` and `lr_scale`; `WarmupCosineSchedule` reads `lr_scale`.
    """
    if layer_decay is not None and (layer_id_fn is None or num_layers is None):
        raise ValueError("param_groups: layer_decay needs both layer_id_fn and num_layers")
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = 1.0
        if layer_decay is not None:
            scale = layer_scale(_checked_layer_id(layer_id_fn, name, num_layers), layer_decay, num_layers)
        decayed = is_decayed(param)
        group = groups.setdefault(
            (decayed, scale),
            {
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if decayed else 0.0,
                "lr_scale": scale,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ValueError(f"param_groups: {type(model).__name__} has no trainable parameters")
    return list(groups.values())


def _checked_layer_id(layer_id_fn: LayerIdFn, name: str, num_layers: int) -> int | None:
    layer_id = layer_id_fn(name)
    if layer_id is not None and not 0 <= layer_id <= num_layers + 1:
        raise ValueError(
            f"layer_id_fn gave layer {layer_id} for {name!r}; expected 0..{num_layers + 1} or None"
        )
    return layer_id


def adamw(groups: Iterable[dict], lr: float, betas: tuple[float, float] = (0.9, 0.98)) -> torch.optim.AdamW:
    """AdamW over `param_groups(...)`. Pretraining uses beta2 0.98 (the paper); fine-tuning 0.999."""
    return torch.optim.AdamW(list(groups), lr=lr, betas=betas)


def cosine_lr(step: int, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """lr for 0-based iteration `step`: linear warm-up to `peak_lr`, then cosine down to `min_lr`.

    Warm-up starts at peak_lr / warmup_steps rather than 0 so that the first iteration is not wasted.
    After `total_steps` the lr stays at the floor.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Sets every group's lr to `cosine_lr(step) * lr_scale`; call `step()` after each optimizer step."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        peak_lr: float,
        min_lr: float,
        warmup_steps: int,
        total_steps: int,
    ) -> None:
        if min_lr > peak_lr:
            raise ValueError(f"WarmupCosineSchedule: min_lr {min_lr} is above peak_lr {peak_lr}")
        self.optimizer = optimizer
        self.peak_lr, self.min_lr = peak_lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.last_step = 0
        self._apply()

    @property
    def lr(self) -> float:
        """The unscaled lr of the current iteration (what a group with lr_scale 1 uses)."""
        return cosine_lr(self.last_step, self.peak_lr, self.min_lr, self.warmup_steps, self.total_steps)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
