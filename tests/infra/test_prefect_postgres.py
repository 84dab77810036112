"""The shared Prefect server of infra/compose.yaml, for real: PostgreSQL + `prefect server start`.

The test starts PostgreSQL from the Debian packages (/usr/lib/postgresql/<ver>/bin) in a temporary data
folder on loopback, points a Prefect server at it through PREFECT_API_DATABASE_CONNECTION_URL (the
compose file's setting), runs a small flow against that server from another process, reads the flow run
back through the API, and checks that the rows are in PostgreSQL. It skips only when the PostgreSQL
binaries are absent (`make test` installs them through scripts/system-deps.sh).

initdb and postgres refuse to run as root: as root the test runs them as the `postgres` user that
Debian's package creates (else `nobody`); as any other user it runs them as that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

DB_USER = "blip2"
DB_NAME = "prefect"


def _postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian installs one folder per major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unprivileged_prefix() -> tuple[list[str], int | None, int | None]:
    """The command prefix that runs PostgreSQL's programs as a non-root user, and that user's ids."""
    if os.geteuid() != 0:
        return [], None, None
    import pwd

    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return ["runuser", "-u", name, "--"], user.pw_uid, user.pw_gid
    pytest.skip("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")


@dataclass
class Postgres:
    bin: Path
    root: Path  # data folder and socket folder live under it
    port: int
    prefix: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        # Loopback only, trust authentication: a throwaway cluster that lives for one test.
        return f"postgresql+asyncpg://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.prefix, *args], capture_output=True, text=True, timeout=timeout, check=True, cwd=self.root
        )

    def psql(self, sql: str) -> str:
        out = self.run(
            str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, "-d", DB_NAME,
            "-v", "ON_ERROR_STOP=1", "-Atc", sql,
        )  # fmt: skip
        return out.stdout.strip()

    def postmaster_pid(self) -> int | None:
        pid_file = self.data / "postmaster.pid"
        return int(pid_file.read_text().splitlines()[0]) if pid_file.is_file() else None


def _start_postgres(pg: Postgres) -> None:
    pg.run(str(pg.bin / "initdb"), "-D", str(pg.data), "-U", DB_USER, "--auth=trust", "-E", "UTF8")
    sockets = pg.root / "sockets"
    sockets.mkdir()
    owner = pg.root.stat()  # the server user's, like the data folder
    os.chown(sockets, owner.st_uid, owner.st_gid)
    options = f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {sockets} -c fsync=off"
    pg.run(
        str(pg.bin / "pg_ctl"), "-D", str(pg.data), "-o", options, "-l", str(pg.root / "postgres.log"),
        "-w", "-t", "60", "start",
    )  # fmt: skip
    pg.run(str(pg.bin / "createdb"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", DB_USER, DB_NAME)


def _stop_pid(pid: int, sig: int, timeout: float) -> None:
    """Signal one process we started and wait for it to go; SIGKILL if it outlives `timeout`."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture()
def postgres() -> Iterator[Postgres]:
    pg_bin = _postgres_bin()
    if pg_bin is None:
        pytest.skip(
            "PostgreSQL binaries not installed (/usr/lib/postgresql/*/bin): run scripts/system-deps.sh"
        )
    prefix, uid, gid = _unprivileged_prefix()
    # Not under pytest's tmp_path: its parents are private to root, and the server user must reach it.
    root = Path(tempfile.mkdtemp(prefix="blip2-pg-"))
    if uid is not None:
        os.chown(root, uid, gid)
    pg = Postgres(pg_bin, root, _free_port(), prefix)
    try:
        _start_postgres(pg)
        yield pg
    finally:
        pid = pg.postmaster_pid()
        if pid is not None:
            _stop_pid(pid, signal.SIGINT, timeout=30)  # SIGINT: PostgreSQL's fast shutdown
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def prefect_server(postgres: Postgres, tmp_path: Path) -> Iterator[str]:
    """`prefect server start` on loopback with its database in `postgres`; yields the API URL."""
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": "",
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    log = open(tmp_path / "prefect-server.log", "w")  # noqa: SIM115 - closed in the finally below
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--no-ui", "--no-scheduler", "--no-late-runs"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(api, server, tmp_path / "prefect-server.log", timeout=90)
        yield api
    finally:
        # The server runs uvicorn in child processes: signal the session it leads (its own process id).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


def _wait_healthy(api: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


FLOW_SCRIPT = textwrap.dedent(
    """
    from prefect import flow, task

    @task
    def square(x: int) -> int:
        return x * x

    @flow(name="shared-server-smoke")
    def smoke(n: int) -> int:
        return sum(square.map(range(n)).result())

    assert smoke(4) == 14
    """
)


def _run_flow_against(api: str, tmp_path: Path) -> None:
    script = tmp_path / "smoke_flow.py"
    script.write_text(FLOW_SCRIPT)
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client-home")}
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=120, cwd=tmp_path)


@pytest.mark.slow
def test_flow_runs_on_a_prefect_server_backed_by_postgres(postgres, prefect_server, tmp_path):
    _run_flow_against(prefect_server, tmp_path)

    # Through the API, as a second user of the shared server would see it.
    response = httpx.post(
        f"{prefect_server}/flow_runs/filter",
        json={"flows": {"name": {"any_": ["shared-server-smoke"]}}},
        timeout=10,
    )
    response.raise_for_status()
    runs = response.json()
    assert len(runs) == 1
    run = runs[0]
    assert run["state_type"] == "COMPLETED"
    assert run["parameters"] == {"n": 4}
    tasks = httpx.post(
        f"{prefect_server}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [run["id"]]}}},
        timeout=10,
    ).json()
    assert sorted(t["state_type"] for t in tasks) == ["COMPLETED"] * 4

    # And in PostgreSQL itself: the server did not fall back to a SQLite file.
    assert postgres.psql(f"SELECT state_type FROM flow_run WHERE id = '{run['id']}'") == "COMPLETED"
    assert postgres.psql(f"SELECT count(*) FROM task_run WHERE flow_run_id = '{run['id']}'") == "4"
    assert not list((tmp_path / "prefect-home").glob("*.db"))
