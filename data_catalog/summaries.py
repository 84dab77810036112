"""Per-shard summaries: what the sample-level questions need of a shard's Parquet, kept in the catalog.

At 13k shards a question that opens every shard's Parquet pays about 1 ms per file before it reads a
row (BENCHMARKS.md, catalog at scale), so the catalog keeps, per shard, the figures those questions
combine: samples per img2dataset status (written at registration) and, per CapFilt config, a sidecar's
score counts, sums, extremes and a fixed-bin histogram (written when the shard is marked 'done'). Count,
mean, std, min and max combine exactly; quantiles come from the summed histogram (see `score_quantiles`).

This module holds the SQL that computes a summary from the files and the arithmetic that combines them;
`catalog.py` decides when each runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Fixed bins over the CLIP cosine-similarity range: bin i spans SCORE_LO + i * SCORE_BIN_WIDTH, 2/512 wide.
SCORE_BINS = 512
SCORE_LO, SCORE_HI = -1.0, 1.0
SCORE_BIN_WIDTH = (SCORE_HI - SCORE_LO) / SCORE_BINS


def _bin_sql(score: str) -> str:
    return (
        f"least(greatest(floor(({score} - {SCORE_LO}) / {SCORE_BIN_WIDTH}), 0), {SCORE_BINS - 1})::SMALLINT"
    )


_WEB = "s.scores[-1]::DOUBLE"  # the web caption's score: candidates first, the web caption last
_TOP1 = "s.top1_score::DOUBLE"
_SCORED = "s.error IS NULL"

# One row per sidecar (run over _SAMPLE_FILES_CTE in catalog.py): the columns of capfilt_shard_summaries,
# then the top-1 and web score histograms as {bin: samples} maps. Same definitions as the Parquet scan
# of capfilt_score_stats: errors left out; the web caption is kept when its text is top1 or top2.
CAPFILT_SUMMARY_SQL = f"""
    SELECT f.config_hash, f.source, f.shard,
           count(*) FILTER (WHERE {_SCORED}),
           count(*) FILTER (WHERE NOT ({_SCORED})),
           count(*) FILTER (WHERE {_SCORED} AND coalesce(s.web_caption IN (s.top1, s.top2), false)),
           count({_TOP1}) FILTER (WHERE {_SCORED}),
           sum({_TOP1}) FILTER (WHERE {_SCORED}),
           sum({_TOP1} * {_TOP1}) FILTER (WHERE {_SCORED}),
           min({_TOP1}) FILTER (WHERE {_SCORED}),
           max({_TOP1}) FILTER (WHERE {_SCORED}),
           count({_WEB}) FILTER (WHERE {_SCORED} AND NOT isnan({_WEB})),
           sum({_WEB}) FILTER (WHERE {_SCORED} AND NOT isnan({_WEB})),
           sum({_WEB} * {_WEB}) FILTER (WHERE {_SCORED} AND NOT isnan({_WEB})),
           min({_WEB}) FILTER (WHERE {_SCORED} AND NOT isnan({_WEB})),
           max({_WEB}) FILTER (WHERE {_SCORED} AND NOT isnan({_WEB})),
           histogram({_bin_sql(_TOP1)}) FILTER (WHERE {_SCORED} AND NOT isnan({_TOP1})),
           histogram({_bin_sql(_WEB)}) FILTER (WHERE {_SCORED} AND NOT isnan({_WEB}))
    FROM samples AS s JOIN files AS f ON s.filename = f.path
    GROUP BY ALL
"""


@dataclass
class ScoreSummary:
    """One config's CapFilt figures over one or many shards; `merge` adds another shard's."""

    samples: int = 0
    errors: int = 0
    web_kept: int = 0
    top1_n: int = 0
    top1_sum: float = 0.0
    top1_sumsq: float = 0.0
    top1_min: float | None = None
    top1_max: float | None = None
    top1_bins: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of_row(cls, row: tuple) -> ScoreSummary:
        """From (samples, errors, web_kept, top1_n, top1_sum, top1_sumsq, top1_min, top1_max, bins)."""
        samples, errors, kept, n, total, sumsq, lo, hi, bins = row
        return cls(samples, errors, kept, n, total or 0.0, sumsq or 0.0, lo, hi, dict(bins or {}))

    def merge(self, other: ScoreSummary) -> None:
        self.samples += other.samples
        self.errors += other.errors
        self.web_kept += other.web_kept
        self.top1_n += other.top1_n
        self.top1_sum += other.top1_sum
        self.top1_sumsq += other.top1_sumsq
        self.top1_min = _extreme(min, self.top1_min, other.top1_min)
        self.top1_max = _extreme(max, self.top1_max, other.top1_max)
        for b, n in other.top1_bins.items():
            self.top1_bins[b] = self.top1_bins.get(b, 0) + n

    @property
    def top1_mean(self) -> float | None:
        return self.top1_sum / self.top1_n if self.top1_n else None

    @property
    def web_kept_share(self) -> float | None:
        return self.web_kept / self.samples if self.samples else None

    def top1_quantiles(self, qs: tuple[float, ...]) -> tuple[float | None, ...]:
        return score_quantiles(self.top1_bins, qs, self.top1_min, self.top1_max)


def _extreme(pick, a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else pick(a, b)


def score_quantiles(
    bins: dict[int, int], qs: tuple[float, ...], lo: float | None, hi: float | None
) -> tuple[float | None, ...]:
    """quantile_cont's answer estimated from fixed bins: the rank q * (n - 1) is found in the summed
    counts and placed within its bin as if the bin's values were evenly spread; the end bins are cut to
    the exact min and max. Off by at most one bin width (2/512 = 0.0039), usually far less."""
    total = sum(bins.values())
    if not total or lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return tuple(None for _ in qs)
    ordered = sorted(bins.items())
    out = []
    for q in qs:
        rank, seen = q * (total - 1), 0
        for b, n in ordered:
            if rank < seen + n:
                left = max(lo, SCORE_LO + b * SCORE_BIN_WIDTH)
                right = min(hi, SCORE_LO + (b + 1) * SCORE_BIN_WIDTH)
                out.append(left + (rank - seen + 0.5) / n * (right - left))
                break
            seen += n
        else:
            out.append(hi)
    return tuple(out)
