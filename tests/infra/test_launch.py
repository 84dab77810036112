"""Multi-node launches: the Indexed Job, the PyTorchJob and the sbatch script agree, from one LaunchParams."""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest
import yaml
from conftest import INFRA
from pydantic import ValidationError

from infra.launch import (
    LaunchParams,
    check_job,
    indexed_job,
    load_params,
    main,
    render_indexed_job,
    render_pytorch_job,
    render_sbatch,
)

EXAMPLE = INFRA / "training" / "stage1-2x8.yaml"


# What the cluster sets on a node: its index, the operator's rank and master, Slurm's job and head node.
NODE_ENV = {
    "JOB_COMPLETION_INDEX": "1",
    "RANK": "1",
    "MASTER_ADDR": "blip2-stage1-master-0",
    "MASTER_PORT": "29500",
    "SLURM_JOB_ID": "4242",
    "head_node": "gpu-node-017",
}


def expand(command: str) -> list[str]:
    """The words bash makes of `command` on a node (variables expanded, quotes removed)."""
    out = subprocess.run(
        ["bash", "-c", f'set -- {command}; printf "%s\\0" "$@"'],
        env=NODE_ENV,
        capture_output=True,
        check=True,
    )
    return out.stdout.decode().split("\0")[:-1]


def torchrun_args(command: str):
    """torch's own torchrun parser over the command a node runs (after `python -m torch.distributed.run`)."""
    from torch.distributed.run import get_args_parser

    argv = expand(command)
    start = argv.index("torch.distributed.run") + 1
    assert argv[start - 2 : start] == ["-m", "torch.distributed.run"]
    return get_args_parser().parse_args(argv[start:])


def k8s_command(pod_spec: dict) -> str:
    (container,) = pod_spec["containers"]
    assert container["command"][:2] == ["bash", "-c"]
    return container["command"][2].removeprefix("exec ")


@pytest.fixture(scope="module")
def params() -> LaunchParams:
    return load_params(EXAMPLE)


@pytest.fixture(scope="module")
def rendered(params):
    service, job = yaml.safe_load_all(render_indexed_job(params))
    pytorchjob = yaml.safe_load(render_pytorch_job(params))
    sbatch = render_sbatch(params)
    srun = next(line for line in sbatch.splitlines() if line.startswith("srun "))
    return {
        "service": service,
        "job": job,
        "pytorchjob": pytorchjob,
        "sbatch": sbatch,
        "commands": {
            "indexed-job": k8s_command(job["spec"]["template"]["spec"]),
            "pytorchjob-master": k8s_command(
                pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
            ),
            "pytorchjob-worker": k8s_command(
                pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
            ),
            "slurm": srun.split(" ", 2)[2],  # after `srun --kill-on-bad-exit=1`
        },
    }


def test_every_launch_starts_the_same_ranks_on_the_same_job(params, rendered):
    assert params.world_size == 16
    for kind, command in rendered["commands"].items():
        args = torchrun_args(command)
        assert (int(args.nnodes), int(args.nproc_per_node)) == (2, 8), kind
        assert int(args.nnodes) * int(args.nproc_per_node) == params.world_size
        assert args.module and args.training_script == "flows.torchrun_entry", kind
        assert args.training_script_args == [str(params.job)], kind
        assert args.max_restarts == params.max_restarts


def test_indexed_job_ranks_nodes_by_completion_index(params, rendered):
    service, job = rendered["service"], rendered["job"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == params.nodes
    pod = spec["template"]["spec"]
    args = torchrun_args(rendered["commands"]["indexed-job"])
    assert args.node_rank == 1 and args.rdzv_backend == "static"
    # Node 0 is reached as <job>-0.<subdomain>, the subdomain being the headless Service.
    name = job["metadata"]["name"]
    assert pod["subdomain"] == service["metadata"]["name"] == name
    assert args.rdzv_endpoint == f"{name}-0.{name}:{params.master_port}"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert service["spec"]["ports"][0]["port"] == params.master_port
    (c,) = pod["containers"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 8
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["BLIP2_HOME"] == str(params.home) and str(params.job).startswith(env["BLIP2_HOME"])
    assert {m["mountPath"] for m in c["volumeMounts"]} == {str(params.home), "/dev/shm"}
    assert pod["nodeSelector"] == params.node_selector and pod["restartPolicy"] == "Never"


def test_pytorchjob_has_one_master_and_nodes_minus_one_workers(params, rendered):
    pj = rendered["pytorchjob"]
    assert (pj["apiVersion"], pj["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] + replicas["Worker"]["replicas"] == params.nodes
    assert pj["spec"]["nprocPerNode"] == str(params.gpus_per_node)
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["ports"][0]["name"] == "pytorchjob-port"
    args = torchrun_args(rendered["commands"]["pytorchjob-worker"])
    assert args.rdzv_endpoint == "blip2-stage1-master-0:29500" and args.node_rank == 1
    single = params.model_copy(update={"nodes": 1})
    from infra.launch import pytorch_job

    assert set(pytorch_job(single)["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_sbatch_script(params, rendered, tmp_path):
    script = rendered["sbatch"]
    path = tmp_path / "sbatch.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    directives = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "--nodes=2" in directives and "--gpus-per-node=8" in directives
    assert "--ntasks-per-node=1" in directives and "--partition=gpu" in directives
    assert 'head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in script
    args = torchrun_args(rendered["commands"]["slurm"])
    assert args.rdzv_backend == "c10d" and args.rdzv_endpoint == "gpu-node-017:29500"
    assert args.rdzv_id == "4242"
    assert expand(rendered["commands"]["slurm"])[0] == params.slurm_python
    assert f"export BLIP2_HOME={params.home}" in script.splitlines()


def test_sbatch_in_a_container(params, tmp_path):
    script = render_sbatch(params.model_copy(update={"slurm_container": True}))
    srun = shlex.split(next(line for line in script.splitlines() if line.startswith("srun ")))
    assert (
        f"--container-image={params.image}" in srun
        and f"--container-mounts={params.home}:{params.home}" in srun
    )
    assert srun[srun.index("-m") - 1] == "python"  # the image's interpreter


def test_one_node(params):
    one = params.model_copy(update={"nodes": 1, "gpus_per_node": 4})
    _, job = indexed_job(one)
    assert job["spec"]["completions"] == 1
    args = torchrun_args(k8s_command(job["spec"]["template"]["spec"]))
    assert (args.nnodes, args.nproc_per_node) == ("1", "4")


def test_job_file_checked_against_the_launch(params):
    job = {"stage": "stage1", "world_size": 16, "run_dir": "/data/blip2/runs/stage1/r1"}
    check_job(params, job)
    with pytest.raises(ValueError, match="16 ranks|write the job with nproc = 16"):
        check_job(params, job | {"world_size": 8})
    with pytest.raises(ValueError, match="stage2"):
        check_job(params, job | {"stage": "stage2"})
    with pytest.raises(ValueError, match="not under BLIP2_HOME"):
        check_job(params, job | {"run_dir": "/home/me/var/runs/stage1/r1"})


@pytest.mark.parametrize(
    "change,message",
    [
        ({"job": "/data/blip2/runs/stage1/r1/config.json"}, "job.json"),
        ({"job": "/elsewhere/runs/stage1/r1/job.json"}, "not under BLIP2_HOME"),
        ({"name": "Blip2_Stage1"}, "DNS label"),
        ({"gpus_per_node": 0}, "greater than or equal"),
        ({"memory_per_node": "900GB"}, "pattern"),
        ({"nodes_count": 2}, "Extra inputs"),
    ],
)
def test_bad_parameters_are_refused(change, message):
    raw = yaml.safe_load(EXAMPLE.read_text()) | change
    with pytest.raises(ValidationError, match=message):
        LaunchParams.model_validate(raw)


def test_command_line_writes_all_three(tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"stage": "stage1", "world_size": 16, "run_dir": "/data/blip2/runs/stage1/x"}))
    assert main([str(EXAMPLE), "--out", str(tmp_path / "out"), "--check-job", str(job)]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "indexed-job.yaml",
        "pytorchjob.yaml",
        "sbatch.sh",
    ]
    job.write_text(json.dumps({"stage": "stage1", "world_size": 8, "run_dir": "/data/blip2/runs/stage1/x"}))
    with pytest.raises(ValueError, match="write the job with nproc = 16"):
        main([str(EXAMPLE), "--kind", "slurm", "--check-job", str(job)])
