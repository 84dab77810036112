"""The typed rows the catalog returns: what a caller sees instead of SQL tuples."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

RUN_STATUSES: tuple[str, ...] = ("running", "done", "failed", "cancelled")
FINAL_RUN_STATUSES: tuple[str, ...] = ("done", "failed", "cancelled")
SHARD_STATUSES: tuple[str, ...] = ("pending", "running", "done", "failed")
# The stage name under which CapFilt records per-shard progress; its 'done' shards have a sidecar.
CAPFILT_STAGE = "capfilt"


@dataclass(frozen=True)
class SourceRecord:
    """A dataset source: its URL manifest and what was dropped from it before download."""

    name: str
    kind: str
    manifest_dir: str
    n_urls: int
    dropped: dict[str, int]
    updated_at: datetime


@dataclass(frozen=True)
class ShardRecord:
    """One img2dataset WebDataset shard as registered after download."""

    source: str
    shard: str
    tar_path: Path
    samples_ok: int
    samples_failed: int
    failures: dict[str, int]
    bytes: int
    sha256: str
    download_s: float | None
    registered_at: datetime

    @property
    def samples(self) -> int:
        return self.samples_ok + self.samples_failed


class PlannedShard(NamedTuple):
    """A registered shard as a stage's planner reads it (`Catalog.shard_plan`): its tar, its samples and
    how far one stage config got with it. A NamedTuple of plain values, made from the fetched row as it
    is: a plan over 13k shards builds one per shard, and a ShardRecord costs several times more."""

    source: str
    shard: str
    tar_path: str  # as registered: the same path as ShardRecord.tar_path, as text
    samples_ok: int
    status: str  # under the asked (stage, config hash); 'pending' where it has none there


@dataclass(frozen=True)
class StageRunRecord:
    """One run of a stage (ingest, capfilt, stage1, ...) with the config that defines its outputs."""

    run_id: str
    stage: str
    config_hash: str
    params: dict[str, Any]
    flow_run_id: str | None
    status: str
    started_at: datetime
    finished_at: datetime | None
    summary: dict[str, Any] | None

    @property
    def duration_s(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True)
class ShardStatusRecord:
    """Where one shard stands in one stage under one config hash."""

    stage: str
    config_hash: str
    source: str
    shard: str
    status: str
    run_id: str
    output_path: str | None
    error: str | None
    updated_at: datetime


@dataclass(frozen=True)
class ShardStatusUpdate:
    """One shard's new status in `Catalog.set_shard_statuses` (many shards, one transaction)."""

    source: str
    shard: str
    status: str
    output_path: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class CheckpointRecord:
    run_id: str
    step: int
    path: str
    created_at: datetime


@dataclass(frozen=True)
class MetricRecord:
    run_id: str
    step: int
    name: str
    value: float
    logged_at: datetime


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation metric of one run; `checkpoint` names the weights that were evaluated."""

    run_id: str
    task: str
    dataset: str
    metric: str
    value: float
    checkpoint: str | None
    recorded_at: datetime


@dataclass(frozen=True)
class FailedSample:
    """A sample img2dataset could not download or decode, read from its shard's Parquet."""

    source: str
    shard: str
    key: str
    url: str
    caption: str | None
    status: str
    reason: str
    message: str | None


@dataclass(frozen=True)
class CapfiltScoreStats:
    """CLIP-score statistics of one CapFilt config over the samples it scored (errors excluded)."""

    config_hash: str
    samples: int
    errors: int
    top1_mean: float | None
    top1_p10: float | None
    top1_median: float | None
    top1_p90: float | None
    web_caption_kept_share: float | None


@dataclass(frozen=True)
class CapfiltScoreHistogram:
    """CLIP scores of one CapFilt config in equal-width bins over their joint range.

    `top1` counts the best-ranked caption's score (synthetic or web), `web` the web caption's own score;
    bin i spans edges[i]..edges[i+1] (the last bin includes its right edge). No scores: no bins.
    """

    config_hash: str
    edges: tuple[float, ...]
    top1: tuple[int, ...]
    web: tuple[int, ...]


@dataclass(frozen=True)
class SourceSummary:
    name: str
    shards: int
    samples_ok: int
    samples_failed: int
    failures: dict[str, int]


@dataclass(frozen=True)
class StageSummary:
    """Shard progress of one (stage, config hash) over the sources that stage has touched."""

    stage: str
    config_hash: str
    done: int
    running: int
    failed: int
    pending: int


@dataclass(frozen=True)
class CatalogSummary:
    sources: tuple[SourceSummary, ...]
    stages: tuple[StageSummary, ...]
