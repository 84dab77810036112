"""infra/ is not an installed package: its tests import it from the repository root."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def load_script(path: Path, name: str):
    """Import a script whose file name is not a module name (infra/ray/img2dataset-ray.py)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
