"""Per-shard summaries: sample counts and CapFilt score statistics from catalog rows, not from Parquet,
with the same answers as the Parquet scan; batch status writes; an older catalog upgraded and backfilled."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_catalog import CAPFILT_STAGE, CatalogError, ShardStatusUpdate
from data_catalog.catalog import MIGRATIONS_DIR, Catalog, load_migrations
from data_catalog.summaries import SCORE_BIN_WIDTH


def write_sidecar(catalog, config_hash, source, shard, top1, web, kept, errors=0):
    """A sidecar with the real column names; `kept[i]`: the web caption is sample i's top1."""
    n = len(top1)
    path = catalog.layout.capfilt_sidecar(config_hash, source, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(n + errors)],
            "web_caption": [f"web {i}" for i in range(n + errors)],
            "scores": pa.array([[0.0, float(w)] for w in web] + [[]] * errors, pa.list_(pa.float32())),
            "top1": [f"web {i}" if k else "syn" for i, k in enumerate(kept)] + [None] * errors,
            "top2": ["syn2"] * n + [None] * errors,
            "top1_score": pa.array([float(t) for t in top1] + [None] * errors, pa.float32()),
            "error": [None] * n + ["unreadable"] * errors,
        }
    )
    pq.write_table(table, path)


def _parquet_answers(catalog):
    """What the exact Parquet scan says: the reference the summaries must match."""
    return catalog.capfilt_score_stats(exact=True)


@pytest.fixture
def corpus(catalog, shard_maker):
    catalog.upsert_source("cc3m", "cc3m", "/m/cc3m", 16, {})
    catalog.upsert_source("sbu", "sbu", "/m/sbu", 16, {})
    for shard in range(3):
        shard_maker.register(catalog, "cc3m", shard, shard_maker.samples[shard:])
    shard_maker.register(catalog, "sbu", 0)
    return catalog


def test_registration_records_status_counts_and_the_answer_needs_no_parquet(corpus, shard_maker):
    counts = corpus.sample_status_counts()
    assert counts["cc3m"]["success"] == 3 + 2 + 1 and counts["sbu"]["success"] == 3
    scanned = corpus._query_sample_files(  # the Parquet scan these counts replace
        "SELECT f.source, s.status, count(*) FROM samples AS s JOIN files AS f ON s.filename = f.path "
        "GROUP BY ALL",
        corpus._registered_shard_files(None),
    )
    assert counts == {src: {st: n for s2, st, n in sorted(scanned) if s2 == src} for src in ("cc3m", "sbu")}
    # The counts come from the catalog: a Parquet rewritten behind its back does not change them.
    parquet = corpus.layout.shards("sbu") / "00000.parquet"
    pq.write_table(pq.read_table(parquet).slice(0, 1), parquet)
    assert corpus.sample_status_counts("sbu") == {"sbu": counts["sbu"]}
    corpus.delete_source("sbu")
    assert set(corpus.sample_status_counts()) == {"cc3m"}


def test_capfilt_stats_from_summaries_match_the_parquet_scan(corpus):
    rng = np.random.default_rng(3)
    run = corpus.start_run(CAPFILT_STAGE, "h1", {})
    updates = []
    for shard, n in (("00000", 50), ("00001", 30), ("00002", 1)):
        top1 = rng.normal(0.28, 0.04, n)
        web = np.where(rng.random(n) < 0.1, np.nan, rng.normal(0.2, 0.05, n))
        write_sidecar(corpus, "h1", "cc3m", shard, top1, web, rng.random(n) < 0.3, errors=shard == "00001")
        updates.append(ShardStatusUpdate("cc3m", shard, "done", output_path=f"/x/{shard}"))
    corpus.set_shard_statuses(CAPFILT_STAGE, "h1", run, updates)
    assert len(corpus._summarized_capfilt_shards("h1")) == 3

    [fast], [exact] = corpus.capfilt_score_stats("h1"), _parquet_answers(corpus)
    assert (fast.config_hash, fast.samples, fast.errors) == (exact.config_hash, exact.samples, exact.errors)
    assert fast.top1_mean == pytest.approx(exact.top1_mean, rel=1e-9)
    assert fast.web_caption_kept_share == pytest.approx(exact.web_caption_kept_share)
    for got, want in zip(
        (fast.top1_p10, fast.top1_median, fast.top1_p90),
        (exact.top1_p10, exact.top1_median, exact.top1_p90),
        strict=True,
    ):
        assert got == pytest.approx(want, abs=SCORE_BIN_WIDTH)


def test_a_shard_done_without_summary_is_read_from_its_sidecar(corpus):
    run = corpus.start_run(CAPFILT_STAGE, "h1", {})
    for shard in ("00000", "00001"):
        write_sidecar(corpus, "h1", "cc3m", shard, [0.3, 0.4], [0.1, 0.2], [True, False])
        corpus.set_shard_status(CAPFILT_STAGE, "h1", "cc3m", shard, "done", run)
    for table in ("capfilt_shard_summaries", "capfilt_shard_score_bins"):  # as if done before 0003
        corpus._con.execute(f"DELETE FROM {table} WHERE shard = '00001'")
    [stats] = corpus.capfilt_score_stats()
    assert (stats.samples, stats.top1_mean, stats.web_caption_kept_share) == (4, pytest.approx(0.35), 0.5)
    assert corpus.backfill_summaries() == {"shards": 0, "capfilt_shards": 1}
    assert corpus.capfilt_score_stats() == [stats]


def test_a_new_status_or_reset_drops_the_summary(corpus):
    run = corpus.start_run(CAPFILT_STAGE, "h1", {})
    write_sidecar(corpus, "h1", "cc3m", "00000", [0.3], [0.1], [True])
    corpus.set_shard_status(CAPFILT_STAGE, "h1", "cc3m", "00000", "done", run)
    corpus.set_shard_status(CAPFILT_STAGE, "h1", "cc3m", "00000", "running", run)
    assert corpus._summarized_capfilt_shards("h1") == set() and corpus.capfilt_score_stats() == []
    corpus.set_shard_status(CAPFILT_STAGE, "h1", "cc3m", "00000", "done", run)
    assert corpus.reset_shard_status(CAPFILT_STAGE, "h1", "cc3m") == 1
    assert corpus._summarized_capfilt_shards("h1") == set()


def test_set_shard_statuses_writes_a_batch_in_one_transaction(corpus):
    run = corpus.start_run(CAPFILT_STAGE, "h1", {})
    batch = [ShardStatusUpdate("cc3m", f"{i:05d}", "running") for i in range(3)]
    corpus.set_shard_statuses(CAPFILT_STAGE, "h1", run, batch)
    assert [s.status for s in corpus.shard_statuses(CAPFILT_STAGE, "h1")] == ["running"] * 3
    bad = [
        ShardStatusUpdate("cc3m", "00000", "failed", error="boom"),
        ShardStatusUpdate("cc3m", "00042", "done"),
    ]
    with pytest.raises(CatalogError, match="cc3m/00042 is not registered"):
        corpus.set_shard_statuses(CAPFILT_STAGE, "h1", run, bad)
    assert corpus.shard_statuses(CAPFILT_STAGE, "h1", "cc3m")[0].status == "running"  # all or nothing
    with pytest.raises(ValueError, match="must be one of"):
        corpus.set_shard_statuses(CAPFILT_STAGE, "h1", run, [ShardStatusUpdate("cc3m", "00000", "dune")])
    corpus.set_shard_statuses(CAPFILT_STAGE, "h1", run, bad[:1])
    [first] = corpus.shard_statuses(CAPFILT_STAGE, "h1", "cc3m")[:1]
    assert (first.status, first.error) == ("failed", "boom")
    assert (
        corpus.pending_shard_count(CAPFILT_STAGE, "h1")
        == len(corpus.pending_shards(CAPFILT_STAGE, "h1"))
        == 4
    )
    assert corpus.pending_shard_count(CAPFILT_STAGE, "h1", "sbu") == 1


def test_an_older_catalog_is_upgraded_and_backfilled(tmp_path, shard_maker):
    v2 = tmp_path / "migrations_v2"
    v2.mkdir()
    for migration in load_migrations()[:2]:
        shutil.copy(MIGRATIONS_DIR / migration.name, v2)
    path = tmp_path / "catalog.duckdb"
    with Catalog.open(path, migrations_dir=v2) as old:
        old.upsert_source("cc3m", "cc3m", "/m", 8, {})
        shard_maker.register(old, "cc3m", 0)
        run = old.start_run(CAPFILT_STAGE, "h1", {})
        write_sidecar(old, "h1", "cc3m", "00000", [0.3, 0.5], [0.2, 0.1], [False, True])
        old.set_shard_status(CAPFILT_STAGE, "h1", "cc3m", "00000", "done", run)
        before = (old.sample_status_counts(), old.capfilt_score_stats())
    with Catalog.open(path) as cat:
        assert cat.schema_version == load_migrations()[-1].version >= 3
        assert (cat.sample_status_counts(), cat.capfilt_score_stats()) == before  # from Parquet still
        assert cat.backfill_summaries() == {"shards": 1, "capfilt_shards": 1}
        assert cat._shards_with_status_counts(None) == {("cc3m", "00000")}
        assert cat.sample_status_counts() == before[0]
        [stats] = cat.capfilt_score_stats()
        assert (stats.samples, stats.top1_mean, stats.web_caption_kept_share) == (
            2,
            pytest.approx(0.4),
            0.5,
        )
        assert cat.backfill_summaries() == {"shards": 0, "capfilt_shards": 0}
