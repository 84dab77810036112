"""The worker image and the shared Prefect server: checked by reading them (no docker engine here)."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib

import yaml
from conftest import INFRA, REPO


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (INFRA / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in logical]


def test_dockerfile_base_python_and_install():
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu22\.04", args["CUDA_IMAGE"])
    assert ("FROM", "${CUDA_IMAGE}") in ins
    # The CUDA major version of the base matches the CUDA libraries the locked torch wheel pulls in.
    lock = (REPO / "requirements.lock").read_text()
    cuda_major = re.search(r"^nvidia-cuda-runtime==(\d+)\.", lock, re.M).group(1)
    assert args["CUDA_IMAGE"].startswith(f"nvidia/cuda:{cuda_major}.")
    runs = [a for op, a in ins if op == "RUN"]
    assert any("python3.11 python3.11-venv" in r for r in runs) and any(
        "python3.11 -m venv" in r for r in runs
    )
    install = next(r for r in runs if "'.[ray]'" in r)
    assert "pip install -c requirements.lock '.[ray]'" in install
    # The backport goes after the install that pulls it, and the build proves it is gone.
    assert install.index("'.[ray]'") < install.index("pip uninstall -y dataclasses")
    assert "'site-packages' not in dataclasses.__file__" in install


def test_dockerfile_copies_every_package_and_keeps_them_in_context():
    ins = dockerfile_instructions()
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = {a.split()[0] for op, a in ins if op == "COPY"}
    for pattern in packages["include"]:
        name = pattern.rstrip("*")
        assert name in copied and (REPO / name).is_dir()
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    for path in copied:
        assert (REPO / path).exists(), path
        assert ("!" + path) in ignore or ("!" + path + "/**") in ignore, (
            f"{path} is excluded from the context"
        )


def test_dockerfile_user_volume_entrypoint():
    ins = dockerfile_instructions()
    ops = [op for op, _ in ins]
    users = [a for op, a in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ops.index("USER") < ops.index("ENTRYPOINT")
    env = " ".join(a for op, a in ins if op == "ENV")
    home = re.search(r"BLIP2_HOME=(\S+)", env).group(1)
    assert next(a for op, a in ins if op == "VOLUME") == f'["{home}"]'
    entry = yaml.safe_load(next(a for op, a in ins if op == "ENTRYPOINT"))
    assert entry[-1] == "blip2"


def test_compose_postgres_backed_prefect_server():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    pg, server = compose["services"]["postgres"], compose["services"]["prefect-server"]
    assert pg["env_file"] == ".env" and "environment" not in pg
    assert any(v.startswith("prefect-db:") for v in pg["volumes"]) and "prefect-db" in compose["volumes"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert re.fullmatch(
        r"postgresql\+asyncpg://\$\{POSTGRES_USER[^}]*\}:\$\{POSTGRES_PASSWORD[^}]*\}@postgres:5432/"
        r"\$\{POSTGRES_DB[^}]*\}",
        url,
    )
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert server["image"].endswith("3.9.1-python3.11")  # the prefect of requirements.lock
    assert "prefect==3.9.1" in (REPO / "requirements.lock").read_text()


def test_compose_ports_local_by_default_and_no_inline_secret():
    text = (INFRA / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    for service in compose["services"].values():
        for port in service.get("ports", []):
            assert port.startswith("${PREFECT_BIND:-127.0.0.1}:") or port.startswith("127.0.0.1:"), port
        env = service.get("environment", {})
        for key, value in env.items():
            if "PASSWORD" in key or "SECRET" in key:
                raise AssertionError(f"{key} is inline")
            assert "CHANGE_ME" not in str(value)
    # Every ${VAR} compose needs is in the example env file; the real one is git-ignored.
    example = dict(
        ln.split("=", 1)
        for ln in (INFRA / "prefect.env.example").read_text().splitlines()
        if "=" in ln and not ln.startswith("#")
    )
    for var in set(re.findall(r"\$\{([A-Z0-9_]+)", text)):
        assert var in example, var
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO)
    assert ignored.returncode == 0


def test_compose_worker_is_optional_and_runs_the_cpu_pool():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    worker = compose["services"]["worker"]
    assert worker["profiles"] == ["worker"]
    assert worker["build"] == {"context": "..", "dockerfile": "infra/Dockerfile"}
    assert worker["entrypoint"][-1] == "prefect"
    assert worker["command"][:4] == ["worker", "start", "--pool", "blip2-cpu"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert "python" in shlex.join(compose["services"]["prefect-server"]["healthcheck"]["test"])
