"""One writer at a time: a second process waits for the catalog's lock, then opens it or times out."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from data_catalog import Catalog, CatalogLockedError

REPO_ROOT = Path(__file__).resolve().parents[2]

# The holder opens the catalog, writes a source, says "held", keeps the file open until a line arrives
# on its stdin (or stdin closes), then closes cleanly.
HOLDER = """
import sys
from data_catalog import Catalog
catalog = Catalog.open(sys.argv[1])
catalog.upsert_source("held", "web", "/m", 1, {})
print("held", flush=True)
sys.stdin.readline()
catalog.close()
print("closed", flush=True)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process holding the catalog; yields (path, process). Always stopped at the end."""
    path = tmp_path / "catalog.duckdb"
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout.readline().strip() == "held"
        yield path, process
    finally:
        if process.poll() is None:
            process.stdin.close()
            process.wait(timeout=30)


def test_second_open_times_out_with_a_clear_error(holder):
    path, process = holder
    started = time.monotonic()
    with pytest.raises(CatalogLockedError) as err:
        Catalog.open(path, timeout_s=1.0)
    waited = time.monotonic() - started
    assert waited >= 1.0
    message = str(err.value)
    assert str(path) in message
    assert f"process {process.pid}" in message
    assert "timeout_s" in message


def test_read_only_open_also_waits_for_the_writer(holder):
    path, _ = holder
    with pytest.raises(CatalogLockedError):
        Catalog.open(path, read_only=True, timeout_s=0.3)


def test_second_open_waits_and_succeeds_after_the_holder_closes(holder):
    path, process = holder
    release_after_s = 1.0

    def release():
        process.stdin.write("go\n")
        process.stdin.flush()

    # The holder lets go while our open is already waiting for the lock.
    timer = threading.Timer(release_after_s, release)
    started = time.monotonic()
    timer.start()
    try:
        with Catalog.open(path, timeout_s=30.0) as catalog:
            waited = time.monotonic() - started
            assert [s.name for s in catalog.sources()] == ["held"]  # the holder's write survived intact
            catalog.upsert_source("second", "web", "/m", 2, {})
    finally:
        timer.join()
    assert waited >= release_after_s
    assert process.wait(timeout=30) == 0
    assert process.stdout.readline().strip() == "closed"
