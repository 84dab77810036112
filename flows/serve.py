"""`blip2 serve` and `blip2 ui`: the stage flows as deployments served from this machine, and a local
Prefect server with its UI.

One machine, no work pools: `blip2 ui` starts `prefect server start` on 127.0.0.1 with the project's
Prefect home (the SQLite database `prefect.db` in it), and `blip2 serve` registers one deployment per
stage flow with that server and runs their flow runs in this process's children (Prefect's `serve`).
A deployment run then starts from the UI, `prefect deployment run stage1/stage1 --params '{...}'`, or a
schedule. The GPU stages carry a concurrency limit (one run at a time by default; a second one waits in
the queue). Several machines and teams: infra/prefect.yaml with work pools and workers instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from data_catalog.layout import blip2_home

DEFAULT_PORT = 4200
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class StageFlow:
    """A flow of the pipeline and how it is served: the deployment is named after the flow."""

    name: str
    module: str
    attr: str
    gpu: bool
    description: str


STAGE_FLOWS: tuple[StageFlow, ...] = (
    StageFlow("ingest", "flows.ingest", "ingest_flow", False, "URL manifest -> WebDataset shards"),
    StageFlow("capfilt", "flows.capfilt", "capfilt_flow", True, "caption, rank and filter web captions"),
    StageFlow("stage1", "flows.train", "stage1_flow", True, "stage-1 Q-Former pretraining (ITC + ITM + ITG)"),
    StageFlow("stage2", "flows.train", "stage2_flow", True, "stage-2 generative pretraining, frozen LLM"),
    StageFlow("finetune", "flows.finetune", "finetune_flow", True, "fine-tuning: caption, VQA, retrieval"),
    StageFlow("evaluate", "flows.evaluate", "evaluate_flow", True, "zero-shot VQA, captioning, retrieval"),
    StageFlow("pipeline", "flows.pipeline", "pipeline_flow", False, "every stage, as subflows (the demo)"),
    StageFlow("corpus-ingest", "flows.demo", "corpus_ingest_flow", False, "synthetic corpus, ingested"),
    StageFlow("teachers", "flows.teachers", "teachers_flow", False, "stand-in pretrained models"),
    StageFlow("report", "flows.reports", "report_flow", False, "HTML report of runs, CapFilt and evaluation"),
)  # fmt: skip


def available_flows(names: Sequence[str] | None = None) -> list[tuple[StageFlow, Any]]:
    """(stage, flow object) of the chosen stages (default all) whose module exists in this checkout.

    A stage named in `names` must exist; unnamed stages whose module is not written yet are left out.
    An import error inside an existing module is raised, not hidden.
    """
    known = {s.name: s for s in STAGE_FLOWS}
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown flow(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = [known[n] for n in names] if names else list(STAGE_FLOWS)
    found = []
    for stage in chosen:
        if importlib.util.find_spec(stage.module) is None:
            if names:
                raise ValueError(
                    f"flow {stage.name!r}: module {stage.module} does not exist in this checkout"
                )
            continue
        found.append((stage, getattr(importlib.import_module(stage.module), stage.attr)))
    return found


def gpu_concurrency(limit: int) -> Any:
    """At most `limit` runs of a deployment at once; more wait in the queue (ENQUEUE), none fails."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def build_deployments(
    names: Sequence[str] | None = None,
    *,
    gpu_limit: int | None = 1,
    cron: Mapping[str, str] | None = None,
    interval: Mapping[str, float] | None = None,
    parameters: Mapping[str, dict[str, Any]] | None = None,
    paused: bool = False,
) -> list[Any]:
    """One RunnerDeployment per available stage flow, named after the flow (`stage1/stage1`).

    gpu_limit: concurrent runs of each GPU stage (None or 0: no limit). cron / interval: schedules by
    stage name. parameters: default parameters by stage name ({"params": {...}}); a stage with a schedule
    needs them, since every flow takes its `params`. paused: schedules start paused.
    """
    from prefect.deployments.runner import EntrypointType

    cron, interval, parameters = dict(cron or {}), dict(interval or {}), dict(parameters or {})
    stages = available_flows(names)
    served = {s.name for s, _ in stages}
    for what, mapping in (("cron", cron), ("interval", interval), ("parameters", parameters)):
        extra = sorted(set(mapping) - served)
        if extra:
            raise ValueError(f"{what} given for flow(s) not served: {', '.join(extra)}")
    for name in sorted(set(cron) | set(interval)):
        if "params" not in parameters.get(name, {}):
            raise ValueError(
                f"the schedule of {name!r} needs default parameters ({{'params': {{...}}}}): every flow "
                "takes its params"
            )
    deployments = []
    for stage, flow in stages:
        options: dict[str, Any] = {
            "name": stage.name,
            "description": stage.description,
            "tags": ["blip2", "gpu" if stage.gpu else "cpu", stage.name],
            "parameters": parameters.get(stage.name),
            "paused": paused,
            # flows.train.stage1_flow, not a file path: the runner imports the installed package from any cwd.
            "entrypoint_type": EntrypointType.MODULE_PATH,
        }
        if stage.gpu and gpu_limit:
            options["concurrency_limit"] = gpu_concurrency(gpu_limit)
        if stage.name in cron:
            options["cron"] = cron[stage.name]
        if stage.name in interval:
            options["interval"] = timedelta(seconds=interval[stage.name])
        deployments.append(flow.to_deployment(**options))
    return deployments


def serve_deployments(deployments: Sequence[Any], limit: int | None = None) -> None:
    """Register the deployments and run their flow runs until interrupted (Prefect's `serve`)."""
    from prefect import serve

    serve(*deployments, limit=limit)


# --- the local server ------------------------------------------------------------------------------


def prefect_home(home: Path | None = None) -> Path:
    """The project's Prefect home: $PREFECT_HOME when set, else <BLIP2_HOME>/prefect beside the catalog."""
    if os.environ.get("PREFECT_HOME"):
        return Path(os.environ["PREFECT_HOME"]).expanduser().resolve()
    return (Path(home).resolve() if home else blip2_home()) / "prefect"


def api_url(port: int = DEFAULT_PORT) -> str:
    return f"http://{LOOPBACK}:{port}/api"


def server_command(port: int) -> list[str]:
    """`prefect server start` from this interpreter's environment, bound to loopback."""
    prefect = Path(sys.executable).with_name("prefect")
    return [str(prefect), "server", "start", "--host", LOOPBACK, "--port", str(port), "--analytics-off"]


def server_env(home: Path | None, port: int) -> dict[str, str]:
    """The environment of the server: the project's Prefect home, and no API URL of another server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(prefect_home(home)), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env["PREFECT_UI_API_URL"] = api_url(port)
    return env


def start_ui(home: Path | None, port: int = DEFAULT_PORT) -> None:
    """Print where the UI will be, then become `prefect server start` (this process id is the server's,
    so stopping it stops the server)."""
    env = server_env(home, port)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    print(f"Prefect server: http://{LOOPBACK}:{port}  (database {env['PREFECT_HOME']}/prefect.db)")
    print(f"point the other shells at it:  export PREFECT_API_URL={api_url(port)}")
    print("then serve the stage flows:     blip2 serve", flush=True)
    command = server_command(port)
    os.execve(command[0], command, env)


__all__ = [
    "STAGE_FLOWS",
    "StageFlow",
    "available_flows",
    "build_deployments",
    "prefect_home",
    "serve_deployments",
    "start_ui",
]
