"""The `ingest` stage: URL manifest -> img2dataset -> WebDataset shards -> catalog.

Resumable: img2dataset skips shards whose `_stats.json` exists, and the flow registers every finished
shard in the catalog as soon as it appears, so a killed run loses at most the shards in flight. A shard
whose files disagree (a tar cut short by a kill, a half-written stats file) is moved to `_quarantine/`
and downloaded again. Failed URLs inside finished shards are retried on request (`retry_failed`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from pydantic import BaseModel, ConfigDict, Field, field_validator

from blip2_core.fileio import atomic_write_text
from data_catalog import Catalog, CatalogError, ShardIntegrityError
from data_catalog.layout import Layout
from data_catalog.url_safety import no_credentials_pattern
from flows.common import (
    artifact_key,
    catalog_session,
    fingerprint,
    flow_run_id,
    layout_for,
    redact,
    refuse_url_credentials,
    require_paths,
    source_lock,
)
from flows.download import DownloadOptions, img2dataset_kwargs, worker_command
from flows.retry import RETRYABLE_REASONS, recover_interrupted_retries, retry_shard_failures

# Manifest columns img2dataset reads itself; every other column is carried into the shard's Parquet.
_MANIFEST_CORE_COLUMNS = ("url", "caption")
_POLL_S = 1.0
_FINGERPRINT_BYTES = 1 << 20


class IngestParams(BaseModel):
    """Parameters of one ingest run (the flow's and the CLI's)."""

    # Errors never quote a value: base_url may be a refused URL with credentials.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    source: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="source name, e.g. cc3m")
    inputs: tuple[Path, ...] = Field(
        (),
        description="raw source files; validated into var/manifests/<source> (default: reuse that manifest)",
    )
    format: str = Field("parquet", description="format of `inputs` (see data_catalog.adapters.ADAPTERS)")
    allow_local: bool = Field(False, description="admit file:// URLs in the manifest")
    allow_loopback: bool = Field(
        False,
        description="admit hosts on 127.0.0.0/8 and ::1 (the demo's corpus server); link-local, private, "
        "multicast and reserved addresses are always refused",
    )
    base_url: str | None = Field(
        None,
        description="COCO/Karpathy formats: URL prefix of the image files (without credentials)",
        json_schema_extra={"pattern": no_credentials_pattern()},  # the server refuses them too
    )
    splits: tuple[str, ...] | None = Field(None, description="Karpathy format: keep only these splits")
    download: DownloadOptions = Field(default_factory=DownloadOptions)
    retry_failed: bool = Field(False, description="retry failed URLs inside finished shards")
    verify: bool = Field(
        False,
        description="re-read every registered shard and compare it with its catalog checksum; a shard "
        "that changed on disk is quarantined and downloaded again",
    )
    retry_reasons: tuple[str, ...] = Field(RETRYABLE_REASONS, description="failure reasons worth a retry")
    home: Path | None = Field(None, description="data root; default $BLIP2_HOME or ./var")

    @field_validator("base_url")
    @classmethod
    def _base_url_without_credentials(cls, url: str | None) -> str | None:
        return refuse_url_credentials(url)


class IngestSummary(BaseModel):
    run_id: str
    source: str
    urls: int
    dropped: dict[str, int]
    shards: int
    samples_ok: int
    samples_failed: int
    failures: dict[str, int]
    shards_downloaded: int
    shards_skipped: int
    quarantined: int
    retried: int = 0
    recovered: int = 0


# --- manifest --------------------------------------------------------------------------------------


def manifest_parts(manifest: Path) -> list[Path]:
    """The Parquet parts of a validated manifest, in the order img2dataset reads them."""
    if manifest.is_file():
        return [manifest]
    if manifest.is_dir():
        parts = sorted(p for p in manifest.glob("*.parquet") if not p.name.startswith("."))
        if parts:
            return parts
    raise FileNotFoundError(
        f"no URL manifest at {manifest}: pass the source's files with --input (and --format)"
    )


def files_fingerprint(paths: list[Path]) -> str:
    """Names, sizes and the first and last MiB of each file: cheap at 129M rows, and unchanged when
    the same inputs are validated again into byte-identical parts."""
    h = hashlib.sha256()
    for p in paths:
        size = p.stat().st_size
        h.update(f"{p.name}:{size};".encode())
        with open(p, "rb") as fh:
            h.update(fh.read(_FINGERPRINT_BYTES))
            if size > 2 * _FINGERPRINT_BYTES:
                fh.seek(-_FINGERPRINT_BYTES, os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def manifest_info(parts: list[Path]) -> tuple[list[int], list[str]]:
    """Row count of each part and the extra columns to carry into the shards."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(parts[0])
    missing = [c for c in _MANIFEST_CORE_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"manifest {parts[0]} lacks column(s) {missing}; it has {schema.names}")
    rows = [pq_rows(p) for p in parts]
    extra = [c for c in schema.names if c not in _MANIFEST_CORE_COLUMNS]
    return rows, extra


def ingest_config_hash(fingerprint: str, opts: DownloadOptions) -> str:
    """What determines the shards' content: the manifest and how images are resized and sharded."""
    keyed = {
        "manifest": fingerprint,
        "image_size": opts.image_size,
        "resize_mode": opts.resize_mode,
        "samples_per_shard": opts.samples_per_shard,
        "encode_quality": opts.encode_quality,
        "max_image_pixels": opts.max_image_pixels,
    }
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


# --- shard discovery and registration --------------------------------------------------------------


def finished_shards(shard_dir: Path) -> list[str]:
    """Shard ids whose stats file img2dataset has written (it writes it after closing the tar)."""
    return sorted(p.name.removesuffix("_stats.json") for p in shard_dir.glob("*_stats.json"))


def quarantine(shard_dir: Path, shard: str, reason: str) -> None:
    """Move a shard's files aside so img2dataset downloads it again; nothing is deleted."""
    dest = shard_dir / "_quarantine" / f"{shard}-{time.strftime('%Y%m%dT%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in (".tar", ".parquet", "_stats.json"):
        f = shard_dir / f"{shard}{suffix}"
        if f.exists():
            shutil.move(str(f), dest / f.name)
    (dest / "REASON.txt").write_text(reason + "\n")


def register_new_shards(
    cat: Catalog, source: str, shard_dir: Path, known: set[str]
) -> tuple[list[str], list[str]]:
    """Register finished shards not in `known`; return (registered, quarantined) shard ids."""
    registered, quarantined = [], []
    for shard in finished_shards(shard_dir):
        if shard in known:
            continue
        try:
            cat.register_img2dataset_shard(source, shard_dir / f"{shard}.tar")
            registered.append(shard)
        except ShardIntegrityError as err:
            quarantine(shard_dir, shard, str(err))
            quarantined.append(shard)
        known.add(shard)
    return registered, quarantined


# --- the img2dataset child process -----------------------------------------------------------------


def _kill_with_parent() -> None:
    """Runs in the child before exec: die with the flow process, so a killed flow leaves no downloader."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_downloader(
    kwargs: dict, opts: DownloadOptions, allow_loopback: bool, log_path: Path, on_poll: Callable[[], None]
) -> int:
    """Run img2dataset in a child process, calling `on_poll` every second until it exits."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            worker_command(kwargs, opts.max_image_pixels, allow_loopback),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_kill_with_parent,
        )
        try:
            while proc.poll() is None:
                time.sleep(_POLL_S)
                on_poll()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    on_poll()
    return proc.returncode


# --- tasks and the flow ----------------------------------------------------------------------------


@task(name="prepare-manifest")
def prepare_manifest(params: IngestParams, home: str) -> dict:
    """Validate the raw inputs into a candidate manifest beside var/manifests/<source>.

    Nothing is replaced here: the flow first checks that the candidate agrees with the shards already
    on disk, then `commit_manifest` swaps it in. Unchanged inputs are not validated again.
    """
    from data_catalog.adapters import ManifestOptions, build_manifest

    layout = Layout(Path(home))
    out_dir = layout.manifests(params.source)
    inputs = [Path(p).resolve() for p in params.inputs]
    stamp = {
        "format": params.format,
        "inputs": [str(p) for p in inputs],
        "fingerprint": files_fingerprint(inputs),
        "allow_local": params.allow_local,
        "allow_loopback": params.allow_loopback,
        "base_url": fingerprint(params.base_url),  # may carry credentials: only its changes matter
        "splits": list(params.splits) if params.splits else None,  # as JSON reads it back
    }
    marker = _inputs_marker(out_dir)
    if out_dir.is_dir() and marker.exists() and json.loads(marker.read_text()) == stamp:
        get_run_logger().info("manifest of %s is up to date with its inputs: not rebuilt", params.source)
        return {"manifest_dir": str(out_dir), "candidate": None}
    candidate = out_dir.with_name(f".candidate-{params.source}")
    options = ManifestOptions(
        allow_local=params.allow_local,
        allow_loopback=params.allow_loopback,
        base_url=params.base_url,
        splits=params.splits,
    )
    report = build_manifest(params.format, inputs, candidate, options=options)
    get_run_logger().info(
        "manifest %s: %d of %d rows kept, dropped %s",
        params.source,
        report.n_out,
        report.n_in,
        report.dropped or "none",
    )
    return {
        "manifest_dir": str(candidate),
        "candidate": {"stamp": stamp, "n_urls": report.n_out, "dropped": report.dropped},
    }


def _inputs_marker(manifest_dir: Path) -> Path:
    return manifest_dir.with_name(f"{manifest_dir.name}.inputs.json")


def commit_manifest(cat: Catalog, params: IngestParams, layout: Layout, prepared: dict) -> Path:
    """Swap a validated candidate manifest into var/manifests/<source> and record the source."""
    out_dir = layout.manifests(params.source)
    candidate = prepared["candidate"]
    if candidate is not None:
        old = out_dir.with_name(f".old-{params.source}")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(prepared["manifest_dir"], out_dir)
        shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(_inputs_marker(out_dir), json.dumps(candidate["stamp"]))
        cat.upsert_source(
            params.source, params.format, str(out_dir), candidate["n_urls"], candidate["dropped"]
        )
    elif params.source not in {s.name for s in cat.sources()}:
        rows = sum(pq_rows(p) for p in manifest_parts(out_dir))
        cat.upsert_source(params.source, "manifest", str(out_dir), rows, {})
    return out_dir


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


@task(name="download-shards")
def download_shards(
    params: IngestParams, home: str, parts: list[str], part_rows: list[int], extra: list[str]
) -> dict:
    """img2dataset over the manifest; every finished shard is registered as soon as it appears."""
    logger = get_run_logger()
    layout = Layout(Path(home))
    shard_dir = layout.shards(params.source)
    shard_dir.mkdir(parents=True, exist_ok=True)
    # img2dataset cuts each manifest part into shards of its own.
    expected = sum(math.ceil(n / params.download.samples_per_shard) for n in part_rows)
    with catalog_session(layout) as cat:
        registered = cat.shards(params.source)
    known = {s.shard for s in registered}
    damaged = verify_registered(registered, shard_dir) if params.verify else []
    for shard in damaged:
        logger.warning("shard %s/%s changed on disk since registration: quarantined", params.source, shard)
    known -= set(damaged)
    skipped = len(known)
    if len(known) >= expected:
        logger.info(
            "all %d shards of %s are downloaded and registered: nothing to do", expected, params.source
        )
        return {"downloaded": 0, "skipped": skipped, "quarantined": 0}
    stats = {"registered": [], "quarantined": []}
    progress_id = create_progress_artifact(
        progress=100.0 * len(known) / expected,
        key=artifact_key("ingest-progress", params.source),
        description=f"Shards of `{params.source}` downloaded and registered (of {expected})",
    )

    def poll() -> None:
        if not set(finished_shards(shard_dir)) - known:
            return  # the catalog is opened only when a shard has finished
        with catalog_session(layout) as cat:
            new, bad = register_new_shards(cat, params.source, shard_dir, known)
        for shard in new:
            logger.info("shard %s/%s registered (%d/%d)", params.source, shard, len(known), expected)
        for shard in bad:
            logger.warning(
                "shard %s/%s failed its integrity check: quarantined, will be downloaded again",
                params.source,
                shard,
            )
        stats["registered"] += new
        stats["quarantined"] += bad
        if new:
            update_progress_artifact(progress_id, progress=min(100.0, 100.0 * len(known) / expected))

    manifest_arg = parts[0] if len(parts) == 1 else str(Path(parts[0]).parent)
    # Each pool process costs seconds of start-up (OpenCV, albumentations): no more than there are shards.
    pending = expected - len(known)
    opts = params.download.model_copy(update={"processes": max(1, min(params.download.processes, pending))})
    kwargs = img2dataset_kwargs(Path(manifest_arg), shard_dir, opts, extra)
    log_path = shard_dir / "_logs" / "img2dataset.log"
    # A quarantined shard is re-downloaded by a second pass: img2dataset skips every finished one.
    for attempt in range(2):
        before = len(stats["quarantined"])
        code = run_downloader(kwargs, params.download, params.allow_loopback, log_path, poll)
        if code != 0:
            raise RuntimeError(f"img2dataset exited with status {code}; its log is {log_path}")
        if len(stats["quarantined"]) == before:
            break
        known.difference_update(stats["quarantined"][before:])
        logger.info(
            "pass %d: downloading %d quarantined shard(s) again",
            attempt + 2,
            len(stats["quarantined"]) - before,
        )
    missing = expected - len(known)
    if missing > 0:
        # img2dataset logs a shard it could not write (a full disk, a killed pool process) and exits 0.
        raise RuntimeError(
            f"{missing} of {expected} shards of {params.source} were not written; finished shards are "
            f"registered and a re-run downloads only the rest (img2dataset log: {log_path})"
        )
    return {
        "downloaded": len(stats["registered"]),
        "skipped": skipped,
        "quarantined": len(stats["quarantined"]) + len(damaged),
    }


def verify_registered(registered: list, shard_dir: Path) -> list[str]:
    """Quarantine registered shards whose files no longer match the catalog (checksum, agreement)."""
    from data_catalog.shard_files import verify_img2dataset_shard

    damaged = []
    for rec in registered:
        try:
            problem = None
            if verify_img2dataset_shard(rec.tar_path).sha256 != rec.sha256:
                problem = f"sha256 differs from the catalog's {rec.sha256}"
        except ShardIntegrityError as err:
            problem = str(err)
        if problem is not None:
            quarantine(shard_dir, rec.shard, problem)
            damaged.append(rec.shard)
    return damaged


@task(name="retry-failed-urls")
def retry_failed_urls(params: IngestParams, home: str) -> dict:
    """Download again the failed samples of finished shards whose reason is worth a retry."""
    logger = get_run_logger()
    layout = Layout(Path(home))
    shard_dir = layout.shards(params.source)
    totals = {"retried": 0, "recovered": 0}
    with catalog_session(layout) as cat:
        shards = [s for s in cat.shards(params.source) if s.samples_failed]
    for rec in shards:
        result = retry_shard_failures(
            shard_dir, rec.shard, params.download, set(params.retry_reasons), params.allow_loopback
        )
        if result.retried == 0:
            continue
        with catalog_session(layout) as cat:
            cat.register_img2dataset_shard(params.source, shard_dir / f"{rec.shard}.tar")
        logger.info(
            "shard %s: %d of %d retried URL(s) recovered", rec.shard, result.recovered, result.retried
        )
        totals["retried"] += result.retried
        totals["recovered"] += result.recovered
    return totals


def summary_table(cat: Catalog, source: str) -> list[dict]:
    rows = []
    for s in cat.shards(source):
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s.failures.items())) or "-"
        rows.append(
            {
                "shard": s.shard,
                "ok": s.samples_ok,
                "failed": s.samples_failed,
                "MiB": round(s.bytes / 2**20, 2),
                "failures": reasons,
            }
        )
    return rows


@flow(name="ingest", log_prints=True)
def ingest_flow(params: IngestParams) -> IngestSummary:
    """Download a source's URL manifest into WebDataset shards and register them in the catalog."""
    require_paths(files={f"inputs.{i}": p for i, p in enumerate(params.inputs)})
    logger = get_run_logger()
    layout = layout_for(params.home)
    shard_dir = layout.shards(params.source)
    with source_lock(shard_dir):
        prepared = {"manifest_dir": str(layout.manifests(params.source)), "candidate": None}
        if params.inputs:
            prepared = prepare_manifest(params, str(layout.home))
        parts = manifest_parts(Path(prepared["manifest_dir"]))
        config_hash = ingest_config_hash(files_fingerprint(parts), params.download)
        recover_interrupted_retries(shard_dir)
        with catalog_session(layout) as cat:
            _refuse_changed_config(cat, params.source, config_hash)
            parts = manifest_parts(commit_manifest(cat, params, layout, prepared))
            part_rows, extra = manifest_info(parts)
            run_id = cat.start_run("ingest", config_hash, _jsonable(params), flow_run_id())
        logger.info(
            "ingest %s: %d URLs from %d manifest part(s) -> %s (run %s)",
            params.source,
            sum(part_rows),
            len(parts),
            shard_dir,
            run_id,
        )
        try:
            got = download_shards(params, str(layout.home), [str(p) for p in parts], part_rows, extra)
            retry = retry_failed_urls(params, str(layout.home)) if params.retry_failed else {}
        except BaseException as err:
            with catalog_session(layout) as cat:
                cat.finish_run(run_id, "failed", {"error": redact(str(err))[:2000]})
            raise
        with catalog_session(layout) as cat:
            shards = cat.shards(params.source)
            source = next(s for s in cat.sources() if s.name == params.source)
            failures = cat.failures_by_reason(params.source)
            table = summary_table(cat, params.source)
            summary = IngestSummary(
                run_id=run_id,
                source=params.source,
                urls=source.n_urls,
                dropped=source.dropped,
                shards=len(shards),
                samples_ok=sum(s.samples_ok for s in shards),
                samples_failed=sum(s.samples_failed for s in shards),
                failures=failures,
                shards_downloaded=got["downloaded"],
                shards_skipped=got["skipped"],
                quarantined=got["quarantined"],
                **retry,
            )
            cat.finish_run(run_id, "done", summary.model_dump())
    create_table_artifact(
        table=table,
        key=artifact_key("ingest", params.source),
        description=f"ingest `{params.source}`: {summary.samples_ok} images in {summary.shards} shards, "
        f"{summary.samples_failed} failed ({_fmt_reasons(failures)})",
    )
    logger.info(
        "ingest %s done: %d ok, %d failed %s",
        params.source,
        summary.samples_ok,
        summary.samples_failed,
        _fmt_reasons(failures),
    )
    return summary


def _fmt_reasons(failures: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(failures.items(), key=lambda kv: -kv[1])) or "none"


def _jsonable(params: BaseModel) -> dict:
    return redact(json.loads(params.model_dump_json()))


def _refuse_changed_config(cat: Catalog, source: str, config_hash: str) -> None:
    """Shard ids are positions in the manifest: resuming under another manifest would mix two datasets."""
    previous = [
        r for r in cat.runs("ingest") if r.params.get("source") == source and r.config_hash != config_hash
    ]
    if previous and cat.shards(source):
        raise CatalogError(
            f"source {source!r} already has shards from ingest config {previous[-1].config_hash} (run "
            f"{previous[-1].run_id}); this manifest or these download options give {config_hash}. "
            "Ingest it under a new source name; the existing shards stay as they are."
        )
