"""The CapFilt score histogram: top-1 and web-caption CLIP scores of one config's done sidecars, binned."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_catalog import CAPFILT_STAGE, CapfiltScoreHistogram


def write_sidecar(catalog, config_hash, source, shard, top1, web, errors=0):
    """A sidecar with the real column names: scores = candidates' then the web caption's (last)."""
    n = len(top1)
    path = catalog.layout.capfilt_sidecar(config_hash, source, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(n + errors)],
            "web_caption": ["web"] * (n + errors),
            "scores": pa.array([[0.0, float(w)] for w in web] + [[]] * errors, pa.list_(pa.float32())),
            "top1": ["syn"] * n + [None] * errors,
            "top2": ["web"] * n + [None] * errors,
            "top1_score": pa.array([float(t) for t in top1] + [None] * errors, pa.float32()),
            "error": [None] * n + ["unreadable"] * errors,
        }
    )
    pq.write_table(table, path)
    run = catalog.start_run(CAPFILT_STAGE, config_hash, {})
    catalog.set_shard_status(CAPFILT_STAGE, config_hash, source, shard, "done", run)


@pytest.fixture
def scored(catalog, shard_maker):
    catalog.upsert_source("cc3m", "cc3m", "/m/cc3m", 16, {})
    shard_maker.register(catalog, "cc3m", 0)
    shard_maker.register(catalog, "cc3m", 1)
    rng = np.random.default_rng(0)
    top1 = rng.uniform(0.3, 0.5, 30)
    web = np.concatenate([rng.uniform(0.1, 0.4, 29), [np.nan]])  # one web caption was not scored
    write_sidecar(catalog, "aaa", "cc3m", "00000", top1[:10], web[:10], errors=2)
    write_sidecar(catalog, "aaa", "cc3m", "00001", top1[10:], web[10:])
    return top1, web[~np.isnan(web)]


def test_histogram_counts_both_scores_over_their_joint_range(catalog, scored):
    top1, web = (a.astype(np.float32).astype(np.float64) for a in scored)  # as stored
    hist = catalog.capfilt_score_histogram("aaa", bins=8)
    lo, hi = min(top1.min(), web.min()), max(top1.max(), web.max())
    assert hist.config_hash == "aaa"
    assert len(hist.edges) == 9
    assert hist.edges[0] == pytest.approx(lo, abs=1e-6) and hist.edges[-1] == pytest.approx(hi, abs=1e-6)
    edges = np.linspace(lo, hi, 9)
    assert list(hist.top1) == np.histogram(top1, edges)[0].tolist()
    assert list(hist.web) == np.histogram(web, edges)[0].tolist()
    assert sum(hist.top1) == 30 and sum(hist.web) == 29  # errors and the NaN score left out


def test_histogram_of_a_config_without_done_sidecars_is_empty(catalog, scored):
    assert catalog.capfilt_score_histogram("zzz") == CapfiltScoreHistogram("zzz", (), (), ())
    with pytest.raises(ValueError, match="at least one bin"):
        catalog.capfilt_score_histogram("aaa", bins=0)


def test_one_distinct_score_lands_in_the_first_bin(catalog, shard_maker):
    catalog.upsert_source("cc3m", "cc3m", "/m/cc3m", 8, {})
    shard_maker.register(catalog, "cc3m", 0)
    write_sidecar(catalog, "one", "cc3m", "00000", [0.25] * 3, [0.25] * 3)
    hist = catalog.capfilt_score_histogram("one", bins=4)
    assert (hist.top1, hist.web) == ((3, 0, 0, 0), (3, 0, 0, 0))
    assert hist.edges[0] == pytest.approx(0.25) and hist.edges[1] > hist.edges[0]
