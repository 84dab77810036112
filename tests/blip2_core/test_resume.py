"""A run killed with SIGKILL and started again ends exactly where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_toy_script import parse_args, result_record, run_toy

from blip2_core import checkpoints
from blip2_core.checkpoints import latest_checkpoint, list_checkpoints

torch.set_num_threads(1)

SCRIPT = Path(__file__).with_name("train_toy_script.py")
# 48 samples in batches of 4 with 2 accumulation steps: 6 steps per epoch, so the checkpoints at
# steps 4, 8, 12 fall mid-epoch and the run crosses epochs; dropout makes the RNG restore matter.
ARGS = ["--steps", "16", "--ckpt-every", "4", "--grad-accum", "2", "--batch-size", "4", "--dropout", "0.1"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return env | {"OMP_NUM_THREADS": "1"}


def start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), *ARGS, *extra]
    return subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill_after_first_checkpoint(proc: subprocess.Popen, ckpt_dir: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while latest_checkpoint(ckpt_dir) is None:
        if proc.poll() is not None:
            pytest.fail(f"toy run exited early:\n{proc.stdout.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint appeared in time")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def uninterrupted(out: Path) -> dict:
    model, result = run_toy(parse_args(["--out", str(out), *ARGS]))
    return result_record(model, result)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    out = tmp_path / "killed"
    victim = start(out, "--sleep", "0.3")  # slow steps so that the kill lands mid-run
    kill_after_first_checkpoint(victim, out / "checkpoints")
    assert victim.returncode == -signal.SIGKILL
    killed_at = int(latest_checkpoint(out / "checkpoints").name.removeprefix("step-"))
    assert killed_at < 16 and not (out / "result.json").exists()

    restarted = start(out)
    log, _ = restarted.communicate(timeout=120)
    assert restarted.returncode == 0, log.decode()
    resumed = json.loads((out / "result.json").read_text())
    reference = uninterrupted(tmp_path / "reference")

    assert resumed["resumed_from"].endswith(f"step-{killed_at:06d}")
    assert sorted(map(int, resumed["losses"])) == list(range(killed_at + 1, 17))
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(reference["losses"][step], abs=1e-6), f"step {step}"
    for name, value in reference["params"].items():
        assert torch.allclose(torch.tensor(resumed["params"][name]), torch.tensor(value), atol=1e-6), name
    assert resumed["seen"] == reference["seen"]  # the listed buffer was restored too


class Crash(Exception):
    pass


class CrashAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_metrics(self, step, metrics):
        if step == self.step:
            raise Crash


def crash_and_resume(out: Path) -> list[tuple[int, dict]]:
    """Crash in-process at step 6 (after the step-4 checkpoint), then resume; the resumed history."""
    args = parse_args(["--out", str(out), *ARGS])
    with pytest.raises(Crash):
        run_toy(args, callbacks=[CrashAt(6)])
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000004"]
    return run_toy(args)[1].history


def test_crashed_run_resumes_to_the_same_losses(tmp_path):
    reference = uninterrupted(tmp_path / "reference")["losses"]
    history = crash_and_resume(tmp_path / "run")
    assert [step for step, _ in history] == list(range(5, 17))
    assert all(metrics["loss"] == pytest.approx(reference[str(step)], abs=1e-6) for step, metrics in history)


def test_resume_without_rng_restore_would_differ(tmp_path, monkeypatch):
    # Guards the tests above against passing for the wrong reason: with RNG restoration disabled the
    # resumed losses must differ, so the dropout masks really depend on the restored RNG state.
    monkeypatch.setattr(checkpoints, "restore_rng", lambda rng: None)
    reference = uninterrupted(tmp_path / "reference")["losses"]
    history = crash_and_resume(tmp_path / "run")
    assert any(metrics["loss"] != pytest.approx(reference[str(step)], abs=1e-6) for step, metrics in history)


def test_finished_run_is_not_trained_again(tmp_path):
    args = parse_args(["--out", str(tmp_path), *ARGS])
    model, first = run_toy(args)
    params = {n: p.clone() for n, p in model.named_parameters()}
    again_model, again = run_toy(args)
    assert again.step == 16 and again.history == [] and again.resumed_from.name == "step-000016"
    for name, value in again_model.named_parameters():
        assert torch.equal(value, params[name]), name
