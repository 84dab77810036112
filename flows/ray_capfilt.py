"""CapFilt on Ray: one model-holding actor per GPU (or per CPU worker), fed shard batches by the flow.

The flow still runs one Prefect task per shard batch; the task borrows an idle actor from the pool, waits
for the actor to process the batch, and hands the actor back. An actor loads the models once, on its first
batch, and keeps them for the rest of the run. Only the flow process touches the catalog.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import uuid
from collections.abc import Iterator
from typing import Any

# Ray's servers (GCS, raylet and object manager, every worker's RPC server, the agents and the metrics
# export) listen on the node IP, and on Linux ray.init picks the machine's outward address for it; the
# C++ servers then listen on every interface. Ray binds them to loopback only when the node IP is
# loopback, and it keeps a loopback node IP only where "clusters" are disabled, as on Windows and macOS:
# ray.init(_node_ip_address="127.0.0.1") is turned back into the outward address. So a local instance
# starts with clusters disabled: for the driver (the constant, read when ray.init asks for the node IP;
# Ray may have been imported before the variable is set) and for the processes it spawns (the variable).
_CLUSTERS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Pools of the live flow runs in this process, by id: tasks receive the id, never the actors themselves.
_POOLS: dict[str, RayActorPool] = {}
_POOLS_LOCK = threading.Lock()


class CapFiltWorker:
    """The actor: holds one config's models (flows.capfilt.cached_models) for its whole life."""

    def run(self, items: list[dict], cfg: dict) -> list[dict]:
        from flows.capfilt import run_shard_batch

        return run_shard_batch(items, cfg)


class RayActorPool:
    """`size` CapFiltWorker actors, each with one GPU (device "cuda") or one CPU (device "cpu")."""

    def __init__(self, device: str, size: int) -> None:
        import ray

        self.device = device
        self.slots = size
        self.pool = uuid.uuid4().hex
        resources = {"num_gpus": 1} if device == "cuda" else {"num_cpus": 1}
        self._actor_class = ray.remote(**resources)(CapFiltWorker)
        self._idle: queue.Queue = queue.Queue()
        self._actors = [self._actor_class.remote() for _ in range(size)]
        for actor in self._actors:
            self._idle.put(actor)

    def run(self, items: list[dict], cfg: dict) -> list[dict]:
        """Run a batch on an idle actor; a dead actor (node lost, OOM) is replaced, the batch retried."""
        import ray
        from ray.exceptions import RayActorError

        actor = self._idle.get()
        try:
            return ray.get(actor.run.remote(items, cfg))
        except RayActorError:
            actor = self._replace(actor)
            return ray.get(actor.run.remote(items, cfg))
        finally:
            self._idle.put(actor)

    def _replace(self, dead: Any) -> Any:
        fresh = self._actor_class.remote()
        self._actors = [fresh if a is dead else a for a in self._actors]
        return fresh

    def close(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor)


def get_pool(pool_id: str) -> RayActorPool:
    with _POOLS_LOCK:
        return _POOLS[pool_id]


def pool_size(device_request: str, num_gpus: int | None, num_workers: int) -> tuple[str, int]:
    """(device, actors) for the connected cluster: one actor per GPU, else `num_workers` CPU actors."""
    import ray

    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    gpus = cluster_gpus if num_gpus is None else min(num_gpus, cluster_gpus)
    if device_request == "cuda" and gpus == 0:
        raise RuntimeError(f"CapFilt on Ray: device cuda asked for, but the cluster has {cluster_gpus} GPUs")
    if device_request == "cpu" or gpus == 0:
        return "cpu", num_workers
    return "cuda", gpus


def start_local_ray(**options: Any) -> None:
    """Start a new Ray instance on this machine whose every server listens on loopback only.

    `options` go to ray.init (num_cpus, object_store_memory, _temp_dir, ...). A Ray cluster that other
    machines join is started with `ray start` on each node, not here.
    """
    import ray
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_CLUSTERS_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTERS_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, **options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTERS_ENV, None)
        else:
            os.environ[_CLUSTERS_ENV] = saved_env


@contextlib.contextmanager
def ray_actor_pool(
    address: str | None, device_request: str, num_gpus: int | None, num_workers: int
) -> Iterator[RayActorPool]:
    """Connect to Ray (or start a loopback-only local instance, stopped again at the end) and hold an
    actor pool."""
    import ray

    started = False
    if not ray.is_initialized():
        if address in (None, "local"):
            start_local_ray()
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    device, size = pool_size(device_request, num_gpus, num_workers)
    pool = RayActorPool(device, size)
    with _POOLS_LOCK:
        _POOLS[pool.pool] = pool
    try:
        yield pool
    finally:
        with _POOLS_LOCK:
            _POOLS.pop(pool.pool, None)
        pool.close()
        if started:
            ray.shutdown()
