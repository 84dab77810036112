"""Multi-node training launches, all rendered from one set of parameters.

The training flow (`flows/train.py`) writes `<BLIP2_HOME>/runs/<stage>/<run-id>/job.json`: everything a
rank needs, as paths and numbers. Every rank of every node runs the same command on it,

    python -m torch.distributed.run --nnodes N --nproc-per-node G ... -m flows.torchrun_entry job.json

and this module writes that command into the three ways a cluster starts it:

- a Kubernetes Indexed Job (one pod per node, node rank = JOB_COMPLETION_INDEX) with a headless Service
  so that every pod finds node 0 (static rendezvous on `<name>-0.<name>:<port>`);
- a Kubeflow PyTorchJob (the training operator sets RANK, MASTER_ADDR and MASTER_PORT per pod);
- a Slurm batch script (one task per node; c10d rendezvous on the first node of the allocation).

    python infra/launch.py infra/training/stage1-2x8.yaml --out launch/          # all three
    python infra/launch.py infra/training/stage1-2x8.yaml --kind slurm --check-job var/runs/.../job.json

The job's world size must be nodes x gpus_per_node (`check_job` refuses a mismatch before anything runs).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENTRY_MODULE = "flows.torchrun_entry"
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,40}[a-z0-9])?$")  # room left for "-<index>-<suffix>"
_GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


class LaunchParams(BaseModel):
    """One multi-node training launch: how many nodes and GPUs, which image, which job file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: Literal["stage1", "stage2"]
    job: PurePosixPath = Field(description="the run's job.json, e.g. /data/blip2/runs/stage1/ID/job.json")
    home: PurePosixPath = Field(
        PurePosixPath("/data/blip2"),
        description="BLIP2_HOME on every node: the path the flow that wrote job.json used (it holds paths)",
    )
    nodes: int = Field(ge=1, le=1024)
    gpus_per_node: int = Field(ge=1, le=16)
    image: str = Field(min_length=1, description="the pipeline image (infra/Dockerfile) in a registry")
    name: str | None = Field(None, description="Job/Service name (DNS label); default blip2-<stage>")
    master_port: int = Field(29500, ge=1024, le=65535, description="rendezvous port on node 0")
    max_restarts: int = Field(3, ge=0, description="torchrun restarts of the ranks before giving up")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment (NCCL_*, ...)")
    # Kubernetes
    namespace: str = "blip2"
    home_pvc: str = Field("blip2-home", description="ReadWriteMany claim holding BLIP2_HOME")
    cpus_per_node: int | None = Field(None, ge=1)
    memory_per_node: str | None = Field(None, pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)$")
    shm_size: str = Field("64Gi", pattern=r"^[0-9]+(Ki|Mi|Gi)$")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[dict[str, str], ...] = (_GPU_TOLERATION,)
    backoff_limit: int = Field(3, ge=0, description="pods replaced after a failure (the job resumes)")
    # Slurm
    partition: str | None = None
    account: str | None = None
    time_limit: str = Field("6-00:00:00", pattern=r"^([0-9]+-)?[0-9]+:[0-9]{2}:[0-9]{2}$")
    slurm_python: str = Field("python", description="interpreter with the project installed (a venv path)")
    slurm_container: bool = Field(False, description="run in `image` through pyxis (srun --container-image)")

    @field_validator("job")
    @classmethod
    def _job_file(cls, value: PurePosixPath) -> PurePosixPath:
        if value.name != "job.json" or not value.is_absolute():
            raise ValueError(f"job must be an absolute path to a job.json written by the flow, got {value}")
        return value

    @model_validator(mode="after")
    def _job_under_home(self) -> LaunchParams:
        if not self.job.is_relative_to(self.home):
            raise ValueError(f"job {self.job} is not under BLIP2_HOME {self.home}")
        return self

    @field_validator("name")
    @classmethod
    def _dns_name(cls, value: str | None) -> str | None:
        if value is not None and not _DNS_LABEL.match(value):
            raise ValueError(f"name {value!r} must be a DNS label: a-z, 0-9 and '-', at most 42 characters")
        return value

    @property
    def job_name(self) -> str:
        return self.name or f"blip2-{self.stage}"

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


# --- the one command ---------------------------------------------------------------------------------


def torchrun_argv(
    p: LaunchParams,
    *,
    node_rank: str | None,
    backend: str,
    endpoint: str,
    rdzv_id: str,
    python: str = "python",
) -> list[str]:
    """The command every node runs. `node_rank` / `endpoint` may hold shell variables ("${RANK}")."""
    argv = [python, "-m", "torch.distributed.run"]
    argv += [f"--nnodes={p.nodes}", f"--nproc-per-node={p.gpus_per_node}"]
    if node_rank is not None:  # static rendezvous: ranks by node index; c10d assigns them itself
        argv.append(f"--node-rank={node_rank}")
    argv += [f"--rdzv-backend={backend}", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}"]
    argv += [f"--max-restarts={p.max_restarts}", "-m", ENTRY_MODULE, str(p.job)]
    return argv


def shell_join(argv: list[str]) -> str:
    """Like shlex.join, but words holding ${VAR} are double-quoted so that the shell expands them."""
    words = []
    for word in argv:
        if "${" in word:
            if re.search(r'["`\\]|\$\(', word):
                raise ValueError(f"cannot quote {word!r} for the shell")
            words.append(f'"{word}"')
        else:
            words.append(shlex.quote(word))
    return " ".join(words)


def _env(p: LaunchParams) -> dict[str, str]:
    return {"BLIP2_HOME": str(p.home), "PYTHONUNBUFFERED": "1", **p.env}


# --- Kubernetes --------------------------------------------------------------------------------------


def _labels(p: LaunchParams) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "blip2",
        "app.kubernetes.io/component": p.stage,
        "blip2/run": p.job_name,
    }


def _resources(p: LaunchParams) -> dict[str, Any]:
    requests: dict[str, Any] = {"nvidia.com/gpu": p.gpus_per_node}
    limits: dict[str, Any] = {"nvidia.com/gpu": p.gpus_per_node}
    if p.cpus_per_node:
        requests["cpu"] = str(p.cpus_per_node)
    if p.memory_per_node:
        requests["memory"] = limits["memory"] = p.memory_per_node
    return {"requests": requests, "limits": limits}


def _pod_spec(p: LaunchParams, container_name: str, script: str, port_name: str) -> dict[str, Any]:
    """The pod of one node: the image, all its GPUs, BLIP2_HOME from the shared claim, a large /dev/shm."""
    container = {
        "name": container_name,
        "image": p.image,
        "command": ["bash", "-c", script],  # bash: past the image's `blip2` entrypoint, and ${VAR} expansion
        "env": [{"name": k, "value": v} for k, v in _env(p).items()],
        "ports": [{"name": port_name, "containerPort": p.master_port}],
        "resources": _resources(p),
        "volumeMounts": [
            {"name": "blip2-home", "mountPath": str(p.home)},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {"name": "blip2-home", "persistentVolumeClaim": {"claimName": p.home_pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": p.shm_size}},
        ],
        "tolerations": [dict(t) for t in p.tolerations],
    }
    if p.node_selector:
        spec["nodeSelector"] = dict(p.node_selector)
    return spec


def indexed_job(p: LaunchParams) -> list[dict[str, Any]]:
    """A headless Service and an Indexed Job of `nodes` pods; pod i is node rank i."""
    name = p.job_name
    endpoint = f"{name}-0.{name}:{p.master_port}"  # pod 0's hostname under the Service's subdomain
    argv = torchrun_argv(
        p, node_rank="${JOB_COMPLETION_INDEX}", backend="static", endpoint=endpoint, rdzv_id=name
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": p.namespace, "labels": _labels(p)},
        "spec": {
            "clusterIP": "None",
            # Pod 0 must resolve before it is ready: the rendezvous is what makes it ready.
            "publishNotReadyAddresses": True,
            "selector": {"batch.kubernetes.io/job-name": name},
            "ports": [{"name": "rdzv", "port": p.master_port, "targetPort": p.master_port}],
        },
    }
    pod = _pod_spec(p, "trainer", "exec " + shell_join(argv), "rdzv")
    pod |= {"subdomain": name, "restartPolicy": "Never"}
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": p.namespace, "labels": _labels(p)},
        "spec": {
            "completionMode": "Indexed",
            "completions": p.nodes,
            "parallelism": p.nodes,
            "backoffLimit": p.backoff_limit,
            "template": {"metadata": {"labels": _labels(p)}, "spec": pod},
        },
    }
    return [service, job]


def pytorch_job(p: LaunchParams) -> dict[str, Any]:
    """A Kubeflow training-operator PyTorchJob: one Master pod and nodes - 1 Worker pods."""
    argv = torchrun_argv(
        p,
        node_rank="${RANK}",  # the operator's per-pod node index (0 on the Master)
        backend="static",
        endpoint="${MASTER_ADDR}:${MASTER_PORT}",
        rdzv_id=p.job_name,
    )

    def replica(count: int) -> dict[str, Any]:
        # The operator reads the rendezvous port from the container port named pytorchjob-port.
        pod = _pod_spec(p, "pytorch", "exec " + shell_join(argv), "pytorchjob-port")
        return {"replicas": count, "restartPolicy": "OnFailure", "template": {"spec": pod}}

    specs = {"Master": replica(1)}
    if p.nodes > 1:
        specs["Worker"] = replica(p.nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": p.job_name, "namespace": p.namespace, "labels": _labels(p)},
        "spec": {
            "nprocPerNode": str(p.gpus_per_node),
            "runPolicy": {"backoffLimit": p.backoff_limit},
            "pytorchReplicaSpecs": specs,
        },
    }


def render_indexed_job(p: LaunchParams) -> str:
    return yaml.safe_dump_all(indexed_job(p), sort_keys=False)


def render_pytorch_job(p: LaunchParams) -> str:
    return yaml.safe_dump(pytorch_job(p), sort_keys=False)


# --- Slurm -------------------------------------------------------------------------------------------


def render_sbatch(p: LaunchParams) -> str:
    """One task per node; each runs torchrun, which starts gpus_per_node ranks."""
    argv = torchrun_argv(
        p,
        node_rank=None,
        backend="c10d",
        endpoint=f"${{head_node}}:{p.master_port}",
        rdzv_id="${SLURM_JOB_ID}",
        python="python" if p.slurm_container else p.slurm_python,
    )
    directives = [
        f"--job-name={p.job_name}",
        f"--nodes={p.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={p.gpus_per_node}",
        f"--time={p.time_limit}",
        "--output=%x-%j.out",
    ]
    if p.cpus_per_node:
        directives.append(f"--cpus-per-task={p.cpus_per_node}")
    if p.memory_per_node:
        directives.append(f"--mem={p.memory_per_node.removesuffix('i')}")  # Slurm: 900G, not 900Gi
    directives += [f"--partition={p.partition}"] if p.partition else []
    directives += [f"--account={p.account}"] if p.account else []
    srun = ["srun", "--kill-on-bad-exit=1"]
    if p.slurm_container:  # pyxis/enroot
        srun += [f"--container-image={p.image}", f"--container-mounts={p.home}:{p.home}"]
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), ""]
    lines += [
        f"# BLIP-2 {p.stage}: {p.nodes} node(s) x {p.gpus_per_node} GPU(s) = {p.world_size} ranks.",
        "# Rendered by infra/launch.py; the job file's world_size must match.",
        "set -euo pipefail",
        *(f"export {k}={shlex.quote(v)}" for k, v in _env(p).items()),
        'head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        'echo "rendezvous on ${head_node}:' + str(p.master_port) + ', job ${SLURM_JOB_ID}"',
        shell_join(srun + argv),
        "",
    ]
    return "\n".join(lines)


# --- checks and the command line ---------------------------------------------------------------------

RENDERERS = {
    "indexed-job": ("indexed-job.yaml", render_indexed_job),
    "pytorchjob": ("pytorchjob.yaml", render_pytorch_job),
    "slurm": ("sbatch.sh", render_sbatch),
}


def check_job(p: LaunchParams, job: dict[str, Any]) -> None:
    """Refuse a job file written for another stage or another number of ranks."""
    if job.get("stage") != p.stage:
        raise ValueError(f"job file is for {job.get('stage')!r}, the launch for {p.stage!r}")
    if not PurePosixPath(str(job.get("run_dir"))).is_relative_to(p.home):
        raise ValueError(f"job file's run folder {job.get('run_dir')} is not under BLIP2_HOME {p.home}")
    if job.get("world_size") != p.world_size:
        raise ValueError(
            f"job file is for {job.get('world_size')} ranks, the launch starts {p.nodes} node(s) x "
            f"{p.gpus_per_node} GPU(s) = {p.world_size}: write the job with nproc = {p.world_size}"
        )


def load_params(path: Path) -> LaunchParams:
    return LaunchParams.model_validate(yaml.safe_load(path.read_text()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Render multi-node training launches from one parameter file.")
    ap.add_argument("params", type=Path, help="YAML file of LaunchParams (infra/training/*.yaml)")
    ap.add_argument("--kind", choices=sorted(RENDERERS), action="append", help="default: all")
    ap.add_argument("--out", type=Path, help="folder for the rendered files (default: standard output)")
    ap.add_argument("--check-job", type=Path, help="a local copy of job.json to check against the launch")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.check_job:
        check_job(params, json.loads(args.check_job.read_text()))
    for kind in args.kind or sorted(RENDERERS):
        filename, render = RENDERERS[kind]
        text = render(params)
        if args.out is None:
            print(f"# --- {filename}\n{text}")
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / filename).write_text(text)
        print(f"wrote {args.out / filename}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
