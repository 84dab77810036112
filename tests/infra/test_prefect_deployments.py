"""infra/prefect.yaml and the work-pool base job templates, validated with Prefect's own models."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import typing

import pytest
import yaml
from conftest import INFRA, REPO
from jsonschema import Draft202012Validator
from prefect.utilities.templating import apply_values

PREFECT_YAML = yaml.safe_load((INFRA / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in PREFECT_YAML["deployments"]}
# Fields a run must pass itself (no sensible default for a whole team).
RUN_TIME_FIELDS = {"stage2": {"stage1_run"}, "finetune": {"start_run"}}


def template(name: str) -> dict:
    return json.loads((INFRA / "work-pools" / name).read_text())


def pools_script() -> dict[str, tuple[str, str]]:
    """pool name -> (type, template path) as infra/work-pools/create-pools.sh creates them."""
    text = (INFRA / "work-pools" / "create-pools.sh").read_text().replace("\\\n", " ")
    pools = {}
    for m in re.finditer(
        r"prefect work-pool create (\S+) --type (\S+)\s+--base-job-template \"\$here/(\S+)\"", text
    ):
        pools[m.group(1)] = (m.group(2), m.group(3))
    return pools


def defaults(tmpl: dict) -> dict:
    """What a worker fills in for variables a deployment leaves unset (BaseJobConfiguration)."""
    return {
        k: v["default"] for k, v in tmpl["variables"]["properties"].items() if v.get("default") is not None
    }


def render_kubernetes(tmpl: dict, job_variables: dict) -> dict:
    """The Job the prefect-kubernetes worker would submit: the template rendered with the variables
    (prefect's apply_values), then the worker's own fix-ups (env dict -> list, command -> args)."""
    values = defaults(tmpl) | job_variables
    config = apply_values(copy.deepcopy(tmpl["job_configuration"]), values)
    manifest = config["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in config["env"].items()]
    container["args"] = shlex.split(config.get("command") or "prefect flow-run execute")
    return manifest


# --- prefect.yaml ------------------------------------------------------------------------------------


def test_prefect_yaml_is_valid_for_prefect_deploy():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(PREFECT_YAML)
    names = [d.name for d in model.deployments]
    assert len(names) == len(set(names))
    for stage in ("ingest", "capfilt-ray", "stage1", "stage2", "demo"):
        assert stage in names
    step = PREFECT_YAML["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "/opt/blip2"
    assert "WORKDIR /opt/blip2" in (INFRA / "Dockerfile").read_text()


def test_pools_exist_with_templates_and_gpu_concurrency():
    pools = pools_script()
    assert pools == {
        "blip2-cpu": ("process", "process.json"),
        "blip2-gpu": ("kubernetes", "kubernetes-gpu.json"),
    }
    assert "set-concurrency-limit blip2-gpu" in (INFRA / "work-pools" / "create-pools.sh").read_text()
    for d in DEPLOYMENTS.values():
        pool = d["work_pool"]["name"]
        assert pool in pools, d["name"]
        variables = template(pools[pool][1])["variables"]["properties"]
        assert set(d["work_pool"]["job_variables"]) <= set(variables), d["name"]
        if "gpu" in d["tags"] and "planned" not in d["tags"] and d["name"] != "evaluate":
            assert d["concurrency_limit"]["limit"] == 1, d["name"]


def test_example_schedules_are_valid_and_paused():
    from prefect.cli.deploy._models import RawScheduleConfig

    scheduled = [d for d in DEPLOYMENTS.values() if d.get("schedules")]
    assert {d["name"] for d in scheduled} >= {"ingest", "capfilt-ray"}
    for d in scheduled:
        for s in d["schedules"]:
            RawScheduleConfig.model_validate(s)
            assert s["active"] is False  # examples: nothing starts on its own after `prefect deploy`


def test_create_pools_script_parses():
    subprocess.run(["bash", "-n", str(INFRA / "work-pools" / "create-pools.sh")], check=True)


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_entrypoint_names_a_real_flow(name):
    """Every entrypoint whose file exists imports and names a @flow whose parameters accept the example."""
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    d = DEPLOYMENTS[name]
    path, func = d["entrypoint"].split(":")
    if not (REPO / path).exists():
        assert "planned" in d["tags"], f"{path} is missing but {name} is not marked planned"
        pytest.skip(f"{path} does not exist yet (planned)")
    assert "planned" not in d["tags"], f"{path} exists: drop the planned tag of {name}"
    flow = load_flow_from_entrypoint(str(REPO / path) + ":" + func)
    assert isinstance(flow, Flow) and flow.name == func.removesuffix("_flow")
    params_model = typing.get_type_hints(flow.fn)["params"]
    try:
        params_model.model_validate(d["parameters"]["params"])
    except Exception as err:  # pydantic.ValidationError
        missing = {e["loc"][0] for e in err.errors() if e["type"] == "missing"}
        others = [e for e in err.errors() if e["type"] != "missing"]
        assert not others and missing <= RUN_TIME_FIELDS.get(name, set()), err
    for schedule in d.get("schedules", []):
        params_model.model_validate(schedule["parameters"]["params"])


# --- work-pool templates -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,pool_type", [("process.json", "process"), ("kubernetes-gpu.json", "kubernetes")]
)
def test_template_is_accepted_by_the_prefect_server(name, pool_type):
    from prefect.server.schemas.actions import WorkPoolCreate

    tmpl = template(name)
    WorkPoolCreate(name=f"blip2-{pool_type}", type=pool_type, base_job_template=tmpl)  # placeholders declared
    Draft202012Validator.check_schema(tmpl["variables"])
    # Every default satisfies its own schema, and the defaults together satisfy the whole.
    Draft202012Validator(tmpl["variables"]).validate(defaults(tmpl))


def test_kubernetes_template_renders_a_gpu_job():
    tmpl = template("kubernetes-gpu.json")
    job = render_kubernetes(tmpl, {})
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert (
        job["metadata"]["namespace"] == "blip2"
        and job["metadata"]["labels"]["app.kubernetes.io/name"] == "blip2"
    )
    pod = job["spec"]["template"]["spec"]
    # What the prefect-kubernetes worker insists on (its _get_base_job_manifest).
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    (c,) = pod["containers"]
    assert c["name"] == "prefect-job" and c["image"] == "registry.example.com/blip2:0.1.0"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The image's entrypoint is blip2: the container runs `python -m prefect flow-run execute`.
    assert c["command"] + c["args"] == ["python", "-m", "prefect", "flow-run", "execute"]
    env = {e["name"]: e["value"] for e in c["env"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert env["BLIP2_HOME"] == mounts["blip2-home"] == "/data/blip2"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["blip2-home"]["persistentVolumeClaim"]["claimName"] == "blip2-home"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "{{" not in json.dumps(job)


def test_training_deployment_asks_for_as_many_gpus_as_processes():
    tmpl = template("kubernetes-gpu.json")
    for name in ("stage1", "stage2"):
        d = DEPLOYMENTS[name]
        job_variables = d["work_pool"]["job_variables"]
        Draft202012Validator(tmpl["variables"]).validate(defaults(tmpl) | job_variables)
        c = render_kubernetes(tmpl, job_variables)["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == d["parameters"]["params"]["nproc"] == 8
        assert c["resources"]["requests"]["memory"] == job_variables["memory"]


def test_process_template_renders_a_process_job_configuration():
    from prefect.workers.process import ProcessJobConfiguration

    tmpl = template("process.json")
    config = ProcessJobConfiguration(**apply_values(copy.deepcopy(tmpl["job_configuration"]), defaults(tmpl)))
    assert config.env["BLIP2_HOME"] == "/data/blip2"
    assert config.command is None and config.stream_output is True
