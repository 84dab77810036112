"""The Prefect UI in headless Chromium: `blip2 ui` on a free loopback port, a real `blip2 report` flow run
against it, and the browser finds the run by name and its markdown artifact linking the HTML report.

Debian's /usr/bin/chromium is driven by Playwright (no browser download); skipped only without chromium.
Screenshots land in the test's tmp dir and under var/reports/ui-browser-test/.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_reports import build_report_home

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Closed network, root user: no sandbox, no GPU, no QUIC, no background calls home.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SERVER_START_S = 180
UI_WAIT_MS = 90_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="no chromium (scripts/system-deps.sh installs it)"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server (its own process group, started here), then SIGKILL what is left of that group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _wait_healthy(api: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"blip2 ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        time.sleep(1)
    pytest.fail(f"the Prefect server was not healthy after {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`blip2 ui` on a free loopback port with a private Prefect home; yields (UI URL, API URL)."""
    tmp_path = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "server-prefect-home")}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "ui", "--port", str(port), "--home", str(tmp_path / "var")],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        api = f"http://127.0.0.1:{port}/api"
        _wait_healthy(api, proc, log)
        yield f"http://127.0.0.1:{port}", api
    finally:
        _stop(proc)


def run_report_flow(home: Path, api: str, tmp_path: Path, run_ids: list[str]) -> None:
    """`blip2 report` in its own process, reporting to the test's server."""
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client-prefect-home")}
    argv = [sys.executable, "-m", "flows.cli", "report", "--home", str(home), "--report-id", "ui-test"]
    argv += ["--title", "UI browser test"] + [a for r in run_ids for a in ("--run", r)]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def report_flow_run(api: str) -> dict:
    response = httpx.post(f"{api}/flow_runs/filter", json={"flows": {"name": {"any_": ["report"]}}})
    response.raise_for_status()
    [run] = response.json()
    return run


def screenshot(page, name: str, tmp_path: Path) -> Path:
    shots = REPO / "var" / "reports" / "ui-browser-test"
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(tmp_path / name))
    shutil.copyfile(tmp_path / name, shots / name)
    return tmp_path / name


def test_the_ui_shows_the_report_flow_run_and_its_artifact(prefect_server, tmp_path):
    from playwright.sync_api import sync_playwright

    ui, api = prefect_server
    home = tmp_path / "var"
    ids = build_report_home(home)
    run_report_flow(home, api, tmp_path, [ids["stage1"], ids["stage2"], ids["capfilt"]])
    run = report_flow_run(api)
    assert run["state_type"] == "COMPLETED"
    report = home / "reports" / "ui-test" / "index.html"
    assert report.exists()

    profile = tmp_path / "chromium-profile"  # a new, empty user-data dir
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900},
        )  # fmt: skip
        try:
            page = browser.new_page()
            page.goto(f"{ui}/runs")
            page.get_by_text(run["name"], exact=True).first.wait_for(timeout=UI_WAIT_MS)
            page.get_by_text(run["name"], exact=True).first.click()
            page.wait_for_url(f"**/runs/flow-run/{run['id']}**", timeout=UI_WAIT_MS)
            page.get_by_text("Completed").first.wait_for(timeout=UI_WAIT_MS)
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("blip2-report").first.wait_for(timeout=UI_WAIT_MS)
            screenshot(page, "flow-run-artifacts.png", tmp_path)
            page.get_by_text("blip2-report").first.click()
            page.get_by_text("Open the HTML report").first.wait_for(timeout=UI_WAIT_MS)
            page.get_by_text(str(report.resolve())).first.wait_for(timeout=UI_WAIT_MS)
            link = page.get_by_role("link", name="Open the HTML report")
            assert link.get_attribute("href") == report.resolve().as_uri()
            assert page.get_by_text(ids["stage2"]).count() >= 1  # the headline table of the runs
            shot = screenshot(page, "report-artifact.png", tmp_path)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


def test_served_deployments_register_with_their_limits_and_show_in_the_ui(prefect_server, tmp_path):
    """What `blip2 serve` registers before it starts polling: the deployments, GPU stages limited."""
    from playwright.sync_api import sync_playwright
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import build_deployments

    ui, api = prefect_server
    with temporary_settings(updates={PREFECT_API_URL: api}):
        for deployment in build_deployments(["ingest", "stage1", "report"]):
            deployment.apply()
    response = httpx.post(f"{api}/deployments/filter", json={})
    response.raise_for_status()
    registered = {d["name"]: d for d in response.json()}
    assert set(registered) == {"ingest", "stage1", "report"}
    assert registered["stage1"]["global_concurrency_limit"]["limit"] == 1
    assert registered["stage1"]["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert registered["ingest"]["global_concurrency_limit"] is None

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900},
        )  # fmt: skip
        try:
            page = browser.new_page()
            page.goto(f"{ui}/deployments")
            for name in ("ingest", "stage1", "report"):
                page.get_by_text(name, exact=True).first.wait_for(timeout=UI_WAIT_MS)
            screenshot(page, "deployments.png", tmp_path)
        finally:
            browser.close()
