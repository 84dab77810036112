"""The training loop shared by stage 1, stage 2 and fine-tuning; it knows nothing about BLIP-2 itself.

A model is any nn.Module whose `forward(batch)` returns an object with a scalar `loss` tensor (the one
optimised) and optionally more scalar tensors in fields named `loss_*` (logged). The loop adds what a
long run needs: a per-iteration warm-up + cosine schedule, gradient accumulation, clipping, mixed
precision, DDP under torchrun, TensorBoard, callbacks, atomic checkpoints and exact resumption.

Distributed runs are launched by torchrun (or anything that sets the same variables): RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. With WORLD_SIZE > 1 the loop joins the process
group (nccl on GPU, gloo on CPU) and wraps the model in DistributedDataParallel; each rank's data
source must already be split for that rank. All ranks share `out_dir`; only rank 0 writes to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from blip2_core import checkpoints
from blip2_core.optim import WarmupCosineSchedule, adamw
from blip2_core.optim import param_groups as default_param_groups

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the paper's stage-1 recipe (SPEC.md, "Pretraining recipe")."""

    out_dir: str  # run folder: checkpoints/ and tb/ go inside
    steps: int = 250_000  # optimizer steps (iterations), not micro-batches
    lr: float = 1e-4  # peak lr
    min_lr: float = 0.0  # cosine floor; 5e-5 in stage 2
    warmup_steps: int = 2000
    betas: tuple[float, float] = (0.9, 0.98)  # fine-tuning uses (0.9, 0.999)
    weight_decay: float = 0.05  # not on biases, norms or other 1-D params (see optim.py)
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_grad_norm: float | None = None
    precision: Precision = "fp32"  # "fp16" adds a GradScaler; autocast runs on the model's device type
    activation_checkpointing: bool = False
    find_unused_parameters: bool = False  # DDP: set when some trainable params skip the forward
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when CUDA is available, else cpu
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last: int | None = 3
    checkpoint_buffers: tuple[str, ...] = ()  # buffers saved beside the trainable params
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in _AMP_DTYPES:
            raise ValueError(f"TrainConfig.precision: {self.precision!r} is not one of {sorted(_AMP_DTYPES)}")
        for name in ("steps", "grad_accum", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig.min_lr {self.min_lr} must lie in [0, lr={self.lr}]")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"TrainConfig.keep_last must be None or at least 1, got {self.keep_last}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.out_dir) / "checkpoints"


@dataclass(frozen=True)
class TrainResult:
    step: int  # optimizer steps done, counting those before a resume
    loss: float | None  # last logged loss (averaged over ranks and the log window)
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # logged metrics of this call
    last_checkpoint: Path | None = None
    resumed_from: Path | None = None


# ----------------------------------------------------------------------------- data sources


@runtime_checkable
class DataSource(Protocol):
    """Yields batches; iterating again starts the next epoch. Its state is the position reached so far,
    counting only batches already handed out, so that a checkpoint resumes at the next unseen batch."""

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class InMemoryData:
    """Batches of columns held in memory (tests, tiny runs): the reference DataSource.

    Every epoch is a fresh permutation drawn from (seed, epoch), so the order is the same on every
    rank and in every resumed run. Rank r takes every world_size-th sample of it; the tail that does
    not fill a batch on every rank is dropped. Position = (epoch, batches handed out this epoch).
    """

    def __init__(
        self,
        columns: Mapping[str, torch.Tensor],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        sizes = {name: len(col) for name, col in columns.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"InMemoryData: columns need one common, nonzero length, got {sizes}")
        self.columns = dict(columns)
        self.num_samples = next(iter(sizes.values()))
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = self.num_samples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"InMemoryData: {self.num_samples} samples cannot fill one batch of "
                f"{batch_size} on each of {world_size} ranks"
            )
        self.epoch, self.index = 0, 0

    def _rank_order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        kept = self.batches_per_epoch * self.batch_size * self.world_size
        return torch.randperm(self.num_samples, generator=generator)[:kept][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._rank_order()
        while self.index < self.batches_per_epoch:
            idx = order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
            self.index += 1  # before the yield: the state counts the batch as handed out
            yield {name: col[idx] for name, col in self.columns.items()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"InMemoryData.load_state_dict: saved {key}={state[key]}, "
                    f"this source has {key}={getattr(self, key)}"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def _endless(data: DataSource) -> Iterator[Any]:
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"data source {type(data).__name__} yielded no batches in an epoch")


# ----------------------------------------------------------------------------- distributed setup


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistEnv:
        """Read torchrun's variables; absent ones mean a single process."""
        env = cls(
            *(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
        )
        if not 0 <= env.rank < env.world_size:
            raise ValueError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}")
        return env

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(name: str, env: DistEnv) -> torch.device:
    if name != "auto":
        return torch.device(name)
    return torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")


def _init_process_group(env: DistEnv, device: torch.device) -> bool:
    """Join the process group unless there is nothing to join; True when this call created it."""
    if not env.distributed or dist.is_initialized():
        return False
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={env.world_size} but {', '.join(missing)} not set; launch with torchrun"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return True


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- model plumbing


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the length of its first non-scalar tensor (for samples/s only)."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    values = (
        batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, list | tuple) else ()
    )
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return len(value)
    return 1


def output_losses(output: Any) -> dict[str, torch.Tensor]:
    """`loss` and every `loss_*` scalar of a model output (a dataclass or a plain object)."""
    fields = (
        {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
        if dataclasses.is_dataclass(output)
        else vars(output)
    )
    loss = fields.get("loss")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            f"model output {type(output).__name__} needs a scalar tensor `loss`, got {type(loss).__name__}"
        )
    return {
        name: value
        for name, value in fields.items()
        if (name == "loss" or name.startswith("loss_"))
        and isinstance(value, torch.Tensor)
        and value.numel() == 1
    }


def _set_grad_checkpointing(model: nn.Module, enabled: bool) -> None:
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(enabled)
    elif enabled:
        raise ValueError(
            f"activation_checkpointing is on but {type(model).__name__} has no set_grad_checkpointing"
        )


# ----------------------------------------------------------------------------- metrics


class _Meter:
    """Sums losses on the device between log steps, so only a log step waits for the GPU."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = self.samples = 0
        self.started = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], samples: int) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0) + value.float()
        self.steps += 1
        self.samples += samples

    def flush(self, env: DistEnv) -> dict[str, float]:
        names = sorted(self.sums)
        means = torch.stack([self.sums[n] for n in names]) / self.steps
        if env.distributed:
            dist.all_reduce(means)
            means /= env.world_size
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        metrics = dict(zip(names, means.tolist(), strict=True))
        metrics["samples_per_s"] = self.samples * env.world_size / elapsed
        self._reset()
        return metrics


class Callback:
    """Hooks the flow uses (e.g. to write metrics and checkpoints to the catalog); rank 0 only.
    Subclass it or pass any object with either method."""

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass


# ----------------------------------------------------------------------------- the loop


class _Trainer:
    def __init__(self, model, data, cfg: TrainConfig, env: DistEnv, device, callbacks, groups) -> None:
        self.cfg, self.env, self.device, self.data = cfg, env, device, data
        self.callbacks = list(callbacks or [])
        self.model = model.to(device)
        _set_grad_checkpointing(self.model, cfg.activation_checkpointing)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = adamw(
            groups or default_param_groups(self.model, cfg.weight_decay), cfg.lr, cfg.betas
        )
        self.schedule = WarmupCosineSchedule(self.optimizer, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self.history: list[tuple[int, dict[str, float]]] = []
        self.last_checkpoint: Path | None = None
        self.writer = None

    def resume(self) -> Path | None:
        path = checkpoints.latest_checkpoint(self.cfg.checkpoint_dir) if self.env.is_main else None
        if self.env.distributed:  # every rank must load the checkpoint rank 0 chose
            box = [path]
            dist.broadcast_object_list(box, src=0)
            path = box[0]
        if path is None:
            return None
        loaded = checkpoints.load_checkpoint(
            self.model, path, self.optimizer, self.schedule, self.scaler,
            rank=self.env.rank, world_size=self.env.world_size,
        )  # fmt: skip
        self.step = loaded.step
        if loaded.data_state is not None:
            self.data.load_state_dict(loaded.data_state)
        self.last_checkpoint = path
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def run(self) -> TrainResult:
        cfg = self.cfg
        ddp = self._wrap_ddp()
        batches = _endless(self.data)
        meter = _Meter()
        if self.env.is_main and self.step < cfg.steps:
            self.writer = _summary_writer(cfg, purge_step=self.step + 1)
        try:
            while self.step < cfg.steps:
                lr = self.schedule.lr
                losses, samples = self._forward_backward(ddp, batches)
                grad_norm = self._optimizer_step()
                self.step += 1
                if grad_norm is not None:
                    losses["grad_norm"] = grad_norm
                meter.add(losses, samples)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log(meter.flush(self.env) | {"lr": lr})
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self._checkpoint()
        finally:
            batches.close()  # stops the DataLoader workers now, not when a traceback lets go of them
            if self.writer is not None:
                self.writer.close()
        last_loss = self.history[-1][1]["loss"] if self.history else None
        return TrainResult(self.step, last_loss, self.history, self.last_checkpoint)

    def _wrap_ddp(self) -> nn.Module:
        if not self.env.distributed:
            return self.model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            self.model, device_ids=device_ids, find_unused_parameters=self.cfg.find_unused_parameters
        )

    def _forward_backward(self, ddp: nn.Module, batches) -> tuple[dict[str, torch.Tensor], int]:
        """grad_accum micro-batches; DDP all-reduces gradients only on the last of them."""
        cfg, amp_dtype = self.cfg, _AMP_DTYPES[self.cfg.precision]
        totals: dict[str, torch.Tensor] = {}
        samples = 0
        for micro in range(cfg.grad_accum):
            batch = _to_device(next(batches), self.device)
            samples += _batch_size(batch)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or ddp is self.model else ddp.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    losses = output_losses(ddp(batch))
                self.scaler.scale(losses["loss"] / cfg.grad_accum).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0) + value.detach().float() / cfg.grad_accum
        return totals, samples

    def _optimizer_step(self) -> torch.Tensor | None:
        grad_norm = None
        if self.cfg.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            grad_norm = nn.utils.clip_grad_norm_(self.trainable, self.cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        return grad_norm

    def _log(self, metrics: dict[str, float]) -> None:
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss is {metrics['loss']} at step {self.step}")
        if not self.env.is_main:
            return
        self.history.append((self.step, metrics))
        log.info(
            "step %d/%d | loss %.4f | lr %.3e | %.1f samples/s",
            *(self.step, self.cfg.steps, metrics["loss"], metrics["lr"], metrics["samples_per_s"]),
        )
        for name, value in metrics.items():
            self.writer.add_scalar(f"train/{name}", value, self.step)
        for callback in self.callbacks:
            if hasattr(callback, "on_metrics"):
                callback.on_metrics(self.step, metrics)

    def _checkpoint(self) -> None:
        state = checkpoints.rank_state(self.data.state_dict())
        rank_states = [state]
        if self.env.distributed:
            rank_states = [None] * self.env.world_size
            dist.all_gather_object(rank_states, state)
        if not self.env.is_main:
            return
        self.writer.flush()  # TensorBoard events up to this step are on disk before the checkpoint is
        path = checkpoints.save_checkpoint(
            self.cfg.checkpoint_dir, self.step, self.model,
            optimizer=self.optimizer, scheduler=self.schedule, scaler=self.scaler,
            rank_states=rank_states, buffers=self.cfg.checkpoint_buffers, keep_last=self.cfg.keep_last,
        )  # fmt: skip
        self.last_checkpoint = path
        for callback in self.callbacks:
            if hasattr(callback, "on_checkpoint"):
                callback.on_checkpoint(self.step, path)


def _summary_writer(cfg: TrainConfig, purge_step: int):
    # Imported here: tensorboard is slow to import and only rank 0 needs it.
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events that a killed run logged after its last checkpoint.
    return SummaryWriter(log_dir=str(Path(cfg.out_dir) / "tb"), purge_step=purge_step)


def train(
    model: nn.Module,
    data: DataSource,
    cfg: TrainConfig,
    callbacks: Sequence[Callback] | None = None,
    resume: bool = True,
    param_groups: list[dict] | None = None,
) -> TrainResult:
    """Train `model` on `data` for `cfg.steps` optimizer steps; resume from the latest checkpoint if any.

    `param_groups` (from `optim.param_groups`) overrides the default groups, e.g. to apply layer-wise
    lr decay to the ViT when fine-tuning. Module train/eval modes are left as the model set them, so
    frozen towers that the model put in eval() stay there. Returns the final step and, on rank 0, the
    metrics logged in this call.
    """
    env = DistEnv.from_env()
    data_world = getattr(data, "world_size", env.world_size)
    if data_world != env.world_size:
        raise ValueError(f"data source is split for world_size={data_world} but WORLD_SIZE={env.world_size}")
    device = _resolve_device(cfg.device, env)
    owns_group = _init_process_group(env, device)
    try:
        _seed_everything(cfg.seed + env.rank)  # ranks draw different dropout masks
        trainer = _Trainer(model, data, cfg, env, device, callbacks, param_groups)
        resumed_from = trainer.resume() if resume else None
        return dataclasses.replace(trainer.run(), resumed_from=resumed_from)
    finally:
        if owns_group:
            dist.destroy_process_group()
