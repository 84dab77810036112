"""job_only: a training flow run writes the job for a multi-node launch and trains nothing itself."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml
from test_train_flows import copy_home, open_catalog, shared_training_home, stage1_params

from data_catalog.layout import Layout
from flows.train import launch_instructions, stage1_flow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def ingested(tmp_path_factory, prefect_harness):
    return shared_training_home(tmp_path_factory)  # built once per session, shared with test_train_flows


@pytest.fixture()
def home(ingested, tmp_path) -> Path:
    return copy_home(ingested[0], tmp_path / "var")


def load_launch():
    spec = importlib.util.spec_from_file_location("blip2_infra_launch", REPO / "infra" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # builds the shared training home (ingest) when run alone
def test_job_only_writes_the_job_for_every_rank_and_the_launch_command(home, ingested):
    summary = stage1_flow(stage1_params(home, ingested[1], nproc=4, job_only=True))

    run_dir = Layout(home).run_dir("stage1", summary.run_id)
    job = json.loads((run_dir / "job.json").read_text())
    assert job["world_size"] == 4 and job["batch_size"] == 8 // 4  # per rank: the global batch over 4
    assert (run_dir / "config.json").is_file()
    # Nothing trained here: no step, no checkpoint, no events; the cluster's ranks will write them.
    assert (summary.step, summary.last_checkpoint, summary.metrics_logged) == (0, None, 0)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    with open_catalog(home) as cat:
        assert cat.run(summary.run_id).status == "running"

    # What the flow prints (a log line under Prefect's log_prints): the launcher command for this job.
    printed = launch_instructions("stage1", summary.run_id, str(run_dir / "job.json"), 4)
    assert "python infra/launch.py <launch file> --out launch/" in printed
    assert f"--check-job {run_dir / 'job.json'}" in printed and "4 ranks" in printed

    # The job passes the launcher's check for 2 nodes x 2 GPUs, as the printed command would run it.
    launch = load_launch()
    example = yaml.safe_load((REPO / "infra" / "training" / "stage1-2x8.yaml").read_text())
    params = launch.LaunchParams.model_validate(
        example | {"job": str(run_dir / "job.json"), "home": str(home), "nodes": 2, "gpus_per_node": 2}
    )
    launch.check_job(params, job)
