"""The local Ray instance the CapFilt flow starts listens on loopback only, every one of its servers."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from flows.ray_capfilt import ray_actor_pool

ray = pytest.importorskip("ray")


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_address)
    return ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))


def _listening_by_inode() -> dict[str, str]:
    """Socket inode -> `address:port` of every listening TCP socket on the machine."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                hex_address, hex_port = fields[1].rsplit(":", 1)
                found[fields[9]] = f"{_address(hex_address)}:{int(hex_port, 16)}"
    return found


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _listeners_of(pids: list[int]) -> set[tuple[str, str]]:
    """(process name, address:port) of the listening sockets these processes hold."""
    listening, found = _listening_by_inode(), set()
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().rsplit("/", 1)[-1]
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with_inode = os.readlink(fd)
                if with_inode.startswith("socket:[") and with_inode[8:-1] in listening:
                    found.add((name, listening[with_inode[8:-1]]))
        except OSError:
            continue  # the process or the descriptor went away meanwhile
    return found


def _is_loopback(address_port: str) -> bool:
    ip = ipaddress.ip_address(address_port.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as Ray's gRPC servers bind it
    return (mapped or ip).is_loopback


@pytest.mark.slow  # Ray start-up and one actor on the 2 shared cores
def test_local_ray_of_the_capfilt_flow_listens_on_loopback_only():
    before = _listeners_of([os.getpid()])
    with ray_actor_pool(None, "cpu", None, 1) as pool:
        ray.get(pool._actors[0].__ray_ready__.remote())  # the actor's worker process is up
        (node,) = ray.nodes()
        sockets = _listeners_of(_process_tree(os.getpid())) - before
    names = {name for name, _ in sockets}
    # GCS, raylet (its node manager and object manager), the driver's and the actor's core-worker RPC
    # servers, the dashboard agent (gRPC, HTTP, metrics export) and the runtime-env agent.
    assert {"gcs_server", "raylet"} <= names and len(sockets) >= 6, sockets
    exposed = sorted(s for s in sockets if not _is_loopback(s[1]))
    assert not exposed, f"Ray listens beyond loopback: {exposed}"
    assert node["NodeManagerAddress"] == "127.0.0.1"
    assert not ray.is_initialized()  # the flow started it, the flow stopped it


def test_the_ray_download_distributor_starts_a_loopback_ray_unless_it_joins_one(monkeypatch):
    import flows.img2dataset_worker as worker

    started = []
    monkeypatch.setattr("flows.ray_capfilt.start_local_ray", lambda **kw: started.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    worker._start_ray_if_needed({"distributor": "multiprocessing"})
    assert started == []
    worker._start_ray_if_needed({"distributor": "ray"})
    assert started == [{}]
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    worker._start_ray_if_needed({"distributor": "ray"})
    assert started == [{}]  # joins the named cluster, as img2dataset's own ray.init does
