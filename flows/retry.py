"""Retrying failed URLs inside finished shards (img2dataset never does).

The failed rows of a shard's Parquet are downloaded again by img2dataset into `_retry/<shard>/`; the
recovered images are merged into the shard under their original keys, so sample keys stay stable and
the shard stays one self-consistent (tar, Parquet, stats) triple. The three new files are written
beside the old ones, then swapped in under a journal: a run killed half-way through the swap is rolled
forward by `recover_interrupted_retries` before anything reads the folder again.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from blip2_core.fileio import atomic_write_text, check_sample_key
from data_catalog.failures import classify_error
from flows.download import DownloadOptions, img2dataset_kwargs, worker_command

# Transient by nature; a 404 or a non-image will fail the same way again.
RETRYABLE_REASONS: tuple[str, ...] = ("http_5xx", "timeout", "connection_refused", "unreachable_host")
# Columns img2dataset writes itself; the rest came from the manifest and travel with the retry.
_IMG2DATASET_COLUMNS = frozenset(
    {
        "key",
        "url",
        "caption",
        "status",
        "error_message",
        "width",
        "height",
        "original_width",
        "original_height",
        "exif",
        "sha256",
    }
)
_ORIG_KEY = "_blip2_orig_key"
_SUFFIXES = (".tar", ".parquet", "_stats.json")


@dataclass(frozen=True)
class RetryResult:
    retried: int
    recovered: int


def retry_shard_failures(
    shard_dir: Path, shard: str, opts: DownloadOptions, reasons: set[str], allow_loopback: bool = False
) -> RetryResult:
    """Download again the failed samples of one finished shard whose reason is in `reasons`."""
    table = pq.read_table(shard_dir / f"{shard}.parquet")
    rows = table.to_pylist()
    for row in rows:  # keys become tar member names below: none may climb out of a folder
        check_sample_key(row["key"])
    todo = [r for r in rows if r["status"] != "success" and classify_error(r["error_message"]) in reasons]
    if not todo:
        return RetryResult(0, 0)
    work = shard_dir / "_retry" / shard
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fresh = _download_again(todo, table.column_names, work, opts, allow_loopback)
    recovered = {r[_ORIG_KEY]: r for r in fresh if r["status"] == "success"}
    retried = {r[_ORIG_KEY]: r for r in fresh}
    staged = {
        ".tar": work / f"{shard}.tar.new",
        ".parquet": work / f"{shard}.parquet.new",
        "_stats.json": work / f"{shard}_stats.json.new",
    }
    _merge_tar(shard_dir / f"{shard}.tar", work / "out" / "00000.tar", recovered, staged[".tar"])
    merged = _merge_rows(rows, retried)
    pq.write_table(pa.Table.from_pylist(merged, schema=table.schema), staged[".parquet"])
    _write_stats(shard_dir / f"{shard}_stats.json", merged, len(todo), staged["_stats.json"])
    _commit(shard_dir, shard, staged)
    shutil.rmtree(work / "out", ignore_errors=True)
    return RetryResult(len(todo), len(recovered))


def recover_interrupted_retries(shard_dir: Path) -> int:
    """Finish every swap a killed retry left half-done; returns how many were rolled forward."""
    journals = sorted((shard_dir / "_retry").glob("*.commit")) if shard_dir.exists() else []
    for journal in journals:
        _apply(journal)
    return len(journals)


def _download_again(
    todo: list[dict], columns: list[str], work: Path, opts: DownloadOptions, allow_loopback: bool
) -> list[dict]:
    extra = [c for c in columns if c not in _IMG2DATASET_COLUMNS]
    urls = [
        {"url": r["url"], "caption": r["caption"], _ORIG_KEY: r["key"], **{c: r[c] for c in extra}}
        for r in todo
    ]
    pq.write_table(pa.Table.from_pylist(urls), work / "urls.parquet")
    one_shard = opts.model_copy(update={"samples_per_shard": len(todo), "processes": 1})
    kwargs = img2dataset_kwargs(work / "urls.parquet", work / "out", one_shard, [*extra, _ORIG_KEY])
    with open(work / "img2dataset.log", "wb") as log:
        subprocess.run(
            worker_command(kwargs, opts.max_image_pixels, allow_loopback),
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"),
        )
    return pq.read_table(work / "out" / "00000.parquet").to_pylist()


def _merge_tar(old_tar: Path, retry_tar: Path, recovered: dict[str, dict], out: Path) -> None:
    """The old shard's members, then each recovered sample renamed to its original key."""
    new_to_orig = {r["key"]: orig for orig, r in recovered.items()}
    with tarfile.open(out, "w") as dst:
        with tarfile.open(old_tar) as src:
            for member in src:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        if not recovered:
            return
        with tarfile.open(retry_tar) as src:
            for member in src:
                stem, dot, ext = member.name.partition(".")
                if stem not in new_to_orig or not member.isfile():
                    continue
                data = src.extractfile(member).read()
                if ext == "json":
                    meta = json.loads(data)
                    meta["key"] = new_to_orig[stem]
                    meta.pop(_ORIG_KEY, None)
                    data = json.dumps(meta).encode()
                info = tarfile.TarInfo(f"{new_to_orig[stem]}{dot}{ext}")
                info.size, info.mtime, info.mode = len(data), member.mtime, member.mode
                dst.addfile(info, io.BytesIO(data))


def _merge_rows(rows: list[dict], retried: dict[str, dict]) -> list[dict]:
    """Each retried row replaced by its new outcome, under its original key."""
    merged = []
    for row in rows:
        new = retried.get(row["key"])
        if new is not None:
            row = {**{k: new.get(k) for k in row}, "key": row["key"]}
        merged.append(row)
    return merged


def _write_stats(old_stats: Path, rows: list[dict], n_retried: int, out: Path) -> None:
    stats = json.loads(old_stats.read_text())
    statuses = [r["status"] for r in rows]
    stats.update(
        count=len(rows),
        successes=statuses.count("success"),
        failed_to_download=statuses.count("failed_to_download"),
        failed_to_resize=statuses.count("failed_to_resize"),
        retried=stats.get("retried", 0) + n_retried,
    )
    out.write_text(json.dumps(stats, indent=2))


def _commit(shard_dir: Path, shard: str, staged: dict[str, Path]) -> None:
    pairs = [[str(new), str(shard_dir / f"{shard}{suffix}")] for suffix, new in staged.items()]
    journal = shard_dir / "_retry" / f"{shard}.commit"
    atomic_write_text(journal, json.dumps(pairs))
    _apply(journal)


def _apply(journal: Path) -> None:
    for new, final in json.loads(journal.read_text()):
        if os.path.exists(new):
            os.replace(new, final)
    journal.unlink()
