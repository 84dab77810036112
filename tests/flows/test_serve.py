"""`blip2 serve` and `blip2 ui`: the deployments it builds (names, limits, schedules), without serving."""

from __future__ import annotations

from datetime import timedelta

import pytest

from flows import cli, serve
from flows.serve import STAGE_FLOWS, StageFlow, available_flows, build_deployments

GPU_STAGES = {"capfilt", "stage1", "stage2", "finetune", "evaluate"}
INGEST_PARAMS = {"params": {"source": "laion", "retry_failed": True}}


def by_name(deployments) -> dict:
    return {d.name: d for d in deployments}


def test_every_present_flow_becomes_a_deployment_named_after_it():
    deployments = by_name(build_deployments())
    present = {s.name for s, _ in available_flows()}
    assert {"ingest", "capfilt", "stage1", "stage2", "report"} <= present
    assert set(deployments) == present
    for name, d in deployments.items():
        assert d.flow_name == name  # served as "<flow>/<deployment>" = "stage1/stage1"
        assert d.entrypoint.startswith("flows.")  # a module path: works from any working directory
        assert {"blip2", name} <= set(d.tags)
        assert d.schedules == [] and d.parameters == {}


def test_gpu_stages_run_one_at_a_time_and_queue_the_rest():
    deployments = by_name(build_deployments())
    for name, d in deployments.items():
        if name in GPU_STAGES:
            assert d.concurrency_limit == 1
            assert d.concurrency_options.collision_strategy.value == "ENQUEUE"
            assert "gpu" in d.tags
        else:
            assert d.concurrency_limit is None and "cpu" in d.tags
    assert by_name(build_deployments(["stage1"], gpu_limit=2))["stage1"].concurrency_limit == 2
    assert by_name(build_deployments(["stage1"], gpu_limit=0))["stage1"].concurrency_limit is None


def test_schedules_come_with_default_parameters():
    deployments = by_name(
        build_deployments(
            ["ingest", "capfilt"],
            cron={"ingest": "0 2 * * *"},
            interval={"capfilt": 6 * 3600},
            parameters={"ingest": INGEST_PARAMS, "capfilt": {"params": {"sources": ["laion"]}}},
            paused=True,
        )
    )
    assert set(deployments) == {"ingest", "capfilt"}
    [nightly] = deployments["ingest"].schedules
    assert nightly.schedule.cron == "0 2 * * *"
    assert deployments["ingest"].parameters == INGEST_PARAMS
    [every] = deployments["capfilt"].schedules
    assert every.schedule.interval == timedelta(hours=6)
    assert deployments["ingest"].paused is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": {"ingest": "0 2 * * *"}}, "schedule of 'ingest' needs default parameters"),
        ({"names": ["ingest"], "cron": {"stage1": "0 2 * * *"}}, "cron given for flow.* not served: stage1"),
        ({"names": ["nope"]}, "unknown flow"),
    ],
)
def test_bad_serve_options_are_refused(kwargs, message):
    names = kwargs.pop("names", None)
    with pytest.raises(ValueError, match=message):
        build_deployments(names, **kwargs)


def test_a_flow_not_written_yet_is_left_out_unless_named(monkeypatch):
    missing = StageFlow("later", "flows.not_written_yet", "later_flow", True, "later")
    monkeypatch.setattr(serve, "STAGE_FLOWS", (*STAGE_FLOWS[:1], missing))
    assert [s.name for s, _ in available_flows()] == ["ingest"]
    with pytest.raises(ValueError, match="flows.not_written_yet does not exist"):
        available_flows(["later"])


def test_serve_command_builds_and_hands_over_the_deployments(monkeypatch, tmp_path, capsys):
    served = {}
    monkeypatch.setattr(serve, "serve_deployments", lambda ds, limit=None: served.update(ds=ds, limit=limit))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")  # restored after the test
    params = tmp_path / "ingest.json"
    params.write_text('{"params": {"source": "laion"}}')
    argv = ["serve", "--only", "ingest", "stage1", "--limit", "3", "--cron", "ingest=0 3 * * *"]
    argv += ["--parameters", f"ingest=@{params}", "--api-url", "http://127.0.0.1:4321/api"]
    assert cli.main(argv) == 0
    assert [d.name for d in served["ds"]] == ["ingest", "stage1"] and served["limit"] == 3
    assert served["ds"][0].parameters == {"params": {"source": "laion"}}
    out = capsys.readouterr().out
    assert "to http://127.0.0.1:4321/api" in out and "stage1/stage1  (at most 1 at once)" in out
    assert cli.main(["serve", "--cron", "ingest"]) == 1  # NAME=VALUE expected: a one-line error


def test_ui_runs_prefect_server_on_loopback_with_the_project_prefect_home(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(serve.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere:4200/api")
    cli.main(["ui", "--port", "4321", "--home", str(tmp_path / "var")])
    [(path, argv, env)] = calls
    assert path.endswith("/prefect") and argv[1:] == [
        "server", "start", "--host", "127.0.0.1", "--port", "4321", "--analytics-off"
    ]  # fmt: skip
    assert env["PREFECT_HOME"] == str(tmp_path / "var" / "prefect")
    assert (tmp_path / "var" / "prefect").is_dir()
    assert "PREFECT_API_URL" not in env  # the server is not a client of another one
    out = capsys.readouterr().out
    assert "http://127.0.0.1:4321" in out and "export PREFECT_API_URL=http://127.0.0.1:4321/api" in out
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "ph"))
    assert serve.prefect_home(tmp_path / "var") == tmp_path / "ph"  # an explicit PREFECT_HOME wins
