"""BLIP-2 in plain PyTorch: frozen encoders, Q-Former, objectives, LLM bridge, CapFilt, training.

This package never imports Prefect or DuckDB; orchestration lives in `flows`, the catalog in
`data_catalog`.
"""

import concurrent.futures.thread as _futures_thread
import os as _os


def _forget_pool_threads_in_child() -> None:
    """A process forked from a thread-pool thread (a Prefect task, so our DataLoader workers and
    img2dataset's pool) inherits the pool's exit hook, which joins every pool thread: the forking
    thread among them, which in the child is the current one. Python 3.11 then raises "cannot join
    current thread" as the child exits, and it exits with status 1: torch's SIGCHLD handler reports
    that as a crashed DataLoader worker whenever it runs before the loader has forgotten its workers.
    None of the pool's threads exist in the child, so there is nothing for that hook to join."""
    _futures_thread._threads_queues.clear()


_os.register_at_fork(after_in_child=_forget_pool_threads_in_child)
