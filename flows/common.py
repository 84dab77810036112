"""Small pieces every flow shares: where data lives, catalog sessions, artifact keys, locks."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_catalog import Catalog, CatalogVersionError
from data_catalog.layout import Layout, blip2_home

# Flows open the catalog for short sessions, so `blip2 catalog status` in another shell gets a turn.
CATALOG_TIMEOUT_S = float(os.environ.get("BLIP2_CATALOG_TIMEOUT_S", "60"))


def layout_for(home: Path | None) -> Layout:
    return Layout(Path(home).resolve() if home else blip2_home())


@contextlib.contextmanager
def catalog_session(layout: Layout, read_only: bool = False) -> Iterator[Catalog]:
    """A short catalog session; a reader that finds an older schema upgrades it first.

    Writers go first: DuckDB admits one writing process or any number of reading ones, and a stream of
    overlapping readers (dashboards, `blip2 catalog` in a loop) would otherwise keep a flow from ever
    writing (benchmarks/catalog_load.py measured 1 write in 30 s against 8 looping readers).
    """
    layout.home.mkdir(parents=True, exist_ok=True)
    with _writer_first(layout.catalog, read_only):
        try:
            cat = Catalog.open(layout.catalog, read_only=read_only, timeout_s=CATALOG_TIMEOUT_S)
        except CatalogVersionError:
            if not read_only:
                raise
            Catalog.open(layout.catalog, timeout_s=CATALOG_TIMEOUT_S).close()  # applies the migrations
            cat = Catalog.open(layout.catalog, read_only=True, timeout_s=CATALOG_TIMEOUT_S)
    with cat:
        yield cat


@contextlib.contextmanager
def _writer_first(catalog: Path, read_only: bool) -> Iterator[None]:
    """A turnstile beside the catalog file (`<catalog>.gate`, an flock). A writer holds it until it has
    opened the catalog; a reader only passes through it before opening. So once a writer waits, new
    readers wait behind it, and the writer waits only for the readers already inside to finish."""
    with open(catalog.with_name(catalog.name + ".gate"), "a") as gate:
        deadline = time.monotonic() + CATALOG_TIMEOUT_S
        while True:
            try:
                fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break  # Catalog.open's own timeout and message take over
                time.sleep(0.01)
        try:
            if read_only:
                fcntl.flock(gate, fcntl.LOCK_UN)  # passed through
            yield
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)


def flow_run_id() -> str | None:
    """The Prefect flow-run id when running inside a flow, else None."""
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    return str(run_id) if run_id else None


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


class StageBusyError(RuntimeError):
    """Another process is already running a stage over the same folder."""


@contextlib.contextmanager
def source_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on a stage's output folder, released when the process dies."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise StageBusyError(
                f"{folder} is being written by another run (lock {folder / '.lock'}); wait for it to finish"
            ) from err
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- parameter checks the flows run first, before any work ----------------------------------------
# Paths are checked by the flow, not by the parameter models: a deployment's parameters are written on
# one machine and run on another, where the models' folders may only exist on the worker.


class ParameterError(ValueError):
    """Flow parameters that are well-formed but unusable here; the message names each field."""


def require_paths(
    files: dict[str, Path | None] | None = None, dirs: dict[str, Path | None] | None = None
) -> None:
    """Raise ParameterError naming every field whose path is not an existing file (or folder)."""
    problems = [
        f"{field}: {path} is not an existing {kind}"
        for kind, paths, exists in (("file", files, Path.is_file), ("folder", dirs, Path.is_dir))
        for field, path in (paths or {}).items()
        if path is not None and not exists(Path(path))
    ]
    if problems:
        raise ParameterError("invalid parameters:\n  " + "\n  ".join(problems))


# --- credentials never reach the catalog, logs or artifacts ------------------------------------------
# Object-store credentials come from the environment or Prefect blocks. A flow parameter that is a URL
# refuses credentials (Prefect stores and shows flow-run parameters); any other URL that carries a user
# and password (http://user:pw@host/, s3://key:secret@bucket) is recorded with them masked.

_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")


def redact(value: Any) -> Any:
    """`value` (a string, or dicts and lists of them) with the user:password@ of every URL masked."""
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub(r"\1***@", value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def refuse_url_credentials(url: str | None) -> str | None:
    """A params-model field validator's body: `url` unchanged, or an error if it carries credentials
    (pydantic names the field; the error type `url_credentials` tells the CLI not to echo the value)."""
    from pydantic_core import PydanticCustomError

    from data_catalog.url_safety import credentials_message

    problem = None if url is None else credentials_message(url)
    if problem is not None:
        raise PydanticCustomError("url_credentials", problem)
    return url


def fingerprint(text: str | None) -> str | None:
    """A short hash standing for a value that may hold credentials, where only its changes matter."""
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:16]
