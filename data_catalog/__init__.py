"""The DuckDB catalog, source adapters and the synthetic corpus.

Every SQL statement of the project lives in this package.
"""

from data_catalog.catalog import Catalog
from data_catalog.errors import CatalogError, CatalogLockedError, CatalogVersionError, ShardIntegrityError
from data_catalog.failures import FAILURE_PATTERNS, REASONS, classify_error
from data_catalog.records import (
    CAPFILT_STAGE,
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

__all__ = [
    "CAPFILT_STAGE",
    "FAILURE_PATTERNS",
    "REASONS",
    "CapfiltScoreHistogram",
    "CapfiltScoreStats",
    "Catalog",
    "CatalogError",
    "CatalogLockedError",
    "CatalogSummary",
    "CatalogVersionError",
    "CheckpointRecord",
    "EvalRecord",
    "FailedSample",
    "MetricRecord",
    "PlannedShard",
    "ShardIntegrityError",
    "ShardRecord",
    "ShardStatusRecord",
    "ShardStatusUpdate",
    "SourceRecord",
    "SourceSummary",
    "StageRunRecord",
    "StageSummary",
    "classify_error",
]
