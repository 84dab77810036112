"""Catalog at paper scale: the questions flows and engineers ask, timed through the real Catalog API.

Two parts, both in a scratch folder (default: a temp dir, removed at the end):

1. Shard level. A catalog of --shards registered shards (default 13,000: 129M samples in shards of about
   10k) over six sources, with failures by reason per shard, two CapFilt config hashes (an older one done
   everywhere, the current one part done, part failed, some running, the rest pending) and their stage
   runs. Timed: `Catalog.open`, the planners' questions (`shard_plan`, `shard_statuses`), the full
   shard records (`shards`, `pending_shards`), `failures_by_reason`, `status_summary`, `runs`. Target:
   each under 100 ms.
   The rows are bulk-loaded into the catalog's own tables (same columns as registration writes):
   registering 13k real tars one by one (checksums) would take hours and is not what is measured.

2. Sample level. img2dataset-style per-shard Parquet (key, url, caption, status, error_message, sizes,
   exif, sha256; about 10% failed with real urllib/OpenCV messages) and CapFilt sidecars (the schema of
   blip2_core.capfilt: key, web caption, 10 candidates, 11 scores, ranked top-2, ...), one file each per
   shard, exactly where the catalog's views read them (shards/<source>/<shard>.parquet and
   capfilt/<hash>/<source>/<shard>.parquet). Catalogs over the first N shards, for each N in --sizes,
   time `sample_status_counts` (per-source status counts over every img2dataset Parquet),
   `capfilt_score_stats` (top-1 score mean and quantiles, web-caption kept share, over every sidecar) and
   `failed_samples` of one shard. Every file holds --rows-per-file rows (10k, as at paper scale), so the
   number of files grows with the rows as it will at 129M: a least-squares line t = a + b * rows over the
   sizes is extrapolated to 129M rows. A last catalog (--file-check-files, default 13,000 small files with
   the same total rows as the largest size) separates the cost per file from the cost per row
   (t = c * files + r * rows through the two points with equal rows), a second extrapolation to 129M rows
   in 12,900 files.
   Target: sample-level aggregates under 10 s at 129M (extrapolated).

Files are written once and read warm (the OS page cache holds them after writing); a cold first read
from network storage is slower. Candidate captions are drawn from a pool, so those columns compress
better than real ones; no timed question reads them (Parquet is read by column).

    nice python benchmarks/catalog_scale.py [--shards 13000 --sizes 250,500,1000 --rows-per-file 10000
                                             --file-check-files 13000 --repeats 3 --workdir DIR --keep]
    nice python benchmarks/catalog_scale.py --shards-only   # part 1 only: seconds, not the 10M-row layer
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_catalog import CAPFILT_STAGE, Catalog
from data_catalog.layout import Layout

PAPER_ROWS = 129_000_000
# 13,000 shards: the web sources hold nearly all of them, COCO and Visual Genome a few.
SOURCE_SHARE = {"laion": 0.8905, "cc12m": 0.077, "cc3m": 0.023, "sbu": 0.0077, "coco": 0.0009, "vg": 0.0009}
WEB_SOURCES = ("laion", "cc12m", "cc3m", "sbu")
CURRENT_HASH, OLD_HASH = "c0ffee000001", "c0ffee000000"

# (img2dataset status, error_message, share): messages as urllib and OpenCV word them.
FAILURES = (
    ("failed_to_download", "HTTP Error 404: Not Found", 0.040),
    ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", 0.020),
    ("failed_to_download", "timed out", 0.012),
    ("failed_to_download", "HTTP Error 403: Forbidden", 0.010),
    (
        "failed_to_download",
        "<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed>",
        0.005,
    ),
    ("failed_to_download", "HTTP Error 503: Service Unavailable", 0.004),
    ("failed_to_resize", "Image decoding error", 0.006),
    ("failed_to_resize", "image file is truncated (12 bytes not processed)", 0.003),
)
REASON_OF = {
    "HTTP Error 404": "http_404",
    "Name or service": "unreachable_host",
    "timed out": "timeout",
    "HTTP Error 403": "http_4xx",
    "SSL": "ssl_error",
    "HTTP Error 503": "http_5xx",
    "decoding": "not_an_image",
    "truncated": "truncated_image",
}
WORDS = (
    "a", "photo", "of", "the", "red", "blue", "green", "small", "large", "old", "new", "dog", "cat",
    "car", "house", "tree", "man", "woman", "child", "street", "beach", "mountain", "city", "river",
    "table", "chair", "window", "door", "boat", "bike", "sky", "cloud", "sunset", "kitchen", "garden",
    "field", "flower", "bird", "horse", "train", "plane", "road", "bridge", "park", "shop", "sign",
    "wall", "book", "phone", "cup", "plate", "food", "pizza",
)  # fmt: skip


# The columns of shard_stage_status, in table order.
STATUS_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("config_hash", pa.string()),
        ("source", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),
        ("run_id", pa.string()),
        ("output_path", pa.string()),
        ("error", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall seconds of `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def shards_per_source(total: int) -> dict[str, int]:
    counts = {s: max(1, round(total * share)) for s, share in SOURCE_SHARE.items()}
    counts["laion"] += total - sum(counts.values())
    return counts


# --- part 1: the shard-level catalog --------------------------------------------------------------


def shard_rows(counts: dict[str, int], home: Path, rng: np.random.Generator) -> tuple[pa.Table, pa.Table]:
    """The `shards` and `shard_failures` rows of registered shards with ~10% failed samples."""
    shards, failures = [], []
    now = datetime.now(UTC)
    reasons = [REASON_OF[next(k for k in REASON_OF if k in msg)] for _, msg, _ in FAILURES]
    shares = np.array([share for _, _, share in FAILURES])
    for source, n in counts.items():
        for i in range(n):
            shard = f"{i:05d}"
            per_reason = rng.poisson(shares * 10_000)
            failed = int(per_reason.sum())
            shards.append(
                {
                    "source": source,
                    "shard": shard,
                    "tar_path": str(home / "shards" / source / f"{shard}.tar"),
                    "samples_ok": 10_000 - failed,
                    "samples_failed": failed,
                    "bytes": int((10_000 - failed) * rng.normal(14_000, 500)),
                    "sha256": hashlib.sha256(f"{source}/{shard}".encode()).hexdigest(),
                    "download_s": float(rng.normal(8.0, 1.0)),
                    "registered_at": now,
                }
            )
            totals: dict[str, int] = {}
            for reason, k in zip(reasons, per_reason, strict=True):
                if k:
                    totals[reason] = totals.get(reason, 0) + int(k)
            shards[-1]["failures"] = json.dumps(totals)  # the shard_failures rows as one object
            failures += [
                {"source": source, "shard": shard, "reason": r, "samples": k} for r, k in totals.items()
            ]
    return pa.Table.from_pylist(shards), pa.Table.from_pylist(failures)


def stage_status_rows(counts: dict[str, int], runs: dict[str, str]) -> pa.Table:
    """CapFilt progress: the old hash done on every web shard; the current one ~77% done, some failed,
    64 running (8 tasks of 8 shards in flight), the rest never started (pending by absence)."""
    rows, now = [], datetime.now(UTC)
    web = [(s, f"{i:05d}") for s in WEB_SOURCES for i in range(counts[s])]
    for k, (source, shard) in enumerate(web):
        rows.append((OLD_HASH, source, shard, "done", runs[OLD_HASH], now))
        if k < int(0.77 * len(web)):
            status = "failed" if k % 97 == 0 else "done"
        elif k < int(0.77 * len(web)) + 64:
            status = "running"
        else:
            continue
        rows.append((CURRENT_HASH, source, shard, status, runs[CURRENT_HASH], now))
    cols = list(zip(*rows, strict=True))
    return pa.table(
        {
            "stage": [CAPFILT_STAGE] * len(rows),
            "config_hash": cols[0],
            "source": cols[1],
            "shard": cols[2],
            "status": cols[3],
            "run_id": cols[4],
            "output_path": [None] * len(rows),
            "error": ["ShardReadError: truncated tar" if s == "failed" else None for s in cols[3]],
            "updated_at": cols[5],
        },
        schema=STATUS_SCHEMA,
    )


def bulk_insert(path: Path, tables: dict[str, pa.Table]) -> None:
    """Append Arrow tables to catalog tables of the same column order, in one transaction."""
    con = duckdb.connect(str(path))
    try:
        con.execute("BEGIN TRANSACTION")
        for name, table in tables.items():
            con.register("incoming", table)
            con.execute(f"INSERT INTO {name} SELECT * FROM incoming")
            con.unregister("incoming")
        con.execute("COMMIT")
    finally:
        con.close()


def build_shard_catalog(home: Path, total: int, rng: np.random.Generator) -> dict[str, int]:
    counts = shards_per_source(total)
    path = Layout(home).catalog
    with Catalog.open(path) as cat:
        for source, n in counts.items():
            cat.upsert_source(
                source, "web", str(home / "manifests" / source), n * 10_500, {"duplicate_url": 12}
            )
        runs = {}
        for chash in (OLD_HASH, CURRENT_HASH):
            runs[chash] = cat.start_run(CAPFILT_STAGE, chash, {"sources": list(WEB_SOURCES)})
        cat.finish_run(runs[OLD_HASH], "done", {"shards_done": sum(counts[s] for s in WEB_SOURCES)})
        for _ in range(40):  # history: ingest runs, one per source and retry
            cat.finish_run(cat.start_run("ingest", "i0", {"source": "laion"}), "done", {})
    shards, failures = shard_rows(counts, home, rng)
    bulk_insert(path, {"shards": shards, "shard_failures": failures})
    bulk_insert(path, {"shard_stage_status": stage_status_rows(counts, runs)})
    return counts


def shard_questions(path: Path, repeats: int) -> list[dict[str, Any]]:
    """Each question: median seconds and how many rows it returned."""
    results = []

    def record(name: str, fn: Callable[[], Any]) -> None:
        seconds, value = timed(fn, repeats)
        size = len(value) if hasattr(value, "__len__") else len(value.sources) + len(value.stages)
        results.append({"question": name, "ms": round(seconds * 1000, 2), "rows": size})

    record("Catalog.open (read-only) + close", lambda: Catalog.open(path, read_only=True).close() or [])
    with Catalog.open(path, read_only=True) as cat:
        record("shard_plan('laion', capfilt, hash)  [CapFilt planner]", lambda: cat.shard_plan(
            "laion", CAPFILT_STAGE, CURRENT_HASH))  # fmt: skip
        record("shard_plan('laion')  [training planner]", lambda: cat.shard_plan("laion"))
        record("shards('laion')  [full records]", lambda: cat.shards("laion"))
        record("shard_statuses(capfilt, hash, 'laion')  [training planner]", lambda: cat.shard_statuses(
            CAPFILT_STAGE, CURRENT_HASH, "laion"))  # fmt: skip
        record("pending_shards(capfilt, hash)", lambda: cat.pending_shards(CAPFILT_STAGE, CURRENT_HASH))
        record(
            "pending_shard_count(capfilt, hash)",
            lambda: [None] * cat.pending_shard_count(CAPFILT_STAGE, CURRENT_HASH),
        )
        record(
            "pending_shards(capfilt, hash, 'sbu')",
            lambda: cat.pending_shards(CAPFILT_STAGE, CURRENT_HASH, "sbu"),
        )
        record("shard('laion', '05000')", lambda: [cat.shard("laion", "05000")])
        record("failures_by_reason()", cat.failures_by_reason)
        record("failures_by_reason('cc3m')", lambda: cat.failures_by_reason("cc3m"))
        record("status_summary()", cat.status_summary)
        record("runs()", cat.runs)
    return results


# --- part 2: the sample layer ---------------------------------------------------------------------


def caption_pool(rng: np.random.Generator, n: int) -> pa.Array:
    words = np.array(WORDS)
    picks = words[rng.integers(0, len(words), size=(n, 8))]
    return pa.array([" ".join(row) for row in picks])


def img2dataset_table(shard_idx: int, rows: int, captions: pa.Array, rng: np.random.Generator) -> pa.Table:
    keys = [f"{shard_idx:05d}{i:04d}" for i in range(rows)]
    shares = [1 - sum(f[2] for f in FAILURES), *(f[2] for f in FAILURES)]
    kind = pa.array(rng.choice(len(FAILURES) + 1, size=rows, p=shares).astype(np.int32))
    failed = pc.not_equal(kind, 0).to_numpy(zero_copy_only=False)
    digest = os.urandom(32 * rows).hex()

    def sizes(values: np.ndarray) -> pa.Array:
        return pa.array(values, mask=failed, type=pa.int64())

    return pa.table(
        {
            "key": keys,
            "url": [
                f"https://img{(shard_idx * 7 + i) % 9973}.example.com/p/{k}.jpg" for i, k in enumerate(keys)
            ],
            "caption": captions.take(pa.array(rng.integers(0, len(captions), size=rows))),
            "status": pa.array(["success", *(f[0] for f in FAILURES)]).take(kind),
            "error_message": pa.array([None, *(f[1] for f in FAILURES)], type=pa.string()).take(kind),
            "width": sizes(np.full(rows, 224)),
            "height": sizes(np.full(rows, 224)),
            "original_width": sizes(rng.integers(200, 2000, rows)),
            "original_height": sizes(rng.integers(200, 2000, rows)),
            "exif": pa.nulls(rows, pa.string()),
            "sha256": pa.array([digest[64 * i : 64 * i + 64] for i in range(rows)], mask=failed),
        }
    )


def _lists(values: pa.Array, width: int) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, width, dtype=np.int32)), values)


def interleave(a: pa.Array, b: pa.Array) -> pa.Array:
    """a0, b0, a1, b1, ...: the values of 2-element lists."""
    order = np.arange(2 * len(a)).reshape(2, -1).T.ravel()  # 0, n, 1, n+1, ...
    return pa.concat_arrays([a, b]).take(pa.array(order))


def sidecar_table(samples: pa.Table, captions: pa.Array, rng: np.random.Generator) -> pa.Table:
    """A CapFilt sidecar (blip2_core.capfilt's schema) for the successful samples of one shard."""
    done = samples.filter(pc.equal(samples["status"], "success"))
    n = done.num_rows
    web = done["caption"].combine_chunks()
    picks = rng.integers(0, len(captions), size=(n, 10))
    candidates = captions.take(pa.array(picks.ravel()))
    scores = np.sort(rng.normal(0.28, 0.04, size=(n, 11)).astype(np.float32), axis=1)[:, ::-1]
    rank = rng.integers(1, 12, size=n).astype(np.int16)  # the web caption's 1-based place among the 11
    top1 = pc.if_else(pa.array(rank == 1), web, captions.take(pa.array(picks[:, 0])))
    top2 = pc.if_else(pa.array(rank == 2), web, captions.take(pa.array(picks[:, 1])))
    errors = np.where(rng.random(n) < 0.001, "RuntimeError: image decode failed", None)
    return pa.table(
        {
            "key": done["key"],
            "web_caption": web,
            "candidates": _lists(candidates, 10),
            "scores": _lists(pa.array(scores.ravel()), 11),
            "top": _lists(interleave(top1, top2), 2),
            "top_scores": _lists(pa.array(scores[:, :2].ravel()), 2),
            "top1": top1,
            "top2": top2,
            "top1_score": scores[:, 0],
            "top2_score": scores[:, 1],
            "web_caption_rank": rank,
            "error": pa.array(errors, type=pa.string()),
        }
    )


def write_sample_layer(
    home: Path, files: int, rows: int, rng: np.random.Generator, distinct: int = 0
) -> None:
    """Per-shard img2dataset Parquet and CapFilt sidecars of source 'laion', shards 00000..files-1.

    With `distinct`, only that many files are written and the other shards are hard links to them: every
    path is still opened and read on its own, which is what the per-file cost is about.
    """
    layout = Layout(home)
    layout.shards("laion").mkdir(parents=True, exist_ok=True)
    layout.capfilt(CURRENT_HASH, "laion").mkdir(parents=True, exist_ok=True)
    captions = caption_pool(rng, 50_000)
    for i in range(files):
        shard_file = layout.shards("laion") / f"{i:05d}.parquet"
        sidecar = layout.capfilt_sidecar(CURRENT_HASH, "laion", f"{i:05d}")
        if distinct and i >= distinct:
            os.link(layout.shards("laion") / f"{i % distinct:05d}.parquet", shard_file)
            os.link(layout.capfilt_sidecar(CURRENT_HASH, "laion", f"{i % distinct:05d}"), sidecar)
            continue
        samples = img2dataset_table(i, rows, captions, rng)
        pq.write_table(samples, shard_file)
        pq.write_table(sidecar_table(samples, captions, rng), sidecar)


def sample_catalog(home: Path, files: int, rows: int) -> tuple[Path, float]:
    """A catalog (home/catalog-<files>.duckdb) with shards 00000..files-1 registered and CapFilt-done,
    and the seconds `backfill_summaries` took to write their per-shard summaries (what registration and
    the CapFilt flow write shard by shard, from the same files)."""
    path = home / f"catalog-{files}.duckdb"
    with Catalog.open(path) as cat:
        cat.upsert_source("laion", "web", str(home / "manifests" / "laion"), files * rows, {})
        run_id = cat.start_run(CAPFILT_STAGE, CURRENT_HASH, {})
    now = datetime.now(UTC) - timedelta(seconds=1)
    shards = pa.table(
        {
            "source": ["laion"] * files,
            "shard": [f"{i:05d}" for i in range(files)],
            "tar_path": [str(Layout(home).shards("laion") / f"{i:05d}.tar") for i in range(files)],
            "samples_ok": [int(rows * 0.9)] * files,
            "samples_failed": [rows - int(rows * 0.9)] * files,
            "bytes": [rows * 14_000] * files,
            "sha256": ["0" * 64] * files,
            "download_s": [8.0] * files,
            "registered_at": [now] * files,
            "failures": ["{}"] * files,
        }
    )
    statuses = pa.table(
        {
            "stage": [CAPFILT_STAGE] * files,
            "config_hash": [CURRENT_HASH] * files,
            "source": ["laion"] * files,
            "shard": [f"{i:05d}" for i in range(files)],
            "status": ["done"] * files,
            "run_id": [run_id] * files,
            "output_path": [None] * files,
            "error": [None] * files,
            "updated_at": [now] * files,
        },
        schema=STATUS_SCHEMA,
    )
    bulk_insert(path, {"shards": shards, "shard_stage_status": statuses})
    start = time.perf_counter()
    with Catalog.open(path) as cat:
        cat.backfill_summaries()
    return path, time.perf_counter() - start


def batch_write_seconds(path: Path, repeats: int, batch: int = 8) -> float:
    """What the CapFilt flow does per returned batch: `batch` shards marked done in one transaction,
    each shard's summary read from its sidecar; a catalog session (open + close) included."""
    from data_catalog import ShardStatusUpdate

    with Catalog.open(path) as cat:
        run_id = cat.start_run(CAPFILT_STAGE, CURRENT_HASH, {})
    with Catalog.open(path, read_only=True) as cat:
        registered = [s.shard for s in cat.shards("laion")][:batch]
    updates = [ShardStatusUpdate("laion", shard, "done") for shard in registered]

    def write() -> None:
        with Catalog.open(path) as cat:
            cat.set_shard_statuses(CAPFILT_STAGE, CURRENT_HASH, run_id, updates)

    return timed(write, repeats)[0]


def sample_questions(path: Path, repeats: int) -> dict[str, float]:
    with Catalog.open(path, read_only=True) as cat:
        status_s, counts = timed(cat.sample_status_counts, repeats)
        stats_s, stats = timed(lambda: cat.capfilt_score_stats(CURRENT_HASH), repeats)
        one_s, failed = timed(lambda: cat.failed_samples("laion", "00000"), repeats)
        histogram_s, _ = timed(lambda: cat.capfilt_score_histogram(CURRENT_HASH), 1)
    assert counts and stats and stats[0].samples > 0 and failed
    return {
        "sample_status_counts": status_s,
        "capfilt_score_stats": stats_s,
        "failed_samples(one shard)": one_s,
        "capfilt_score_histogram (Parquet scan, 1 call)": histogram_s,
    }


def fit_line(rows: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares t = a + b * rows: (a seconds, b seconds per row)."""
    b, a = np.polyfit(np.array(rows, dtype=float), np.array(seconds), 1)
    return float(a), float(b)


def run_sample_level(root: Path, sizes: list[int], rows: int, check_files: int, repeats: int) -> dict:
    rng = np.random.default_rng(1)
    home = root / "samples"
    start = time.perf_counter()
    write_sample_layer(home, max(sizes), rows, rng)
    written_s = time.perf_counter() - start
    measured = []
    for files in sizes:
        path, backfill_s = sample_catalog(home, files, rows)
        seconds = sample_questions(path, repeats)
        measured.append(
            {
                "files": files,
                "rows": files * rows,
                "backfill_s": round(backfill_s, 2),
                "set_shard_statuses(8 done)": round(batch_write_seconds(path, repeats), 3),
                **{k: round(v, 3) for k, v in seconds.items()},
            }
        )
        print(json.dumps(measured[-1]), flush=True)
    out: dict[str, Any] = {
        "rows_per_file": rows,
        "layer_bytes": _folder_bytes(home),
        "layer_write_s": round(written_s, 1),
        "measured": measured,
    }
    out["extrapolated_129M"] = {}
    for question in ("sample_status_counts", "capfilt_score_stats"):
        a, b = fit_line([m["rows"] for m in measured], [m[question] for m in measured])
        out["extrapolated_129M"][question] = {
            "intercept_s": round(a, 3),
            "ns_per_row": round(b * 1e9, 2),
            "predicted_s": round(a + b * PAPER_ROWS, 2),
        }
    if check_files:
        out["file_count_check"] = file_count_check(
            root, check_files, max(sizes) * rows, repeats, measured[-1]
        )
    return out


def file_count_check(root: Path, files: int, total_rows: int, repeats: int, same_rows: dict) -> dict:
    """The same rows in `files` smaller files: the per-file cost at the paper's file count.

    500 distinct files, the others hard links to them (see write_sample_layer): writing 13k files would
    take longer than the rest of the benchmark.
    """
    rng = np.random.default_rng(2)
    home = root / "many-files"
    rows = total_rows // files
    write_sample_layer(home, files, rows, rng, distinct=min(files, 500))
    path, backfill_s = sample_catalog(home, files, rows)
    seconds = sample_questions(path, repeats)
    result = {
        "files": files,
        "rows": files * rows,
        "backfill_s": round(backfill_s, 2),
        **{k: round(v, 3) for k, v in seconds.items()},
    }
    print(json.dumps(result), flush=True)
    # Two points with the same rows and different file counts separate t = c * files + r * rows.
    result["model_129M"] = {}
    for q in ("sample_status_counts", "capfilt_score_stats"):
        c = (result[q] - same_rows[q]) / (files - same_rows["files"])
        r = (same_rows[q] - c * same_rows["files"]) / same_rows["rows"]
        result["model_129M"][q] = {
            "ms_per_file": round(1000 * c, 3),
            "ns_per_row": round(1e9 * r, 2),
            "predicted_s": round(c * PAPER_ROWS / 10_000 + r * PAPER_ROWS, 2),
        }
    return result


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=13_000, help="registered shards of part 1")
    parser.add_argument("--sizes", default="250,500,1000", help="shard files per sample-level catalog")
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    parser.add_argument("--file-check-files", type=int, default=13_000, help="0: skip the file-count check")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--shards-only", action="store_true", help="part 1 only (no sample layer)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="catalog-scale-", dir=args.workdir))
    try:
        result = run(root, args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


def run(root: Path, args: argparse.Namespace) -> dict:
    home = root / "shard-level"
    start = time.perf_counter()
    counts = build_shard_catalog(home, args.shards, np.random.default_rng(0))
    result: dict[str, Any] = {
        "shards": sum(counts.values()),
        "shards_per_source": counts,
        "build_s": round(time.perf_counter() - start, 1),
        "catalog_bytes": Layout(home).catalog.stat().st_size,
        "shard_level": shard_questions(Layout(home).catalog, max(args.repeats, 5)),
    }
    for row in result["shard_level"]:
        print(json.dumps(row), flush=True)
    if args.shards_only:
        return result
    sizes = [int(s) for s in args.sizes.split(",")]
    result["sample_level"] = run_sample_level(
        root, sizes, args.rows_per_file, args.file_check_files, args.repeats
    )
    return result


if __name__ == "__main__":
    main()
