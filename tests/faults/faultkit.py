"""Fault injection for the pipeline's stages: kill a process tree, fill a disk, contend for the catalog,
and the checks that follow every fault (nothing finished lost or duplicated, nothing half-written trusted).

Disk full is a real full file system: a tmpfs of a few hundred KB mounted over the folder a stage writes
(`mount -t tmpfs` works here as root; writes then fail with ENOSPC exactly as on a full disk, and
`mount -o remount,size=` frees space without losing what was written). RLIMIT_FSIZE was the fallback
considered: it limits the size of each file, not the space left, and only in the limited process (not
in img2dataset's pool or the flow's catalog writes), so it would not model a full disk. Without the
right to mount, the disk-full tests skip with that reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
for sub in ("flows", "blip2_core"):  # shared fixtures of the flow tests (unique module names)
    if str(TESTS / sub) not in sys.path:
        sys.path.insert(0, str(TESTS / sub))

SEED = int(os.environ.get("BLIP2_FAULT_SEED", "20261127"))


def rng(name: str) -> random.Random:
    """A generator per fault, seeded by the suite seed and the fault's name (reproducible, independent)."""
    return random.Random(f"{SEED}:{name}")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- processes -------------------------------------------------------------------------------------


def _proc_field(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def processes_with_env(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (children inherit it, even once orphaned)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            environ = _proc_field(int(entry.name), "environ")
            stat = _proc_field(int(entry.name), "stat")
            if marker.encode() in environ and b") Z " not in stat:  # zombies are already dead
                found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_field(int(entry.name), "stat").decode(errors="replace")
            if stat:
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, no goodbye (as the OOM killer or a lost node would)."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


class Killer(threading.Thread):
    """Waits for `ready()`, then a seeded random delay, then SIGKILLs the tree of the pid `target()` gives."""

    def __init__(self, ready: Callable[[], bool], target: Callable[[], int | None], delay: float):
        super().__init__(daemon=True)
        self.ready, self.target, self.delay = ready, target, delay
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and not self.ready():
            time.sleep(0.05)
        if self.stop.wait(self.delay):
            return
        pid = self.target()
        if pid is not None:
            kill_tree(pid)
            self.killed = pid


def child_with_cmdline(parent: int, needle: str) -> int | None:
    for pid in descendants(parent):
        if needle.encode() in _proc_field(pid, "cmdline"):
            return pid
    return None


# --- disk full -------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(folder: Path, size_kb: int) -> Iterator[Callable[[int], None]]:
    """A tmpfs of `size_kb` mounted on `folder`; yields `grow(size_kb)` to free space in place."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a size-limited tmpfs here ({result.stderr.strip()}): disk-full faults need it"
        )

    def grow(new_kb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_kb}k", str(folder)], check=True)

    try:
        yield grow
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# --- catalog contention ----------------------------------------------------------------------------

_CONTENDER = """
import sys, time
from data_catalog import Catalog
path, hold, stop_file, count_file = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
n = 0
import os
while not os.path.exists(stop_file):
    with Catalog.open(path, timeout_s=120) as cat:   # a writer: DuckDB's exclusive file lock
        run = cat.start_run("contender", "c", {"n": n})
        time.sleep(hold)
        cat.finish_run(run, "done", {})
    n += 1
    open(count_file, "w").write(str(n))
    time.sleep(hold)  # as long out as in: the flow's sessions get their turns, with waiting
"""


@contextlib.contextmanager
def contender(catalog: Path, hold_s: float = 0.3) -> Iterator[Callable[[], int]]:
    """Another process that takes the catalog's write lock over and over while the block runs.

    Yields a function giving how many times it held the lock (the test asserts it did contend).
    """
    stop, count = catalog.with_name(".contender-stop"), catalog.with_name(".contender-count")
    stop.unlink(missing_ok=True)
    count.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CONTENDER, str(catalog), str(hold_s), str(stop), str(count)]
    )

    def held() -> int:
        return int(count.read_text() or 0) if count.exists() else 0

    try:
        wait_for(lambda: held() > 0 or proc.poll() is not None, 120, "the contender's first lock")
        assert proc.poll() is None, "the catalog contender died"
        yield held
    finally:
        stop.touch()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        stop.unlink(missing_ok=True)
