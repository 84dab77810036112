"""A toy model and toy run for the training-loop tests.

Imported by the tests, and also run as a script: as a subprocess that the resume test kills with
SIGKILL, and as the ranks of the 2-process DDP test (which set torchrun's RANK/WORLD_SIZE/... themselves).
The script writes `result.json` (logged losses, final trainable params) into its run folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, when run as a script

from blip2_core.fileio import atomic_write_text  # noqa: E402
from blip2_core.train import DistEnv, InMemoryData, TrainConfig, TrainResult, train  # noqa: E402

IN_DIM = 8


@dataclass
class ToyOutput:
    loss: torch.Tensor
    loss_l1: torch.Tensor
    prediction: torch.Tensor  # not a loss: the loop must ignore it


class ToyModel(nn.Module):
    """A frozen 'encoder' and a trainable head with LayerNorm and dropout; counts samples in a buffer."""

    def __init__(self, dropout: float = 0.1, width: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Linear(IN_DIM, IN_DIM).requires_grad_(False)
        self.fc1 = nn.Linear(IN_DIM, width)
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, 1)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.grad_checkpointing = enabled

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.norm(self.fc1(h))))).squeeze(-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> ToyOutput:
        h = self.encoder(batch["x"])  # (B, IN_DIM)
        if self.grad_checkpointing and self.training:
            pred = checkpoint(self._head, h, use_reentrant=False)
        else:
            pred = self._head(h)
        if self.training:
            self.seen += len(pred)
        err = pred.float() - batch["y"]
        return ToyOutput(loss=(err**2).mean(), loss_l1=err.abs().mean().detach(), prediction=pred)


def toy_columns(num_samples: int = 48, seed: int = 123) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, IN_DIM, generator=g)
    w = torch.randn(IN_DIM, generator=g)
    return {"x": x, "y": torch.sin(x @ w) + 0.05 * torch.randn(num_samples, generator=g)}


def toy_model(dropout: float = 0.1, seed: int = 7) -> ToyModel:
    torch.manual_seed(seed)
    return ToyModel(dropout)


class SlowSteps:
    """Sleeps after each logged step so that a test can kill the run mid-training."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        time.sleep(self.seconds)


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_toy(args: argparse.Namespace, callbacks: list | None = None) -> tuple[ToyModel, TrainResult]:
    env = DistEnv.from_env()
    model = toy_model(args.dropout)
    data = InMemoryData(
        toy_columns(args.samples), args.batch_size, seed=3, rank=env.rank, world_size=env.world_size
    )
    cfg = TrainConfig(
        out_dir=args.out, steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.warmup,
        grad_accum=args.grad_accum, clip_grad_norm=1.0, log_every=1, ckpt_every=args.ckpt_every,
        keep_last=2, checkpoint_buffers=("seen",), seed=11, device="cpu",
    )  # fmt: skip
    return model, train(model, data, cfg, callbacks=callbacks)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--ckpt-every", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--sleep", type=float, default=0.0)
    return parser.parse_args(argv)


def result_record(model: ToyModel, result: TrainResult) -> dict:
    return {
        "step": result.step,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "losses": {str(step): metrics["loss"] for step, metrics in result.history},
        "params": {n: p.tolist() for n, p in trainable_params(model).items()},
        "seen": int(model.seen),
    }


def main() -> None:
    torch.set_num_threads(1)
    args = parse_args()
    model, result = run_toy(args, callbacks=[SlowSteps(args.sleep)] if args.sleep else None)
    if DistEnv.from_env().is_main:
        atomic_write_text(Path(args.out) / "result.json", json.dumps(result_record(model, result)))


if __name__ == "__main__":
    main()
