"""Catalog under load: many reader processes query the catalog while a writer process writes to it.

DuckDB lets one process hold a catalog file for writing, or any number for reading, never both: every
session (writer or reader) waits for the file lock (`Catalog.open(timeout_s=...)`, the flows' short
`catalog_session`s). This measures what that costs when a flow writes while people and dashboards read:

- 1 writer process, as the ingest / CapFilt / training flows write: every --write-interval seconds a short
  session that registers a new img2dataset shard (tar + Parquet + stats written first, outside the
  session), or logs a step of training metrics, or records a CapFilt shard status (in turn);
- --readers reader processes, each looping over the questions `blip2 catalog status|runs|metrics` and
  the flows' planners ask: status_summary, shards, failures_by_reason, runs, metrics, pending_shards;
  each in its own read-only session (open, query, close), as a CLI call or a dashboard refresh does.

Reported per role: operations, operations/s, latency percentiles (open + query + close, lock waits
included) and failures (any exception, a lock wait past --timeout included; target: zero). At the end
the catalog is checked against what the writer did: every shard it registered, every metric step it
logged, every status it set is there exactly once (nothing lost, nothing doubled).

    nice python benchmarks/catalog_load.py [--readers 8 --seconds 30 --write-interval 0.2
                                            --initial-shards 40 --timeout 60 --workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

SOURCE, CAPFILT_HASH = "load", "loadhash"


def write_shard(folder: Path, shard_id: int, samples: int = 4) -> Path:
    """A tiny img2dataset shard triple (tar, Parquet, stats) that registration verifies for real."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"{shard_id:05d}"
    keys = [f"{shard_id:05d}{i:04d}" for i in range(samples)]
    status = ["success"] * (samples - 1) + ["failed_to_download"]
    errors = [None] * (samples - 1) + ["HTTP Error 404: Not Found"]
    with tarfile.open(folder / f"{name}.tar", "w") as tar:
        for key in keys[:-1]:
            for ext, payload in (("jpg", b"\xff\xd8" + key.encode()), ("txt", b"a cat"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    table = pa.table({"key": keys, "url": [f"http://e.test/{k}" for k in keys], "caption": ["a"] * samples,
                      "status": status, "error_message": errors})  # fmt: skip
    pq.write_table(table, folder / f"{name}.parquet")
    stats = {"count": samples, "successes": samples - 1, "failed_to_download": 1, "duration": 0.1}
    (folder / f"{name}_stats.json").write_text(json.dumps(stats))
    return folder / f"{name}.tar"


def setup(home: Path, initial_shards: int) -> str:
    from flows.common import catalog_session, layout_for

    layout = layout_for(home)
    folder = layout.shards(SOURCE)
    folder.mkdir(parents=True)
    with catalog_session(layout) as cat:
        cat.upsert_source(SOURCE, "parquet", str(layout.manifests(SOURCE)), 10_000, {"duplicate_url": 3})
        for i in range(initial_shards):
            cat.register_img2dataset_shard(SOURCE, write_shard(folder, i))
        run_id = cat.start_run("stage1", "load", {"steps": 1_000_000})
        cat.start_run("capfilt", CAPFILT_HASH, {})
    return run_id


def _timed(op, results: list, failures: list, name: str) -> None:
    start = time.perf_counter()
    try:
        op()
        results.append((name, time.perf_counter() - start))
    except Exception as err:  # every failure is counted and reported, never retried away
        failures.append(f"{name}: {type(err).__name__}: {str(err)[:200]}")


def writer(home: str, run_id: str, first_shard: int, go: float, stop: float, interval: float, out: str):
    import os

    os.environ["BLIP2_CATALOG_TIMEOUT_S"] = os.environ.get("BLIP2_LOAD_TIMEOUT", "60")
    from flows.common import catalog_session, layout_for

    layout = layout_for(Path(home))
    folder = layout.shards(SOURCE)
    with catalog_session(layout, read_only=True) as cat:
        capfilt_run = next(r.run_id for r in cat.runs("capfilt"))
    results, failures, done = [], [], {"shards": [], "steps": [], "statuses": []}
    time.sleep(max(0.0, go - time.time()))
    n = 0
    while time.time() < stop:
        kind = ("register", "metrics", "status")[n % 3]
        if kind == "register":
            tar = write_shard(folder, first_shard + len(done["shards"]))  # files first, outside the lock

            def op(tar=tar):
                with catalog_session(layout) as cat:
                    cat.register_img2dataset_shard(SOURCE, tar)
                done["shards"].append(tar.stem)
        elif kind == "metrics":
            step = len(done["steps"]) + 1

            def op(step=step):
                with catalog_session(layout) as cat:
                    cat.log_metrics(run_id, step, {"loss": 1.0 / step, "lr": 1e-4, "samples_per_s": 100.0})
                done["steps"].append(step)
        else:
            shard = f"{len(done['statuses']) % first_shard:05d}"

            def op(shard=shard):
                with catalog_session(layout) as cat:
                    cat.set_shard_status("capfilt", CAPFILT_HASH, SOURCE, shard, "done", capfilt_run)
                done["statuses"].append(shard)

        _timed(op, results, failures, kind)
        n += 1
        time.sleep(interval)
    Path(out).write_text(
        json.dumps({"role": "writer", "results": results, "failures": failures, "done": done})
    )


def reader(home: str, run_id: str, go: float, stop: float, out: str):
    import os

    os.environ["BLIP2_CATALOG_TIMEOUT_S"] = os.environ.get("BLIP2_LOAD_TIMEOUT", "60")
    from flows.common import catalog_session, layout_for

    layout = layout_for(Path(home))
    questions = {
        "status_summary": lambda cat: cat.status_summary(),
        "shards": lambda cat: cat.shards(SOURCE),
        "failures_by_reason": lambda cat: cat.failures_by_reason(SOURCE),
        "runs": lambda cat: cat.runs(),
        "metrics": lambda cat: cat.metrics(run_id, "loss"),
        "pending_shards": lambda cat: cat.pending_shards("capfilt", CAPFILT_HASH, SOURCE),
    }
    names = list(questions)
    results, failures = [], []
    time.sleep(max(0.0, go - time.time()))
    n = 0
    while time.time() < stop:
        name = names[n % len(names)]

        def op(name=name):
            with catalog_session(layout, read_only=True) as cat:
                questions[name](cat)

        _timed(op, results, failures, name)
        n += 1
    Path(out).write_text(json.dumps({"role": "reader", "results": results, "failures": failures}))


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99), "max_ms": 1000 * ordered[-1],
            "mean_ms": 1000 * statistics.fmean(ordered)}  # fmt: skip


def check_catalog(home: Path, run_id: str, initial: int, done: dict) -> list[str]:
    """Problems found comparing the catalog with what the writer reported doing (empty: none)."""
    from data_catalog import Catalog
    from data_catalog.layout import Layout

    problems = []
    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        shards = [s.shard for s in cat.shards(SOURCE)]
        steps = [m.step for m in cat.metrics(run_id, "loss")]
        statuses = {s.shard for s in cat.shard_statuses("capfilt", CAPFILT_HASH, SOURCE)}
    if len(shards) != len(set(shards)) or len(shards) != initial + len(done["shards"]):
        problems.append(f"shards: catalog has {len(shards)}, expected {initial} + {len(done['shards'])}")
    if sorted(steps) != sorted(done["steps"]):
        problems.append(f"metric steps: catalog {len(steps)}, writer logged {len(done['steps'])}")
    if statuses != set(done["statuses"]):
        problems.append(f"statuses: catalog {len(statuses)} shards, writer set {len(set(done['statuses']))}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--write-interval", type=float, default=0.2)
    ap.add_argument("--initial-shards", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=60.0, help="lock wait before a session fails (s)")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    import os

    os.environ["BLIP2_LOAD_TIMEOUT"] = str(args.timeout)
    work = Path(tempfile.mkdtemp(prefix="catalog-load-", dir=args.workdir))
    try:
        home = work / "var"
        run_id = setup(home, args.initial_shards)
        ctx = mp.get_context("spawn")
        go = time.time() + 15.0  # every process imports and waits: the load starts at once
        stop = go + args.seconds
        outs = [work / f"r{i}.json" for i in range(args.readers)]
        procs = [ctx.Process(target=reader, args=(str(home), run_id, go, stop, str(o))) for o in outs]
        w_out = work / "writer.json"
        procs.append(ctx.Process(
            target=writer,
            args=(str(home), run_id, args.initial_shards, go, stop, args.write_interval, str(w_out)),
        ))  # fmt: skip
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        reports = [json.loads(o.read_text()) for o in [*outs, w_out] if o.exists()]
        crashed = len(procs) - len(reports)
        summary = {"readers": args.readers, "seconds": args.seconds, "write_interval": args.write_interval,
                   "timeout_s": args.timeout, "crashed_processes": crashed, "roles": {}}  # fmt: skip
        for role in ("reader", "writer"):
            mine = [r for r in reports if r["role"] == role]
            lat = [t for r in mine for _, t in r["results"]]
            fails = [f for r in mine for f in r["failures"]]
            by_op: dict[str, list[float]] = {}
            for r in mine:
                for name, t in r["results"]:
                    by_op.setdefault(name, []).append(t)
            summary["roles"][role] = {
                "ops": len(lat), "ops_per_s": len(lat) / args.seconds, "failures": len(fails),
                "failure_examples": fails[:3], **percentiles(lat),
                "by_op": {k: {"ops": len(v), **percentiles(v)} for k, v in sorted(by_op.items())},
            }  # fmt: skip
        writer_report = next((r for r in reports if r["role"] == "writer"), None)
        summary["catalog_check"] = (
            check_catalog(home, run_id, args.initial_shards, writer_report["done"])
            if writer_report
            else ["writer crashed"]
        )
        print(json.dumps(summary, indent=1))
        ok = crashed == 0 and not summary["catalog_check"]
        ok = ok and all(summary["roles"][r]["failures"] == 0 for r in summary["roles"])
        return 0 if ok else 1
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
