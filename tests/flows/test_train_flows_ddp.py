"""Stage 1 under torchrun: 2 CPU processes (gloo); rank 0's metrics reach the catalog through the flow."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from data_catalog import Catalog
from data_catalog.layout import Layout
from flows.train import stage1_flow

# The corpus builders of the in-process tests, loaded by path so that any pytest import mode works.
_spec = importlib.util.spec_from_file_location(
    "train_flow_helpers", Path(__file__).with_name("test_train_flows.py")
)
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, prefect_harness):
    return helpers.shared_training_home(tmp_path_factory)


def test_two_process_torchrun_stage1(ingested, tmp_path):
    home, tokenizer = helpers.copy_home(ingested[0], tmp_path / "var"), ingested[1]
    summary = stage1_flow(
        helpers.stage1_params(home, tokenizer, nproc=2, steps=4, batch_size=8, ckpt_every=4)
    )

    assert summary.step == 4
    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        run = cat.run(summary.run_id)
        losses = cat.metrics(summary.run_id, "loss")
        checkpoints = cat.checkpoints(summary.run_id)
    assert run.status == "done"
    assert [m.step for m in losses] == [2, 4] and all(math.isfinite(m.value) for m in losses)
    assert [c.step for c in checkpoints] == [4]
    job = json.loads((summary.run_dir / "job.json").read_text())
    assert (job["world_size"], job["batch_size"]) == (2, 4)  # 8 samples per step over 2 ranks
    log = (summary.run_dir / "log").read_text()
    assert "rank0" in log and "rank1" in log  # both ranks' output streamed to the run's log
