"""The DuckDB catalog: sources, shards, stage runs, per-shard stage status, checkpoints, metrics, evals.

One process writes the catalog at a time (DuckDB locks the file); `Catalog.open` waits for the lock up
to `timeout_s`. Per-sample data stays in Parquet (img2dataset's per-shard files, CapFilt sidecars) and is
read on demand with `read_parquet`, so the catalog file stays small at 129M samples; only the files of
registered shards and finished CapFilt shards are read. The aggregates over every shard (samples per
status, CapFilt score statistics) sum per-shard summaries kept in the catalog instead (`summaries.py`),
written when a shard is registered or marked done. Checking a shard's files before it is registered
is `shard_files.py`'s job; this module holds the SQL.

The schema is versioned: `migrations/NNNN_name.sql` files, applied in order, in one transaction, when
an older catalog is opened; `schema_version` records which ones a file has.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import uuid
import zoneinfo
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from data_catalog.errors import CatalogError, CatalogLockedError, CatalogVersionError
from data_catalog.errors import ShardIntegrityError as ShardIntegrityError  # re-exported
from data_catalog.failures import failure_reason_macro_sql
from data_catalog.layout import Layout
from data_catalog.records import (
    CAPFILT_STAGE,
    FINAL_RUN_STATUSES,
    SHARD_STATUSES,
    CapfiltScoreHistogram,
    CapfiltScoreStats,
    CatalogSummary,
    CheckpointRecord,
    EvalRecord,
    FailedSample,
    MetricRecord,
    PlannedShard,
    ShardRecord,
    ShardStatusRecord,
    ShardStatusUpdate,
    SourceRecord,
    SourceSummary,
    StageRunRecord,
    StageSummary,
)
from data_catalog.shard_files import VerifiedShard, shard_parquet_path, verify_img2dataset_shard
from data_catalog.summaries import CAPFILT_SUMMARY_SQL, ScoreSummary

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# The catalog must never reach the network: no extension downloads. Timestamps are read back in UTC.
_DUCKDB_CONFIG = {"autoinstall_known_extensions": False, "TimeZone": "UTC"}
_LOCK_ERROR = "Could not set lock on file"
_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<program>.+?) \(PID (?P<pid>\d+)\)")
_MIGRATION_NAME = re.compile(r"^(?P<version>\d{4})_[a-z0-9_]+\.sql$")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------------
# Migrations


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The numbered migrations in `directory`, checked to run 1, 2, ... without gaps."""
    migrations = []
    for path in sorted(Path(directory).glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise CatalogError(f"migration file {path} is not named NNNN_lowercase_name.sql")
        migrations.append(Migration(int(match["version"]), path.name, path.read_text(encoding="utf-8")))
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise CatalogError(
                f"migration {migration.name} in {directory} has version {migration.version}, "
                f"expected {expected}: versions must run 1, 2, ... without gaps or repeats"
            )
    return migrations


def _schema_version(con: duckdb.DuckDBPyConnection) -> int:
    (exists,) = con.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_schema = 'main' AND table_name = 'schema_version'"
    ).fetchone()
    if not exists:
        return 0
    return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]


def _migrate(
    con: duckdb.DuckDBPyConnection, path: Path, migrations: list[Migration], read_only: bool
) -> None:
    current = _schema_version(con)
    latest = migrations[-1].version if migrations else 0
    if current > latest:
        raise CatalogVersionError(
            f"catalog {path} has schema version {current}, but this code knows versions up to {latest}: "
            "it was written by a newer release of the pipeline; upgrade the code to open it"
        )
    missing = [m for m in migrations if m.version > current]
    if not missing:
        return
    if read_only:
        raise CatalogVersionError(
            f"catalog {path} has schema version {current}, but this code needs version {latest}; "
            "open it once without read_only to apply the migrations"
        )
    # All or nothing: a failed migration leaves the file exactly at its old version.
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMPTZ NOT NULL)"
        )
        for migration in missing:
            _apply(con, path, migration)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _apply(con: duckdb.DuckDBPyConnection, path: Path, migration: Migration) -> None:
    try:
        con.execute(migration.sql)
    except duckdb.Error as err:
        raise CatalogError(f"migration {migration.name} failed on catalog {path}: {err}") from err
    con.execute("INSERT INTO schema_version VALUES (?, ?, now())", [migration.version, migration.name])


# ---------------------------------------------------------------------------------------------------
# Opening under DuckDB's file lock


def _connect(path: Path, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
    """Connect, retrying while another process holds the file lock, for at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=_DUCKDB_CONFIG)
        except duckdb.IOException as err:
            if _LOCK_ERROR not in str(err):
                raise CatalogError(f"cannot open catalog {path}: {err}") from err
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CatalogLockedError(_locked_message(path, str(err), timeout_s)) from err
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)
        except duckdb.Error as err:  # e.g. the same process holds it open with another read_only setting
            raise CatalogError(f"cannot open catalog {path}: {err}") from err


def _locked_message(path: Path, duckdb_message: str, timeout_s: float) -> str:
    holder = _LOCK_HOLDER.search(duckdb_message)
    who = f"process {holder['pid']} ({holder['program']})" if holder else "another process"
    return (
        f"catalog {path} is locked by {who} and stayed locked for {timeout_s:g} s. Only one process "
        "may open the catalog at a time: wait for that process to finish, stop it, or open the "
        "catalog with a longer timeout_s."
    )


# ---------------------------------------------------------------------------------------------------
# Writing a verified shard


def _write_shard(
    con: duckdb.DuckDBPyConnection,
    source: str,
    shard: VerifiedShard,
    summaries: bool = True,
    failures_column: bool = True,
) -> None:
    key = [source, shard.shard]
    previous = con.execute("SELECT sha256 FROM shards WHERE source = ? AND shard = ?", key).fetchone()
    if previous is not None and previous[0] != shard.sha256:
        # Every stage output derived from the old bytes is stale: the shard is pending everywhere again.
        for table in (_CAPFILT_SUMMARY_TABLES if summaries else ()) + ("shard_stage_status",):
            con.execute(f"DELETE FROM {table} WHERE source = ? AND shard = ?", key)
    con.execute("DELETE FROM shard_failures WHERE source = ? AND shard = ?", key)
    if summaries:
        con.execute("DELETE FROM shard_sample_status WHERE source = ? AND shard = ?", key)
    if (
        summaries and shard.statuses and None not in shard.statuses
    ):  # a NULL status: the Parquet answers for it
        con.execute(
            "INSERT INTO shard_sample_status SELECT $source, $shard, unnest($statuses), unnest($counts)",
            {
                "source": source,
                "shard": shard.shard,
                "statuses": list(shard.statuses),
                "counts": list(shard.statuses.values()),
            },
        )
    row = [
        *key,
        str(shard.tar_path),
        shard.samples_ok,
        shard.samples_failed,
        shard.bytes,
        shard.sha256,
        shard.download_s,
    ]
    if failures_column:  # migration 0004: the shard_failures rows below, as one JSON object
        con.execute(
            "INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?, now(), ?)",
            [*row, json.dumps(shard.failures)],
        )
    else:
        con.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?, now())", row)
    if shard.failures:
        con.execute(
            "INSERT INTO shard_failures SELECT $source, $shard, unnest($reasons), unnest($counts)",
            {
                "source": source,
                "shard": shard.shard,
                "reasons": list(shard.failures),
                "counts": list(shard.failures.values()),
            },
        )


_CAPFILT_SUMMARY_TABLES = ("capfilt_shard_summaries", "capfilt_shard_score_bins")


def _write_capfilt_summaries(con: duckdb.DuckDBPyConnection, rows: list[tuple]) -> None:
    """Store per-sidecar rows of CAPFILT_SUMMARY_SQL (the shards' old summaries are deleted first)."""
    for row in rows:
        key, figures, (top1_bins, web_bins) = list(row[:3]), list(row[3:-2]), row[-2:]
        for table in _CAPFILT_SUMMARY_TABLES:
            con.execute(f"DELETE FROM {table} WHERE config_hash = ? AND source = ? AND shard = ?", key)
        con.execute(
            "INSERT INTO capfilt_shard_summaries VALUES (" + ", ".join("?" * len(row[:-2])) + ")",
            key + figures,
        )
        top1_bins, web_bins = top1_bins or {}, web_bins or {}
        bins = sorted(set(top1_bins) | set(web_bins))
        if bins:
            con.execute(
                "INSERT INTO capfilt_shard_score_bins "
                "SELECT $h, $source, $shard, unnest($bins), unnest($top1), unnest($web)",
                {
                    "h": key[0],
                    "source": key[1],
                    "shard": key[2],
                    "bins": bins,
                    "top1": [top1_bins.get(b, 0) for b in bins],
                    "web": [web_bins.get(b, 0) for b in bins],
                },
            )


# ---------------------------------------------------------------------------------------------------
# Row -> record conversion


def _json_dict(text: str | None) -> dict[str, Any] | None:
    return None if text is None else json.loads(text)


def _source_record(row: tuple) -> SourceRecord:
    name, kind, manifest_dir, n_urls, dropped, updated_at = row
    return SourceRecord(name, kind, manifest_dir, n_urls, json.loads(dropped), updated_at)


# Records of thousands of shards are built in Python: timestamps come as epoch microseconds (DuckDB's own
# time-zone-aware conversion took most of a 10k-row fetch) and shards of one folder share its Path.
_UTC = zoneinfo.ZoneInfo(
    "UTC"
)  # the tzinfo DuckDB's own conversion gives, so records compare and print alike
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)


def _utc(epoch_us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=epoch_us)


def _child(parent: Path, name: str) -> Path:
    """parent / name for a plain file name, without parsing it again (pathlib's own iterdir shortcut)."""
    make = getattr(parent, "_make_child_relpath", None)
    if make is None or name in ("", ".", ".."):
        return parent / name
    return make(name)


def _shard_records(rows: list[tuple]) -> list[ShardRecord]:
    # One json.loads over every row's failures: it parses each reason name once and is one call, not
    # one per shard (half the time at 10k shards).
    all_failures = json.loads("[" + ",".join(row[5] for row in rows) + "]")
    folders: dict[str, Path] = {}
    records = []
    for row, failures in zip(rows, all_failures, strict=True):
        source, shard, tar_path, ok, failed, _, size, sha256, download_s, registered_us = row
        folder, _, name = tar_path.rpartition("/")
        parent = folders.get(folder)
        if parent is None:
            parent = folders[folder] = Path(folder or ".")
        path = _child(parent, name) if folder else Path(tar_path)
        records.append(
            ShardRecord(
                source,
                shard,
                path,
                ok,
                failed,
                failures,
                size,
                sha256,
                download_s,
                _utc(registered_us),
            )
        )
    return records


def _run_record(row: tuple) -> StageRunRecord:
    run_id, stage, config_hash, params, flow_run_id, status, started, finished, summary = row
    return StageRunRecord(
        run_id,
        stage,
        config_hash,
        json.loads(params),
        flow_run_id,
        status,
        started,
        finished,
        _json_dict(summary),
    )


def _shard_select(where: str, failures_column: bool = True) -> str:
    """Shard rows chosen by `where` (over `shards AS s`) with their failures: the shard's own column
    (migration 0004), or before it, aggregated from shard_failures for the chosen shards only."""
    if failures_column:
        return f"""
    SELECT s.source, s.shard, s.tar_path, s.samples_ok, s.samples_failed,
           coalesce(s.failures, '{{}}')::VARCHAR, s.bytes, s.sha256, s.download_s, epoch_us(s.registered_at)
    FROM shards AS s WHERE {where}
    ORDER BY s.source, s.shard
    """
    return f"""
    WITH s AS (SELECT * FROM shards AS s WHERE {where}),
    f AS (
        SELECT x.source, x.shard, json_group_object(x.reason, x.samples)::VARCHAR AS failures
        FROM shard_failures AS x SEMI JOIN s ON x.source = s.source AND x.shard = s.shard
        GROUP BY x.source, x.shard
    )
    SELECT s.source, s.shard, s.tar_path, s.samples_ok, s.samples_failed, coalesce(f.failures, '{{}}'),
           s.bytes, s.sha256, s.download_s, epoch_us(s.registered_at)
    FROM s LEFT JOIN f ON f.source = s.source AND f.shard = s.shard
    ORDER BY s.source, s.shard
    """


# Per CapFilt config, the sums of its done shards' summaries (a summary of a shard not 'done' is never
# left behind, but the join keeps the answer right even if one were).
_DONE_SUMMARIES = """
    FROM {table} AS m JOIN shard_stage_status AS t
      ON t.stage = '{stage}' AND t.status = 'done' AND t.config_hash = m.config_hash
     AND t.source = m.source AND t.shard = m.shard
    WHERE $config_hash IS NULL OR m.config_hash = $config_hash
"""
_SUMMED_CAPFILT_SQL = (
    "SELECT m.config_hash, sum(m.samples)::BIGINT, sum(m.errors)::BIGINT, sum(m.web_kept)::BIGINT, "
    "sum(m.top1_n)::BIGINT, sum(m.top1_sum), sum(m.top1_sumsq), min(m.top1_min), max(m.top1_max)"
    + _DONE_SUMMARIES.format(table="capfilt_shard_summaries", stage=CAPFILT_STAGE)
    + " GROUP BY 1"
)
_SUMMED_CAPFILT_BINS_SQL = (
    "SELECT m.config_hash, m.bin, sum(m.top1)::BIGINT"
    + _DONE_SUMMARIES.format(table="capfilt_shard_score_bins", stage=CAPFILT_STAGE)
    + " GROUP BY ALL HAVING sum(m.top1) > 0"
)
_SUMMARIES_VERSION = 3  # migrations/0003_per_shard_summaries.sql
_FAILURES_COLUMN_VERSION = 4  # migrations/0004_shard_failures_json.sql
_SUMMARY_CHUNK = 512  # sidecars per summary query
_RUN_SELECT = """
    SELECT run_id, stage, config_hash, params, flow_run_id, status, started_at, finished_at, summary
    FROM stage_runs
"""


def _to_json(value: dict[str, Any], what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serialisable: {err}") from err


def _float_values(values: dict[str, float], what: str) -> list[float]:
    try:
        return [float(v) for v in values.values()]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must map names to numbers: {err}") from err


def _new_run_id(stage: str) -> str:
    # Sortable by start time, unique across machines, and safe as a folder name under runs/<stage>/.
    return f"{stage}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class _SampleFile:
    """A per-sample Parquet file the catalog vouches for, and the shard it belongs to."""

    path: str
    source: str
    shard: str
    config_hash: str = ""  # CapFilt sidecars only

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.config_hash, self.source, self.shard)


# The per-sample views read `samples` (every row of the chosen files, with `filename`) joined to `files`
# (what each file belongs to) on `samples.filename = files.path`.
_SAMPLE_FILES_CTE = """
    WITH files AS (
        SELECT unnest($paths) AS path, unnest($sources) AS source, unnest($shards) AS shard,
               unnest($config_hashes) AS config_hash
    ),
    samples AS (SELECT * FROM read_parquet($paths, union_by_name = true, filename = true))
"""


# ---------------------------------------------------------------------------------------------------
# The catalog


class Catalog:
    """A connection to the catalog file. Use `Catalog.open(path)`; close it (or use `with`) when done.

    Methods are safe to call from several threads of one process; they serialise on one connection.
    """

    def __init__(self, connection: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> None:
        self._con = connection
        self._path = path
        self._read_only = read_only
        self._lock = threading.RLock()
        self._closed = False
        # Opened with an older migrations folder (tests of upgrades): no summary tables, Parquet answers;
        # no failures column in shards, shard_failures answers.
        version = _schema_version(connection)
        self._summaries = version >= _SUMMARIES_VERSION
        self._failures_column = version >= _FAILURES_COLUMN_VERSION

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        read_only: bool = False,
        timeout_s: float = 30.0,
        migrations_dir: Path | None = None,
    ) -> Catalog:
        """Open the catalog at `path`, creating or migrating it; wait up to `timeout_s` for the lock."""
        path = Path(path).absolute()
        if read_only and not path.exists():
            # Reading comes before any writer created the file (e.g. `blip2 catalog status` on a new home).
            raise CatalogError(f"no catalog at {path}: run an ingest first (blip2 ingest ...)")
        path.parent.mkdir(parents=True, exist_ok=True)
        migrations = load_migrations(migrations_dir or MIGRATIONS_DIR)
        con = _connect(path, read_only, timeout_s)
        try:
            _migrate(con, path, migrations, read_only)
            con.execute(failure_reason_macro_sql())
        except BaseException:
            con.close()
            raise
        return cls(con, path, read_only)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._con.close()
                self._closed = True

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def home(self) -> Path:
        """The BLIP2_HOME root: the catalog file lives at its top."""
        return self._path.parent

    @property
    def layout(self) -> Layout:
        return Layout(self.home)

    @property
    def schema_version(self) -> int:
        with self._lock:
            return _schema_version(self._con)

    # -- plumbing ------------------------------------------------------------------------------------

    def _fetch(self, sql: str, **params: Any) -> list[tuple]:
        with self._lock:
            self._check_open()
            return self._con.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            self._check_open()
            if self._read_only:
                raise CatalogError(f"catalog {self._path} was opened read-only; it cannot be written")
            self._con.execute("BEGIN TRANSACTION")
            try:
                yield self._con
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise

    def _check_open(self) -> None:
        if self._closed:
            raise CatalogError(f"catalog {self._path} is closed")

    def _require_run(self, con: duckdb.DuckDBPyConnection, run_id: str) -> str:
        row = con.execute("SELECT status FROM stage_runs WHERE run_id = ?", [run_id]).fetchone()
        if row is None:
            raise CatalogError(f"unknown run id {run_id!r} in catalog {self._path}; start_run() creates runs")
        return row[0]

    # -- sources -------------------------------------------------------------------------------------

    def upsert_source(
        self, name: str, kind: str, manifest_dir: str, n_urls: int, dropped: dict[str, int]
    ) -> None:
        """Create or replace a source; `dropped` counts manifest rows removed before download, by reason."""
        if n_urls < 0:
            raise ValueError(f"n_urls of source {name!r} must be >= 0, got {n_urls}")
        with self._transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?, ?, now())",
                [name, kind, str(manifest_dir), n_urls, _to_json(dropped, f"dropped of source {name!r}")],
            )

    def sources(self) -> list[SourceRecord]:
        rows = self._fetch(
            "SELECT name, kind, manifest_dir, n_urls, dropped, updated_at FROM sources ORDER BY name"
        )
        return [_source_record(row) for row in rows]

    def delete_source(self, name: str) -> int:
        """Forget a source: its row, its shards, their failures and stage statuses, in one transaction.

        Files on disk are left alone, and so are stage runs (they are history). Returns how many shards
        were forgotten. Meant for ingesting a source again under the same name.
        """
        with self._transaction() as con:
            self._require_source(con, name)
            (n_shards,) = con.execute("SELECT count(*) FROM shards WHERE source = ?", [name]).fetchone()
            summaries = (*_CAPFILT_SUMMARY_TABLES, "shard_sample_status") if self._summaries else ()
            tables = (*summaries, "shard_stage_status", "shard_failures")
            for table in (*tables, "shards"):
                con.execute(f"DELETE FROM {table} WHERE source = ?", [name])
            con.execute("DELETE FROM sources WHERE name = ?", [name])
        return n_shards

    def _require_source(self, con: duckdb.DuckDBPyConnection, name: str) -> None:
        if con.execute("SELECT 1 FROM sources WHERE name = ?", [name]).fetchone() is None:
            raise CatalogError(f"unknown source {name!r} in catalog {self._path}; upsert_source() it first")

    # -- shards --------------------------------------------------------------------------------------

    def register_img2dataset_shard(self, source: str, tar_path: Path) -> ShardRecord:
        """Verify an img2dataset shard (tar + `.parquet` + `_stats.json`) and record it.

        Re-registering replaces the shard's row; if the tar's content changed, the shard's stage statuses
        are dropped too, because every output derived from the old content is stale.
        """
        with self._lock:
            self._check_open()
            self._require_source(self._con, source)  # before reading a large tar for nothing
        verified = verify_img2dataset_shard(tar_path)  # outside the lock: other threads keep going
        with self._transaction() as con:
            self._require_source(con, source)  # no foreign keys since migration 0002: checked here
            _write_shard(con, source, verified, self._summaries, self._failures_column)
        return self.shard(source, verified.shard)

    def shards(self, source: str | None = None) -> list[ShardRecord]:
        rows = self._fetch(
            _shard_select("$source IS NULL OR s.source = $source", self._failures_column),
            source=source,
        )
        return _shard_records(rows)

    def shard_plan(
        self, source: str | None = None, stage: str | None = None, config_hash: str | None = None
    ) -> list[PlannedShard]:
        """Registered shards of `source` (all when None), ordered, as a stage's planner needs them: tar
        path, samples and status under (stage, config_hash), 'pending' where there is none (and for
        every shard when no stage is asked). What `shards` gives besides (failures, checksum, a Path and
        a datetime per shard) costs most of its time at 10k shards and no planner reads it."""
        if (stage is None) != (config_hash is None):
            raise ValueError("shard_plan: give both stage and config_hash, or neither")
        rows = self._fetch(
            """
            SELECT s.source, s.shard, s.tar_path, s.samples_ok, coalesce(t.status, 'pending')
            FROM shards AS s LEFT JOIN shard_stage_status AS t
              ON t.stage = $stage AND t.config_hash = $config_hash
             AND t.source = s.source AND t.shard = s.shard
            WHERE $source IS NULL OR s.source = $source
            ORDER BY s.source, s.shard
            """,
            source=source,
            stage=stage,
            config_hash=config_hash,
        )
        return list(map(PlannedShard._make, rows))

    def shard(self, source: str, shard: str) -> ShardRecord | None:
        rows = self._fetch(
            _shard_select("s.source = $source AND s.shard = $shard", self._failures_column),
            source=source,
            shard=shard,
        )
        return _shard_records(rows)[0] if rows else None

    def failures_by_reason(self, source: str | None = None) -> dict[str, int]:
        """Failed samples by reason over registered shards, most frequent first."""
        rows = self._fetch(
            "SELECT reason, sum(samples)::BIGINT AS n FROM shard_failures "
            "WHERE $source IS NULL OR source = $source GROUP BY reason ORDER BY n DESC, reason",
            source=source,
        )
        return dict(rows)

    # -- per-sample views over Parquet ---------------------------------------------------------------
    # Only files the catalog vouches for are read, never a glob of the data folders: img2dataset writes a
    # shard's Parquet in place while it downloads, and flows/ingest.py keeps quarantined shards and retry
    # staging under the shard folders. A shard's Parquet is read once the shard is registered (its three
    # files were verified to agree); a CapFilt sidecar once its shard is 'done' for that config hash (the
    # flow sets it after the sidecar is renamed into place). Either way a half-written file, a shard
    # still downloading and a sidecar of an older download of a shard (re-registering new bytes drops
    # the shard's stage statuses) are never counted.

    def sample_status_counts(self, source: str | None = None) -> dict[str, dict[str, int]]:
        """{source: {img2dataset status: samples}} of registered shards.

        From the per-shard counts written at registration; a shard registered before those existed
        (schema version < 3, until backfill_summaries) is counted from its Parquet. Every registered
        shard's Parquet must still exist, as before.
        """
        files = self._registered_shard_files(source)
        summed = {(f.source, f.shard) for f in files} & self._shards_with_status_counts(source)
        rows = (
            self._fetch(
                "SELECT source, status, sum(samples)::BIGINT FROM shard_sample_status "
                "WHERE $source IS NULL OR source = $source GROUP BY ALL",
                source=source,
            )
            if self._summaries
            else []
        )
        rows += self._query_sample_files(
            "SELECT f.source, s.status, count(*) FROM samples AS s JOIN files AS f ON s.filename = f.path "
            "GROUP BY ALL",
            [f for f in files if (f.source, f.shard) not in summed],
        )
        counts: dict[str, dict[str, int]] = {}
        for source_name, status, n in sorted(rows, key=lambda r: (r[0], r[1] is None, r[1] or "")):
            per_source = counts.setdefault(source_name, {})
            per_source[status] = per_source.get(status, 0) + n
        return counts

    def _shards_with_status_counts(self, source: str | None) -> set[tuple[str, str]]:
        if not self._summaries:
            return set()
        rows = self._fetch(
            "SELECT DISTINCT source, shard FROM shard_sample_status "
            "WHERE $source IS NULL OR source = $source",
            source=source,
        )
        return set(rows)

    def failed_samples(self, source: str, shard: str | None = None) -> list[FailedSample]:
        """Every sample of `source` (or of one registered shard) that img2dataset failed to download."""
        files = [f for f in self._registered_shard_files(source) if shard is None or f.shard == shard]
        rows = self._query_sample_files(
            "SELECT f.source, f.shard, s.key, s.url, s.caption, s.status, "
            "failure_reason(s.error_message), s.error_message "
            "FROM samples AS s JOIN files AS f ON s.filename = f.path "
            "WHERE s.status IS DISTINCT FROM 'success' ORDER BY ALL",
            files,
        )
        return [FailedSample(*row) for row in rows]

    def capfilt_score_stats(
        self, config_hash: str | None = None, *, exact: bool = False
    ) -> list[CapfiltScoreStats]:
        """Per CapFilt config: the top-1 CLIP score distribution and how often the web caption is kept.

        Combined from the per-shard summaries written when each shard was marked done (a shard done
        before they existed is read from its sidecar): samples, errors, the mean and the kept share are
        exact; the p10 / median / p90 come from 512 fixed bins over [-1, 1] and are within one bin width
        (0.0039) of the exact values. `exact=True` reads every done sidecar for exact quantiles instead
        (about 1 ms per file: minutes at 13k shards). Every done shard's sidecar must exist.
        """
        files = self._done_capfilt_sidecars(config_hash)
        if exact:
            return self._exact_capfilt_stats(files)
        summaries: dict[str, ScoreSummary] = {}
        if self._summaries:
            for h, *figures in self._fetch(_SUMMED_CAPFILT_SQL, config_hash=config_hash):
                summaries[h] = ScoreSummary.of_row((*figures, {}))
            for h, b, n in self._fetch(_SUMMED_CAPFILT_BINS_SQL, config_hash=config_hash):
                summaries[h].top1_bins[b] = n
        summarized = self._summarized_capfilt_shards(config_hash)
        for row in self._capfilt_summary_rows([f for f in files if f.key not in summarized]):
            # (config_hash, source, shard, samples, errors, kept, top1 n/sum/sumsq/min/max, web ..., bins)
            summary = ScoreSummary.of_row((*row[3:11], row[-2]))
            summaries.setdefault(row[0], ScoreSummary()).merge(summary)
        # A config whose done sidecars hold no rows at all has no statistics (as the Parquet scan says).
        return [
            _stats_of_summary(h, summaries[h])
            for h in sorted(summaries)
            if summaries[h].samples or summaries[h].errors
        ]

    def _exact_capfilt_stats(self, files: list[_SampleFile]) -> list[CapfiltScoreStats]:
        # The web caption is kept when it is one of the two captions CapFilt kept; comparing the text does
        # not depend on whether web_caption_rank counts from 0 or 1.
        rows = self._query_sample_files(
            """
            SELECT f.config_hash,
                   count(*) FILTER (WHERE s.error IS NULL),
                   count(*) FILTER (WHERE s.error IS NOT NULL),
                   avg(s.top1_score) FILTER (WHERE s.error IS NULL),
                   quantile_cont(s.top1_score, [0.1, 0.5, 0.9]) FILTER (WHERE s.error IS NULL),
                   avg(coalesce(s.web_caption IN (s.top1, s.top2), false)::INTEGER)
                       FILTER (WHERE s.error IS NULL)
            FROM samples AS s JOIN files AS f ON s.filename = f.path
            GROUP BY 1 ORDER BY 1
            """,
            files,
        )
        return [_capfilt_stats(row) for row in rows]

    def _summarized_capfilt_shards(self, config_hash: str | None) -> set[tuple[str, str, str]]:
        if not self._summaries:
            return set()
        rows = self._fetch(
            "SELECT config_hash, source, shard FROM capfilt_shard_summaries "
            "WHERE $config_hash IS NULL OR config_hash = $config_hash",
            config_hash=config_hash,
        )
        return set(rows)

    def _sidecar(self, config_hash: str, source: str, shard: str) -> _SampleFile:
        return _SampleFile(
            str(self.layout.capfilt_sidecar(config_hash, source, shard)), source, shard, config_hash
        )

    def _capfilt_summary_rows(self, files: list[_SampleFile], missing_ok: bool = False) -> list[tuple]:
        """CAPFILT_SUMMARY_SQL over sidecars, a chunk of files per query (memory stays flat). With
        `missing_ok`, files that are missing or unreadable are skipped (no summary) instead of raising."""
        if missing_ok:
            files = [f for f in files if Path(f.path).is_file()]
        rows = []
        for i in range(0, len(files), _SUMMARY_CHUNK):
            try:
                rows += self._query_sample_files(CAPFILT_SUMMARY_SQL, files[i : i + _SUMMARY_CHUNK])
            except CatalogError:
                if not missing_ok:
                    raise
        return rows

    def backfill_summaries(self) -> dict[str, int]:
        """Write the per-shard summaries that shards registered or CapFilt-done before schema version 3
        lack, reading their Parquet once; afterwards no question needs to. Returns how many were written."""
        files = [
            f
            for f in self._registered_shard_files(None)
            if (f.source, f.shard) not in self._shards_with_status_counts(None)
        ]
        counts: list[tuple] = []
        for i in range(0, len(files), _SUMMARY_CHUNK):
            counts += self._query_sample_files(
                "SELECT f.source, f.shard, s.status, count(*) FROM samples AS s "
                "JOIN files AS f ON s.filename = f.path WHERE s.status IS NOT NULL GROUP BY ALL",
                files[i : i + _SUMMARY_CHUNK],
            )
        summarized = self._summarized_capfilt_shards(None)
        sidecars = [f for f in self._done_capfilt_sidecars(None) if f.key not in summarized]
        summaries = self._capfilt_summary_rows(sidecars)
        with self._transaction() as con:
            if counts:
                con.execute(
                    "INSERT OR REPLACE INTO shard_sample_status "
                    "SELECT unnest($sources), unnest($shards), unnest($statuses), unnest($counts)",
                    {
                        "sources": [r[0] for r in counts],
                        "shards": [r[1] for r in counts],
                        "statuses": [r[2] for r in counts],
                        "counts": [r[3] for r in counts],
                    },
                )
            _write_capfilt_summaries(con, summaries)
        return {"shards": len({(r[0], r[1]) for r in counts}), "capfilt_shards": len(summaries)}

    def capfilt_score_histogram(self, config_hash: str, bins: int = 20) -> CapfiltScoreHistogram:
        """The top-1 and the web caption's CLIP scores of one config's done sidecars, counted in `bins`
        equal-width bins over their joint range. Failed samples and unscored (NaN) captions are left out."""
        if bins < 1:
            raise ValueError(f"a histogram needs at least one bin, got {bins}")
        # scores[-1] is the web caption's score (the candidates come first); bin = floor of the scaled
        # offset, the maximum folded into the last bin. One value only: everything in bin 0.
        rows = self._query_sample_files(
            """
            , scored AS (
                SELECT unnest(['top1', 'web']) AS which,
                       unnest([s.top1_score::DOUBLE, s.scores[-1]::DOUBLE]) AS score
                FROM samples AS s JOIN files AS f ON s.filename = f.path WHERE s.error IS NULL
            ),
            valid AS (SELECT which, score FROM scored WHERE score IS NOT NULL AND NOT isnan(score)),
            span AS (SELECT min(score) AS lo, max(score) AS hi FROM valid)
            SELECT which, lo, hi,
                   least(coalesce(floor((score - lo) / nullif(hi - lo, 0) * $bins), 0), $bins - 1)::INTEGER
                       AS bin,
                   count(*)
            FROM valid, span GROUP BY ALL ORDER BY ALL
            """,
            self._done_capfilt_sidecars(config_hash),
            bins=bins,
        )
        return _capfilt_histogram(config_hash, bins, rows)

    def _registered_shard_files(self, source: str | None) -> list[_SampleFile]:
        rows = self._fetch(
            "SELECT source, shard, tar_path FROM shards WHERE $source IS NULL OR source = $source "
            "ORDER BY source, shard",
            source=source,
        )
        files = [_SampleFile(str(shard_parquet_path(Path(tar))), src, shard) for src, shard, tar in rows]
        for f in files:
            if not Path(f.path).is_file():
                raise CatalogError(
                    f"shard {f.source}/{f.shard} is registered but its Parquet {f.path} is missing; "
                    f"ingest the source again, or delete_source({f.source!r}) to forget its shards"
                )
        return files

    def _done_capfilt_sidecars(self, config_hash: str | None) -> list[_SampleFile]:
        rows = self._fetch(
            "SELECT config_hash, source, shard FROM shard_stage_status WHERE stage = $stage "
            "AND status = 'done' AND ($config_hash IS NULL OR config_hash = $config_hash) ORDER BY ALL",
            stage=CAPFILT_STAGE,
            config_hash=config_hash,
        )
        files = [
            _SampleFile(str(self.layout.capfilt_sidecar(h, source, shard)), source, shard, h)
            for h, source, shard in rows
        ]
        for f in files:
            if not Path(f.path).is_file():
                raise CatalogError(
                    f"CapFilt config {f.config_hash} is done for shard {f.source}/{f.shard}, but its "
                    f"sidecar {f.path} is missing; reset_shard_status() the shard to run it again"
                )
        return files

    def _query_sample_files(self, sql: str, files: list[_SampleFile], **params: Any) -> list[tuple]:
        """Run a view over `samples` joined to `files` (see _SAMPLE_FILES_CTE); no files, no rows."""
        if not files:
            return []
        try:
            return self._fetch(
                _SAMPLE_FILES_CTE + sql,
                paths=[f.path for f in files],
                sources=[f.source for f in files],
                shards=[f.shard for f in files],
                config_hashes=[f.config_hash for f in files],
                **params,
            )
        except duckdb.Error as err:
            raise CatalogError(
                f"cannot query Parquet files ({files[0].path} and {len(files) - 1} more): {err}"
            ) from err

    # -- stage runs ----------------------------------------------------------------------------------

    def start_run(self, stage: str, config_hash: str, params: dict, flow_run_id: str | None = None) -> str:
        """Record a new running stage run and return its id."""
        if not _STAGE_NAME.match(stage):
            raise ValueError(f"stage name {stage!r} must be letters, digits, '_', '.' or '-'")
        run_id = _new_run_id(stage)
        params_json = _to_json(params, f"params of stage {stage!r}")
        with self._transaction() as con:
            con.execute(
                "INSERT INTO stage_runs VALUES (?, ?, ?, ?, ?, 'running', now(), NULL, NULL)",
                [run_id, stage, config_hash, params_json, flow_run_id],
            )
        return run_id

    def finish_run(self, run_id: str, status: str, summary: dict | None = None) -> None:
        """Close a running run with a final status ("done", "failed" or "cancelled") and a summary."""
        if status not in FINAL_RUN_STATUSES:
            raise ValueError(
                f"final status of run {run_id!r} must be one of {FINAL_RUN_STATUSES}, got {status!r}"
            )
        summary_json = None if summary is None else _to_json(summary, f"summary of run {run_id!r}")
        with self._transaction() as con:
            current = self._require_run(con, run_id)
            if current != "running":
                raise CatalogError(f"run {run_id!r} already finished with status {current!r}")
            con.execute(
                "UPDATE stage_runs SET status = ?, finished_at = now(), summary = ? WHERE run_id = ?",
                [status, summary_json, run_id],
            )

    def runs(self, stage: str | None = None) -> list[StageRunRecord]:
        rows = self._fetch(
            _RUN_SELECT + " WHERE $stage IS NULL OR stage = $stage ORDER BY started_at, run_id", stage=stage
        )
        return [_run_record(row) for row in rows]

    def run(self, run_id: str) -> StageRunRecord | None:
        rows = self._fetch(_RUN_SELECT + " WHERE run_id = $run_id", run_id=run_id)
        return _run_record(rows[0]) if rows else None

    # -- per-shard stage status ----------------------------------------------------------------------

    def set_shard_status(
        self,
        stage: str,
        config_hash: str,
        source: str,
        shard: str,
        status: str,
        run_id: str,
        output_path: str | None = None,
        error: str | None = None,
    ) -> None:
        """Record where a registered shard stands in (stage, config_hash)."""
        self.set_shard_statuses(
            stage, config_hash, run_id, [ShardStatusUpdate(source, shard, status, output_path, error)]
        )

    def set_shard_statuses(
        self, stage: str, config_hash: str, run_id: str, updates: Iterable[ShardStatusUpdate]
    ) -> None:
        """Record where many registered shards stand in (stage, config_hash), in one transaction.

        A CapFilt shard marked 'done' gets its per-shard summary (data_catalog/summaries.py) from its
        sidecar, read before the transaction; a sidecar that is missing or unreadable gets none, and the
        score questions read it from Parquet instead (and name it if it is missing).
        """
        updates = list({(u.source, u.shard): u for u in updates}.values())  # the last word per shard
        for u in updates:
            if u.status not in SHARD_STATUSES:
                raise ValueError(
                    f"status of shard {u.source}/{u.shard} must be one of {SHARD_STATUSES}, got {u.status!r}"
                )
        if not updates:
            return
        summarize = stage == CAPFILT_STAGE and self._summaries
        done = [u for u in updates if u.status == "done"] if summarize else []
        summaries = self._capfilt_summary_rows(
            [self._sidecar(config_hash, u.source, u.shard) for u in done], missing_ok=True
        )
        columns = {
            "sources": [u.source for u in updates],
            "shards": [u.shard for u in updates],
        }
        with self._transaction() as con:
            self._require_run(con, run_id)
            unknown = con.execute(
                "SELECT u.source, u.shard FROM (SELECT unnest($sources) AS source, unnest($shards) AS shard) "
                "AS u ANTI JOIN shards AS s ON s.source = u.source AND s.shard = u.shard LIMIT 1",
                columns,
            ).fetchone()
            if unknown is not None:
                raise CatalogError(
                    f"shard {unknown[0]}/{unknown[1]} is not registered in catalog {self._path}"
                )
            con.execute(
                "INSERT OR REPLACE INTO shard_stage_status SELECT $stage, $config_hash, unnest($sources), "
                "unnest($shards), unnest($statuses), $run_id, unnest($outputs), unnest($errors), now()",
                {
                    "stage": stage,
                    "config_hash": config_hash,
                    "run_id": run_id,
                    **columns,
                    "statuses": [u.status for u in updates],
                    "outputs": [u.output_path for u in updates],
                    "errors": [u.error for u in updates],
                },
            )
            if summarize:
                # A summary stands for a 'done' sidecar only: any new status drops the old one.
                for table in _CAPFILT_SUMMARY_TABLES:
                    con.execute(
                        f"DELETE FROM {table} AS t USING "
                        "(SELECT unnest($sources) AS source, unnest($shards) AS shard) AS u "
                        "WHERE t.config_hash = $h AND t.source = u.source AND t.shard = u.shard",
                        {"h": config_hash, **columns},
                    )
                _write_capfilt_summaries(con, summaries)

    def shard_statuses(
        self, stage: str, config_hash: str, source: str | None = None
    ) -> list[ShardStatusRecord]:
        rows = self._fetch(
            "SELECT stage, config_hash, source, shard, status, run_id, output_path, error, "
            "epoch_us(updated_at) FROM shard_stage_status "
            "WHERE stage = $stage AND config_hash = $config_hash "
            "AND ($source IS NULL OR source = $source) ORDER BY source, shard",
            stage=stage,
            config_hash=config_hash,
            source=source,
        )
        return [ShardStatusRecord(*row[:-1], _utc(row[-1])) for row in rows]

    def pending_shards(self, stage: str, config_hash: str, source: str | None = None) -> list[ShardRecord]:
        """Registered shards that (stage, config_hash) has not finished: no status, or not 'done'."""
        rows = self._fetch(
            _shard_select(
                """($source IS NULL OR s.source = $source)
                AND NOT EXISTS (
                    SELECT 1 FROM shard_stage_status AS t
                    WHERE t.stage = $stage AND t.config_hash = $config_hash
                      AND t.source = s.source AND t.shard = s.shard AND t.status = 'done')""",
                self._failures_column,
            ),
            stage=stage,
            config_hash=config_hash,
            source=source,
        )
        return _shard_records(rows)

    def pending_shard_count(self, stage: str, config_hash: str, source: str | None = None) -> int:
        """How many shards `pending_shards` would return, without building their records."""
        (n,) = self._fetch(
            """
            SELECT count(*) FROM shards AS s
            WHERE ($source IS NULL OR s.source = $source)
              AND NOT EXISTS (
                SELECT 1 FROM shard_stage_status AS t
                WHERE t.stage = $stage AND t.config_hash = $config_hash
                  AND t.source = s.source AND t.shard = s.shard AND t.status = 'done')
            """,
            stage=stage,
            config_hash=config_hash,
            source=source,
        )[0]
        return n

    def reset_shard_status(
        self, stage: str, config_hash: str, source: str, shards: Iterable[str] | None = None
    ) -> int:
        """Forget (stage, config_hash) progress for chosen shards of `source` (all when None): they re-run."""
        with self._transaction() as con:
            chosen = None if shards is None else list(shards)
            if stage == CAPFILT_STAGE and self._summaries:
                for table in _CAPFILT_SUMMARY_TABLES:
                    con.execute(
                        f"DELETE FROM {table} WHERE config_hash = $config_hash AND source = $source "
                        "AND ($shards IS NULL OR list_contains($shards, shard))",
                        {"config_hash": config_hash, "source": source, "shards": chosen},
                    )
            (n,) = con.execute(
                "DELETE FROM shard_stage_status WHERE stage = $stage AND config_hash = $config_hash "
                "AND source = $source AND ($shards IS NULL OR list_contains($shards, shard))",
                {"stage": stage, "config_hash": config_hash, "source": source, "shards": chosen},
            ).fetchone()
        return n

    # -- checkpoints, metrics, evaluation ------------------------------------------------------------

    def record_checkpoint(self, run_id: str, step: int, path: str) -> None:
        with self._transaction() as con:
            self._require_run(con, run_id)
            con.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, now())", [run_id, step, str(path)]
            )

    def checkpoints(self, run_id: str) -> list[CheckpointRecord]:
        rows = self._fetch(
            "SELECT run_id, step, path, created_at FROM checkpoints WHERE run_id = $run_id ORDER BY step",
            run_id=run_id,
        )
        return [CheckpointRecord(*row) for row in rows]

    def log_metrics(self, run_id: str, step: int, values: dict[str, float]) -> None:
        """Record several metrics of one step in one statement; a re-logged step (after resume) replaces."""
        if not values:
            return
        numbers = _float_values(values, f"metrics of run {run_id!r} at step {step}")
        with self._transaction() as con:
            self._require_run(con, run_id)
            con.execute(
                "INSERT OR REPLACE INTO metrics "
                "SELECT $run_id, $step, unnest($names), unnest($values), now()",
                {"run_id": run_id, "step": step, "names": list(values), "values": numbers},
            )

    def metrics(self, run_id: str, name: str | None = None) -> list[MetricRecord]:
        rows = self._fetch(
            "SELECT run_id, step, name, value, logged_at FROM metrics "
            "WHERE run_id = $run_id AND ($name IS NULL OR name = $name) ORDER BY step, name",
            run_id=run_id,
            name=name,
        )
        return [MetricRecord(*row) for row in rows]

    def record_eval(
        self, run_id: str, task: str, dataset: str, metrics: dict[str, float], checkpoint: str | None = None
    ) -> None:
        """Record the metrics of evaluating `checkpoint` on (task, dataset), replacing earlier values."""
        if not metrics:
            raise ValueError(f"record_eval for run {run_id!r} ({task} on {dataset}) got no metrics")
        numbers = _float_values(metrics, f"eval metrics of run {run_id!r}")
        with self._transaction() as con:
            self._require_run(con, run_id)
            con.execute(
                "INSERT OR REPLACE INTO eval_results "
                "SELECT $run_id, $task, $dataset, unnest($names), unnest($values), $checkpoint, now()",
                {
                    "run_id": run_id,
                    "task": task,
                    "dataset": dataset,
                    "names": list(metrics),
                    "values": numbers,
                    "checkpoint": checkpoint,
                },
            )

    def eval_results(self, run_id: str | None = None) -> list[EvalRecord]:
        rows = self._fetch(
            "SELECT run_id, task, dataset, metric, value, checkpoint, recorded_at FROM eval_results "
            "WHERE $run_id IS NULL OR run_id = $run_id ORDER BY run_id, task, dataset, metric",
            run_id=run_id,
        )
        return [EvalRecord(*row) for row in rows]

    # -- the overview ---------------------------------------------------------------------------------

    def status_summary(self) -> CatalogSummary:
        """Per source: shards, samples, failures by reason. Per (stage, config): shard progress."""
        return CatalogSummary(sources=tuple(self._source_summaries()), stages=tuple(self._stage_summaries()))

    def _source_summaries(self) -> list[SourceSummary]:
        failures: dict[str, dict[str, int]] = {}
        for source, reason, n in self._fetch(
            "SELECT source, reason, sum(samples)::BIGINT AS n FROM shard_failures "
            "GROUP BY ALL ORDER BY n DESC, reason"
        ):
            failures.setdefault(source, {})[reason] = n
        rows = self._fetch(
            "SELECT so.name, count(sh.shard), coalesce(sum(sh.samples_ok), 0)::BIGINT, "
            "coalesce(sum(sh.samples_failed), 0)::BIGINT "
            "FROM sources AS so LEFT JOIN shards AS sh ON sh.source = so.name "
            "GROUP BY so.name ORDER BY so.name"
        )
        return [SourceSummary(name, n, ok, failed, failures.get(name, {})) for name, n, ok, failed in rows]

    def _stage_summaries(self) -> list[StageSummary]:
        # A stage's scope is the sources it has touched: CapFilt on web sources leaves COCO untouched.
        rows = self._fetch(
            """
            WITH touched AS (SELECT DISTINCT stage, config_hash, source FROM shard_stage_status)
            SELECT t.stage, t.config_hash,
                   count(*) FILTER (WHERE st.status = 'done'),
                   count(*) FILTER (WHERE st.status = 'running'),
                   count(*) FILTER (WHERE st.status = 'failed'),
                   count(*) FILTER (WHERE st.status IS NULL OR st.status = 'pending')
            FROM touched AS t
            JOIN shards AS s ON s.source = t.source
            LEFT JOIN shard_stage_status AS st
              ON st.stage = t.stage AND st.config_hash = t.config_hash
             AND st.source = s.source AND st.shard = s.shard
            GROUP BY t.stage, t.config_hash ORDER BY t.stage, t.config_hash
            """
        )
        return [StageSummary(*row) for row in rows]


def _stats_of_summary(config_hash: str, summary: ScoreSummary) -> CapfiltScoreStats:
    p10, p50, p90 = summary.top1_quantiles((0.1, 0.5, 0.9))
    return CapfiltScoreStats(
        config_hash,
        summary.samples,
        summary.errors,
        summary.top1_mean,
        p10,
        p50,
        p90,
        summary.web_kept_share,
    )


def _capfilt_stats(row: tuple) -> CapfiltScoreStats:
    config_hash, samples, errors, mean, quantiles, kept = row
    p10, p50, p90 = quantiles if quantiles is not None else (None, None, None)
    return CapfiltScoreStats(config_hash, samples, errors, mean, p10, p50, p90, kept)


def _capfilt_histogram(config_hash: str, bins: int, rows: list[tuple]) -> CapfiltScoreHistogram:
    if not rows:
        return CapfiltScoreHistogram(config_hash, (), (), ())
    lo, hi = rows[0][1], rows[0][2]
    counts = {"top1": [0] * bins, "web": [0] * bins}
    for which, _, _, b, n in rows:
        counts[which][b] = n
    width = (hi - lo) / bins or (abs(lo) * 0.1 or 1.0) / bins  # one value only: a narrow range from it
    edges = tuple(lo + i * width for i in range(bins + 1))
    return CapfiltScoreHistogram(config_hash, edges, tuple(counts["top1"]), tuple(counts["web"]))
