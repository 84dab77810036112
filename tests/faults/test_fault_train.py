"""Faults during stage-1 training: the run SIGKILLed at a seeded random point, a disk that fills while a
checkpoint is written, a checkpoint damaged after it was written, a contending catalog writer. After
each, a re-run resumes from the newest whole checkpoint and reaches the target step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from faultkit import Killer, contender, rng, small_disk
from test_capfilt_flow import cli_env
from test_train_flows import copy_home, shared_training_home, stage1_params

from blip2_core.checkpoints import checkpoint_problem, list_checkpoints
from data_catalog import Catalog
from data_catalog.layout import Layout
from flows.train import stage1_flow

STEPS = 12


@pytest.fixture()
def trained_home(tmp_path_factory, tmp_path, prefect_harness):
    home, tokenizer = shared_training_home(tmp_path_factory)
    return copy_home(home, tmp_path / "var"), tokenizer


def params(home: Path, tokenizer: Path, **kw):
    return stage1_params(home, tokenizer, **{"steps": STEPS, "log_every": 1, "ckpt_every": 2, **kw})


def assert_runs_consistent(home: Path) -> list:
    """No run is left 'running'; a done run's last recorded checkpoint is whole (older ones may have been
    pruned, keep_last) and it knows every checkpoint on its disk; metric steps are unique per run."""
    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        runs = cat.runs("stage1")
        for run in runs:
            assert run.status in ("done", "failed"), run
            recorded = [Path(c.path) for c in cat.checkpoints(run.run_id)]
            if run.status == "done":  # a killed run may have written one more than it reported
                assert checkpoint_problem(recorded[-1]) is None
                on_disk = list_checkpoints(Layout(home).run_dir("stage1", run.run_id) / "checkpoints")
                assert set(on_disk) <= set(recorded), "a checkpoint on disk the catalog does not know"
            steps = [m.step for m in cat.metrics(run.run_id, "loss")]
            assert len(steps) == len(set(steps))
    return runs


def run_dirs(home: Path) -> list[Path]:
    return sorted((Layout(home).home / "runs" / "stage1").glob("stage1-*"))


def test_killed_training_resumes_against_a_contending_writer(trained_home):
    home, tokenizer = trained_home
    r = rng("train-sigkill")
    args = ["train", "stage1", "--source", "synth", "--tokenizer", str(tokenizer), "--steps", str(STEPS)]
    args += ["--batch-size", "8", "--num-workers", "0", "--log-every", "1", "--ckpt-every", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args, "--home", str(home)],
        env=cli_env(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    after = r.randint(1, 3)
    killer = Killer(
        ready=lambda: (
            proc.poll() is not None
            or sum(len(list_checkpoints(d / "checkpoints")) for d in run_dirs(home)) >= after
        ),
        target=lambda: proc.pid if proc.poll() is None else None,
        delay=r.uniform(0.0, 2.0),
    )
    killer.run()
    proc.wait()
    assert killer.killed == proc.pid, "training ended before the kill"
    (killed_dir,) = run_dirs(home)
    whole = list_checkpoints(killed_dir / "checkpoints")
    assert whole, "no whole checkpoint before the kill"

    with contender(Layout(home).catalog) as held:
        start = held()
        summary = stage1_flow(params(home, tokenizer, batch_size=8, num_workers=0))
        assert held() > start, "the contender never took the catalog while the flow ran"
    assert summary.step == STEPS
    assert summary.start_step == int(whole[-1].name.removeprefix("step-"))  # the newest whole one
    assert summary.resumed_from_run == killed_dir.name
    runs = assert_runs_consistent(home)
    assert [r.status for r in runs] == ["failed", "done"]  # the killed run is closed, not left running


def test_full_disk_during_a_checkpoint_then_a_damaged_checkpoint(trained_home):
    home, tokenizer = trained_home
    runs_root = Layout(home).home / "runs"
    p = params(home, tokenizer, steps=8, batch_size=8, num_workers=0)
    with small_disk(runs_root, size_kb=60 * 1024) as grow:  # two tiny-preset checkpoints (~26 MB each)
        with pytest.raises(Exception, match="No space left"):  # OSError or SafetensorError
            stage1_flow(p)
        (first_dir,) = run_dirs(home)
        whole = list_checkpoints(first_dir / "checkpoints")
        assert [c.name for c in whole] == ["step-000002", "step-000004"]
        assert not list((first_dir / "checkpoints").glob("step-000006"))  # the half one is not a step-*

        grow(512 * 1024)
        newest = whole[-1] / "model.safetensors"
        newest.write_bytes(newest.read_bytes()[:-4096])  # damaged after it was written
        assert checkpoint_problem(whole[-1]) is not None
        summary = stage1_flow(p)
        assert (summary.start_step, summary.step) == (2, 8)  # from the newest whole checkpoint, not step 4
        runs = assert_runs_consistent(home)  # before the tmpfs (and the run folders on it) goes away
        assert [r.status for r in runs] == ["failed", "done"]
