"""Fixtures shared by the fine-tuning and evaluation flow tests (test_finetune_flows, test_evaluate_flows,
test_downstream_ranks): one tiny data root per session, and a fresh copy of it per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from finetune_fixtures import FinetuneHome, shared_finetune_home


@pytest.fixture(scope="session")
def built(tmp_path_factory, prefect_harness) -> FinetuneHome:
    """The data root, built once; tests never write to it (they get `home`, a copy)."""
    return shared_finetune_home(tmp_path_factory)


@pytest.fixture()
def home(built: FinetuneHome, tmp_path: Path) -> Path:
    """A copy of the built home (catalog, runs) that the test may change."""
    return Path(shutil.copytree(built.home, tmp_path / "var"))
