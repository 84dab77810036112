"""Test-wide isolation: offline, no telemetry, and a private Prefect home per test session."""

from __future__ import annotations

import os
import tempfile

import pytest

# Set before anything imports Prefect or transformers.
_PREFECT_HOME = tempfile.mkdtemp(prefix="blip2-test-prefect-")
os.environ.update(
    PREFECT_HOME=_PREFECT_HOME,
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_LOGGING_LEVEL="WARNING",
    PREFECT_API_URL="",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    NO_ALBUMENTATIONS_UPDATE="1",
    TOKENIZERS_PARALLELISM="false",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
)
os.environ.pop("BLIP2_HOME", None)


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API (SQLite under the private home) shared by the flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def blip2_home(tmp_path, monkeypatch):
    """A fresh data root for one test."""
    home = tmp_path / "var"
    monkeypatch.setenv("BLIP2_HOME", str(home))
    return home
