"""Checking an img2dataset shard's files before the catalog registers it.

img2dataset's webdataset writer leaves three files per shard: `<shard>.tar` (the samples it downloaded),
`<shard>.parquet` (one row per URL: key, status, error_message, ...) and `<shard>_stats.json` (counts).
A download killed mid-shard, or a disk that filled up, leaves them disagreeing. `verify_img2dataset_shard`
reads all three (the tar once, hashing it in the same pass) and returns what the catalog records, or
raises `ShardIntegrityError` naming the file and the disagreement. No SQL here: the catalog writes.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from data_catalog.errors import ShardIntegrityError
from data_catalog.failures import classify_error

IMG2DATASET_COLUMNS = ("key", "status", "error_message")


def shard_parquet_path(tar_path: Path) -> Path:
    """img2dataset's per-sample Parquet of a shard: the tar's sibling `<shard>.parquet`."""
    return tar_path.with_suffix(".parquet")


def shard_stats_path(tar_path: Path) -> Path:
    return tar_path.with_name(f"{tar_path.stem}_stats.json")


@dataclass(frozen=True)
class VerifiedShard:
    """What registration records of a shard whose tar, Parquet and stats agree."""

    shard: str
    tar_path: Path
    samples_ok: int
    samples_failed: int
    failures: dict[str, int]  # failed samples by reason (data_catalog/failures.py)
    bytes: int
    sha256: str
    download_s: float | None


def verify_img2dataset_shard(tar_path: Path) -> VerifiedShard:
    """Read a shard's tar, Parquet and `_stats.json`, and check that they describe the same samples."""
    tar_path = Path(tar_path).absolute()
    for required in (tar_path, shard_parquet_path(tar_path), shard_stats_path(tar_path)):
        if not required.is_file():
            raise ShardIntegrityError(f"shard {tar_path.stem}: missing file {required}")
    tar = scan_tar(tar_path)
    parquet = scan_img2dataset_parquet(shard_parquet_path(tar_path))
    stats = read_stats(shard_stats_path(tar_path))
    _check_agreement(tar_path, tar, parquet, stats)
    return VerifiedShard(
        shard=tar_path.stem,
        tar_path=tar_path,
        samples_ok=len(tar.keys),
        samples_failed=parquet.rows - len(tar.keys),
        failures=parquet.failures,
        bytes=tar.bytes,
        sha256=tar.sha256,
        download_s=stats.get("duration"),
    )


def _check_agreement(tar_path: Path, tar: TarScan, parquet: ParquetScan, stats: dict[str, Any]) -> None:
    if tar.keys != parquet.success_keys:
        only_tar = sorted(tar.keys - parquet.success_keys)[:5]
        only_parquet = sorted(parquet.success_keys - tar.keys)[:5]
        raise ShardIntegrityError(
            f"shard {tar_path} holds {len(tar.keys)} samples but its Parquet lists "
            f"{len(parquet.success_keys)} successes (in the tar only: {only_tar}; "
            f"in the Parquet only: {only_parquet}); re-download the shard"
        )
    if stats["successes"] != len(parquet.success_keys) or stats["count"] != parquet.rows:
        raise ShardIntegrityError(
            f"shard {tar_path}: its _stats.json reports {stats['count']} samples and "
            f"{stats['successes']} successes, its Parquet {parquet.rows} and {len(parquet.success_keys)}"
        )


# -- the tar ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TarScan:
    keys: frozenset[str]
    sha256: str
    bytes: int


class _HashingReader:
    """A file wrapper that hashes every byte read, so a tar is checksummed in the same pass that lists it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.digest.update(data)
        self.bytes_read += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def sample_key(member_name: str) -> str:
    """WebDataset's rule: a sample's key is the member path up to the first dot of its file name."""
    folder, _, name = member_name.rpartition("/")
    stem = name.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def scan_tar(tar_path: Path) -> TarScan:
    """The sample keys, sha256 and size of a tar, read in one streaming pass."""
    with open(tar_path, "rb") as raw:
        reader = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                keys = frozenset(sample_key(member.name) for member in tar if member.isfile())
        except tarfile.TarError as err:
            raise ShardIntegrityError(f"shard tar {tar_path} is not a readable tar file: {err}") from err
        reader.drain()  # the zero padding after the end-of-archive marker is part of the checksum too
    return TarScan(keys, reader.digest.hexdigest(), reader.bytes_read)


# -- the Parquet and the stats ----------------------------------------------------------------------


@dataclass(frozen=True)
class ParquetScan:
    rows: int
    success_keys: frozenset[str]
    failures: dict[str, int]


def scan_img2dataset_parquet(parquet_path: Path) -> ParquetScan:
    """Rows, successful keys and failures by reason of one shard's Parquet."""
    try:
        names = pq.read_schema(parquet_path).names
        missing = [c for c in IMG2DATASET_COLUMNS if c not in names]
        if missing:
            raise ShardIntegrityError(f"shard Parquet {parquet_path} lacks column(s) {', '.join(missing)}")
        table = pq.read_table(parquet_path, columns=list(IMG2DATASET_COLUMNS))
    except (OSError, pa.ArrowException) as err:
        raise ShardIntegrityError(f"shard Parquet {parquet_path} is unreadable: {err}") from err
    keys, statuses, messages = (table.column(c).to_pylist() for c in IMG2DATASET_COLUMNS)
    success_keys = frozenset(k for k, s in zip(keys, statuses, strict=True) if s == "success")
    failures: dict[str, int] = {}
    for status, message in zip(statuses, messages, strict=True):
        if status != "success":
            reason = classify_error(message)
            failures[reason] = failures.get(reason, 0) + 1
    return ParquetScan(table.num_rows, success_keys, failures)


def read_stats(stats_path: Path) -> dict[str, Any]:
    """A shard's `_stats.json`, checked to hold the integer counts the cross-check needs."""
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ShardIntegrityError(f"shard stats {stats_path} is unreadable: {err}") from err
    missing = [k for k in ("count", "successes") if not isinstance(stats.get(k), int)]
    if missing:
        raise ShardIntegrityError(f"shard stats {stats_path} lacks integer field(s) {', '.join(missing)}")
    return stats
