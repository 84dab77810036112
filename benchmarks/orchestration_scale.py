"""Orchestration at scale: what a Prefect task run of the CapFilt flow costs against the work it carries.

A 13k-shard CapFilt run is `ceil(13,000 / shards_per_task)` task runs (1,625 at the default 8), each a
batch of shards. This runs the real `capfilt_flow` (planning over the catalog, one `capfilt-shards`
task run per batch, each returned batch's statuses and the next batch's 'running' written by the flow
process in one catalog session and transaction (with per-shard score summaries from the sidecars),
progress artifact, summary, table artifact) on the local ephemeral Prefect server, over a catalog of
--catalog-shards registered shards (default 13,000), with the model work replaced by a stand-in that
writes a one-row sidecar per shard and sleeps --work-s seconds per task. What remains is the
orchestration: Prefect's task-run bookkeeping and the catalog writes per batch.

For each number of task runs in --tasks and each number of batches in flight in --slots (1 = the local
engine; the Ray engine keeps one batch per actor in flight), it reports the flow's wall time, seconds
per task run (wall / tasks, and the slope of a line through the task counts, which leaves out the fixed
start and summary), and the share of it spent writing the catalog. It then sets the per-task overhead
against the work per task: shards_per_task x 10,000 images at the GPU target of 400 images/s/GPU, and
at the CPU figures measured by benchmarks/capfilt_throughput.py (BENCHMARKS.md).

    nice python benchmarks/orchestration_scale.py [--tasks 25,50,100 --slots 1,8 --shards-per-task 8
                                                   --catalog-shards 13000 --work-s 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# A private Prefect home and an ephemeral local API: set before Prefect is imported.
_PREFECT_HOME = tempfile.mkdtemp(prefix="orchestration-prefect-")
os.environ.update(
    PREFECT_HOME=_PREFECT_HOME,
    PREFECT_API_URL="",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_LOGGING_LEVEL="WARNING",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import flows.capfilt as fc  # noqa: E402
from blip2_core.capfilt import _sidecar_schema  # noqa: E402
from data_catalog import Catalog  # noqa: E402
from data_catalog.layout import Layout  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from catalog_scale import bulk_insert, shard_rows  # noqa: E402

IMAGES_PER_SHARD = 10_000
GPU_TARGET_IMAGES_S = 400.0
# benchmarks/capfilt_throughput.py on the 2-core development CPU (BENCHMARKS.md, CapFilt section).
CPU_MEASURED_IMAGES_S = {"cpu tiny config (measured)": 16.48, "cpu mid config (measured)": 1.03}
PAPER_SHARDS = 13_000


class StandInWork:
    """Replaces run_shard_batch: a one-row sidecar per shard (the flow's summary reads the sidecars),
    then `work_s` of sleep for the batch. Counts the seconds the flow spends in catalog writes."""

    def __init__(self, work_s: float) -> None:
        self.work_s = work_s
        self.row = pa.Table.from_pylist([_ONE_ROW], schema=_sidecar_schema())

    def __call__(self, items: list[dict], cfg_dict: dict) -> list[dict]:
        for item in items:
            Path(item["out"]).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(self.row, item["out"])
        time.sleep(self.work_s)
        return [
            {
                "source": item["source"],
                "shard": item["shard"],
                "output_path": item["out"],
                "status": "done",
                "error": None,
                "seconds": self.work_s / len(items),
                "n_ok": 1,
                "n_failed": 0,
                "web_kept_share": 1.0,
                "top1_score_mean": 0.3,
                "web_score_mean": 0.3,
                "degenerate_share": 0.0,
            }
            for item in items
        ]


_ONE_ROW = {
    "key": "000000000",
    "web_caption": "a dog",
    "candidates": ["a dog"] * 10,
    "scores": [0.3] * 11,
    "top": ["a dog", "a dog"],
    "top_scores": [0.3, 0.3],
    "top1": "a dog",
    "top2": "a dog",
    "top1_score": 0.3,
    "top2_score": 0.3,
    "web_caption_rank": 0,
    "error": None,
}


class CatalogTimer:
    """Times the flow's per-batch catalog write (record_batches: one session, one transaction)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._record = fc.record_batches
        fc.record_batches = self._timed(self._record)

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper


def build_home(home: Path, shards: int) -> Path:
    """A catalog with `shards` registered shards of source 'laion', and stand-in model files."""
    with Catalog.open(Layout(home).catalog) as cat:
        cat.upsert_source("laion", "web", str(home / "manifests" / "laion"), shards * IMAGES_PER_SHARD, {})
    table, failures = shard_rows({"laion": shards}, home, np.random.default_rng(0))
    bulk_insert(Layout(home).catalog, {"shards": table, "shard_failures": failures})
    models = home / "models"
    (models / "captioner").mkdir(parents=True)
    (models / "ranker.safetensors").write_bytes(b"stand-in weights: never loaded")
    return models


def params_for(home: Path, models: Path, tasks: int, spt: int, run: int) -> fc.CapFiltParams:
    # An explicit shard list recomputes exactly these shards each time (no cache hits between runs).
    shards = tuple(f"{i:05d}" for i in range(tasks * spt))
    return fc.CapFiltParams(
        sources=("laion",),
        shards=shards,
        captioner=models / "captioner",
        ranker=fc.RankerParams(weights=models / "ranker.safetensors"),
        device="cpu",
        shards_per_task=spt,
        batch_size=16 + run,  # a new config hash per run: each run writes its own sidecar folder
        home=home,
    )


def run_flow(params: fc.CapFiltParams, slots: int, timer: CatalogTimer) -> dict[str, Any]:
    import contextlib

    @contextlib.contextmanager
    def engine(_params):
        yield fc.LocalEngine(device="cpu", slots=slots)

    fc.open_engine = engine
    timer.seconds = 0.0
    start = time.perf_counter()
    summary = fc.capfilt_flow(params)
    wall = time.perf_counter() - start
    assert summary.shards_done == len(params.shards), summary
    return {"task_runs": summary.task_runs, "wall_s": round(wall, 2), "catalog_s": round(timer.seconds, 2)}


def compare(per_task_s: float, spt: int) -> dict[str, Any]:
    """Per-task overhead against the work of one task at the GPU target and at measured CPU speeds."""
    images = spt * IMAGES_PER_SHARD
    rows = {"gpu target 400 img/s": GPU_TARGET_IMAGES_S, **CPU_MEASURED_IMAGES_S}
    out = {}
    for name, rate in rows.items():
        work = images / rate
        out[name] = {"work_per_task_s": round(work, 1), "overhead_share": round(per_task_s / work, 6)}
    # The flow dispatches and registers one batch at a time: with G GPUs a batch comes back every
    # work/G seconds, so the flow keeps up while per_task_s < work/G.
    out["gpus_one_flow_process_keeps_busy"] = int(images / GPU_TARGET_IMAGES_S / per_task_s)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="25,50,100", help="task runs per flow run (comma-separated)")
    parser.add_argument("--slots", default="1,8", help="batches in flight (comma-separated)")
    parser.add_argument("--shards-per-task", type=int, default=8)
    parser.add_argument("--catalog-shards", type=int, default=PAPER_SHARDS)
    parser.add_argument("--work-s", type=float, default=0.0, help="stand-in work per task (sleep)")
    args = parser.parse_args()
    tasks = [int(t) for t in args.tasks.split(",")]
    slots = [int(s) for s in args.slots.split(",")]
    from prefect.testing.utilities import prefect_test_harness

    home = Path(tempfile.mkdtemp(prefix="orchestration-home-"))
    try:
        # A local Prefect API in a subprocess on a fresh SQLite file, as `blip2 demo` and the tests use.
        with prefect_test_harness(server_startup_timeout=180):
            result = measure(home, tasks, slots, args)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(_PREFECT_HOME, ignore_errors=True)
    print(json.dumps(result))


def measure(home: Path, tasks: list[int], slots: list[int], args: argparse.Namespace) -> dict[str, Any]:
    spt = args.shards_per_task
    models = build_home(home, max(args.catalog_shards, max(tasks) * spt))
    fc.run_shard_batch = StandInWork(args.work_s)
    timer = CatalogTimer()
    run_flow(params_for(home, models, 1, spt, 0), 1, timer)  # warm-up: starts the ephemeral API
    runs, n = [], 1
    for s in slots:
        for t in tasks:
            row = {"slots": s, "tasks": t, **run_flow(params_for(home, models, t, spt, n), s, timer)}
            row["s_per_task"] = round(row["wall_s"] / t, 3)
            print(json.dumps(row), flush=True)
            runs.append(row)
            n += 1
    result: dict[str, Any] = {
        "catalog_shards": max(args.catalog_shards, max(tasks) * spt),
        "shards_per_task": spt,
        "work_s": args.work_s,
        "paper_task_runs": -(-PAPER_SHARDS // spt),
        "runs": runs,
        "per_slots": {},
    }
    for s in slots:
        mine = [r for r in runs if r["slots"] == s]
        slope, start = np.polyfit([r["tasks"] for r in mine], [r["wall_s"] for r in mine], 1)
        per_task = float(slope) - args.work_s / s
        result["per_slots"][s] = {
            "fixed_s": round(float(start), 2),
            "overhead_per_task_s": round(per_task, 3),
            "catalog_share": round(sum(r["catalog_s"] for r in mine) / sum(r["wall_s"] for r in mine), 3),
            "paper_run_overhead_h": round(per_task * result["paper_task_runs"] / 3600, 2),
            "against_work": compare(per_task, spt),
        }
    return result


if __name__ == "__main__":
    main()
