"""Training checkpoints: trainable weights as safetensors, the rest of the run's state beside them.

A checkpoint is a folder `step-000100/` holding
    model.safetensors   trainable parameters (+ buffers named by the caller); frozen encoders and the
                        frozen LLM are never copied, so a stage-2 checkpoint is ~100M params, not billions
    train_state.pt      step, optimizer, schedule, grad scaler, and per rank the RNG states and data
                        position; plain tensors/dicts/lists/numbers/strings, so it loads with
                        torch.load(weights_only=True)
The folder is written under a `.tmp-` name, fsynced and renamed, so a folder named `step-*` is always
complete: a run killed mid-write leaves only a temp folder, which `latest_checkpoint` ignores. A `step-*`
folder whose files were damaged afterwards (a disk that filled or failed, a bad copy) is ignored too:
both files are checked for their structure (the safetensors header against the file size, the zip
directory at the end of train_state.pt) before a checkpoint is trusted.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class Stateful(Protocol):
    """Anything checkpointed through its state dict: optimizer, lr schedule, grad scaler."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    step: int
    data_state: dict | None  # this rank's data position, for the data source's load_state_dict


@dataclass(frozen=True)
class WeightsReport:
    missing: list[str]  # trainable parameters of the model that the file lacks
    unexpected: list[str]  # keys in the file that are neither trainable parameters nor listed buffers


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, so keys never carry a `module.` prefix."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def trainable_state(model: nn.Module, buffers: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable params and named buffers (copies: safetensors refuses shared memory)."""
    model = unwrap(model)
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    named_buffers = dict(model.named_buffers())
    for name in buffers:
        if name not in named_buffers:
            raise KeyError(f"checkpoint buffer {name!r} is not a buffer of {type(model).__name__}")
        state[name] = named_buffers[name]
    return {n: t.detach().to("cpu", copy=True).contiguous() for n, t in state.items()}


# ----------------------------------------------------------------------------- RNG and per-rank state


def capture_rng() -> dict:
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {
        "python": [version, list(mt_state), gauss],
        # numpy arrays are not allowed under weights_only loading, so the key array travels as a tensor
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    version, mt_state, gauss = rng["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def rank_state(data_state: dict | None) -> dict:
    """What differs between DDP ranks and must be restored per rank: RNG streams and data position."""
    return {"rng": capture_rng(), "data": data_state}


# ----------------------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Stateful | None = None,
    scaler: torch.amp.GradScaler | None = None,
    data_state: dict | None = None,
    rank_states: list[dict] | None = None,
    buffers: tuple[str, ...] = (),
    keep_last: int | None = None,
) -> Path:
    """Write `run_dir/step-{step:06d}/` atomically and return its path.

    `rank_states` (one `rank_state(...)` per DDP rank, gathered by the trainer) defaults to this
    process's RNG and `data_state`. `keep_last` deletes all but the newest K checkpoints afterwards.
    """
    if rank_states is not None and data_state is not None:
        raise ValueError("save_checkpoint: pass data_state or rank_states, not both")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_temp_dirs(run_dir)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        save_file(
            trainable_state(model, buffers), tmp / WEIGHTS_FILE, metadata={"buffers": json.dumps(buffers)}
        )
        state = _train_state(step, optimizer, scheduler, scaler, rank_states or [rank_state(data_state)])
        torch.save(state, tmp / STATE_FILE)
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last)
    return final


def _train_state(step: int, optimizer, scheduler, scaler, rank_states: list[dict]) -> dict:
    return {
        "format": FORMAT_VERSION,
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ranks": rank_states,
    }


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` onto `final`; an existing `final` (same step saved again) is moved aside first."""
    if final.exists():
        _delete_dir(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def _delete_dir(folder: Path) -> None:
    # Rename before deleting: a kill during rmtree must not leave a half `step-*` folder behind.
    doomed = folder.with_name(f".tmp-delete-{folder.name}-{os.getpid()}")
    os.rename(folder, doomed)
    shutil.rmtree(doomed)


def _remove_temp_dirs(run_dir: Path) -> None:
    """Temp folders left by a killed writer (only one process, rank 0, writes checkpoints)."""
    for path in run_dir.glob(".tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- finding


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint folders in `run_dir`, oldest first. Temp and foreign folders are ignored."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and checkpoint_problem(path) is None:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (missing or cut-short files), or None when it is whole.

    Cheap: reads the safetensors header and the zip directory, not the tensors.
    """
    weights, state = path / WEIGHTS_FILE, path / STATE_FILE
    if not weights.is_file() or not state.is_file():
        return f"{path}: {WEIGHTS_FILE} or {STATE_FILE} is missing"
    try:
        with open(weights, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != weights.stat().st_size:
            return f"{weights}: {weights.stat().st_size} bytes, its header describes {8 + header_len + end}"
        with zipfile.ZipFile(state) as zf:  # torch.save writes a zip; a cut-short one has no directory
            zf.namelist()
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        return f"{path}: unreadable checkpoint file ({type(err).__name__}: {err})"
    return None


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike[str], keep_last: int) -> None:
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    for path in list_checkpoints(run_dir)[:-keep_last]:
        _delete_dir(path)


# ----------------------------------------------------------------------------- loading


def load_trainable_weights(
    model: nn.Module, path: str | os.PathLike[str], strict: bool = True
) -> WeightsReport:
    """Copy saved trainable weights (a checkpoint folder or a .safetensors file) into `model`.

    Strict: every trainable parameter must be in the file and every key in the file must be a
    trainable parameter or a buffer the saver listed; otherwise a KeyError names them. Shapes must match.
    """
    file = _weights_file(Path(path))
    tensors = load_file(file, device="cpu")
    model = unwrap(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    named_buffers = dict(model.named_buffers())
    targets = params | {n: named_buffers[n] for n in _listed_buffers(file) if n in named_buffers}
    report = WeightsReport(
        missing=sorted(set(params) - set(tensors)),
        unexpected=sorted(set(tensors) - set(targets)),
    )
    if strict and (report.missing or report.unexpected):
        raise KeyError(
            f"{file}: does not match the trainable parameters of {type(model).__name__}: "
            f"missing {_few(report.missing)}, unexpected {_few(report.unexpected)}"
        )
    loadable = {n: t for n, t in tensors.items() if n in targets}
    # Check every shape before copying any, so that a mismatch never leaves a half-loaded model.
    mismatched = [
        f"{n} {tuple(t.shape)} (model {tuple(targets[n].shape)})"
        for n, t in loadable.items()
        if t.shape != targets[n].shape
    ]
    if mismatched:
        raise ValueError(f"{file}: shapes differ from the model's: {_few(sorted(mismatched))}")
    with torch.no_grad():
        for name, tensor in loadable.items():
            targets[name].copy_(tensor)
    return report


def _weights_file(path: Path) -> Path:
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no trainable weights at {file}")
    return file


def _listed_buffers(file: Path) -> list[str]:
    with safe_open(file, framework="pt") as fh:
        metadata = fh.metadata() or {}
    return json.loads(metadata.get("buffers", "[]"))


def _few(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Stateful | None = None,
    scaler: torch.amp.GradScaler | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    restore_rng_state: bool = True,
) -> LoadedCheckpoint:
    """Restore weights and whichever of optimizer/scheduler/scaler are given; returns step and data position.

    Resuming needs the same world size: each rank's data position and RNG streams were saved per rank.
    """
    path = Path(path)
    load_trainable_weights(model, path)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path / STATE_FILE}: format {state.get('format')!r}, expected {FORMAT_VERSION}")
    _load_part(optimizer, state, "optimizer", path)
    _load_part(scheduler, state, "scheduler", path)
    _load_part(scaler, state, "scaler", path)
    saved_world = len(state["ranks"])
    if saved_world != world_size:
        raise ValueError(
            f"{path}: saved by {saved_world} rank(s), resuming with world_size {world_size}; "
            "per-rank data positions cannot be mapped onto a different world size"
        )
    mine = state["ranks"][rank]
    if restore_rng_state:
        restore_rng(mine["rng"])
    return LoadedCheckpoint(path=path, step=int(state["step"]), data_state=mine["data"])


def _load_part(target: Stateful | None, state: dict, key: str, path: Path) -> None:
    if target is None:
        return
    if state[key] is None:
        raise ValueError(f"{path / STATE_FILE}: has no {key} state to restore")
    target.load_state_dict(state[key])
