"""Registering img2dataset shards, and the per-sample views over shard Parquet and CapFilt sidecars."""

import hashlib
import json
import re
import statistics
from collections import Counter

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_catalog.catalog import Catalog, CatalogError, ShardIntegrityError
from data_catalog.failures import classify_error
from data_catalog.layout import Layout
from data_catalog.records import CAPFILT_STAGE
from data_catalog.summaries import SCORE_BIN_WIDTH


@pytest.fixture
def catalog(tmp_path):
    """A catalog with the source cc3m (the shared fixture's catalog has no sources)."""
    with Catalog.open(tmp_path / "catalog.duckdb") as cat:
        cat.upsert_source("cc3m", "cc3m", str(tmp_path / "manifests" / "cc3m"), 100, {})
        yield cat


def test_register_counts_samples_failures_bytes_and_checksum(catalog, shard_maker):
    tar = shard_maker.write(catalog.layout.shards("cc3m"))
    record = catalog.register_img2dataset_shard("cc3m", tar)
    assert record.shard == "00000"
    assert record.tar_path == tar
    assert record.samples_ok == sum(s == "success" for s, _ in shard_maker.samples)
    assert record.samples_failed == len(shard_maker.samples) - record.samples_ok
    assert record.failures == shard_maker.expected_failures(shard_maker.samples)
    assert record.failures["http_404"] == 2
    assert record.bytes == tar.stat().st_size
    assert record.sha256 == hashlib.sha256(tar.read_bytes()).hexdigest()
    assert record.download_s == 1.5
    assert catalog.shard("cc3m", "00000") == record
    assert catalog.failures_by_reason("cc3m") == shard_maker.expected_failures(shard_maker.samples)


def test_re_registering_replaces_the_row(catalog, shard_maker):
    folder = catalog.layout.shards("cc3m")
    catalog.register_img2dataset_shard("cc3m", shard_maker.write(folder))
    retried = [("success", None)] * 2 + [("failed_to_download", "timed out")]
    record = catalog.register_img2dataset_shard("cc3m", shard_maker.write(folder, samples=retried))
    assert (record.samples_ok, record.samples_failed, record.failures) == (2, 1, {"timeout": 1})
    assert len(catalog.shards("cc3m")) == 1
    assert catalog.failures_by_reason() == {"timeout": 1}


def test_changed_shard_content_drops_its_stale_stage_status(catalog, shard_maker):
    folder = catalog.layout.shards("cc3m")
    tar = shard_maker.write(folder)
    catalog.register_img2dataset_shard("cc3m", tar)
    run = catalog.start_run("capfilt", "h1", {})
    catalog.set_shard_status("capfilt", "h1", "cc3m", "00000", "done", run)
    catalog.register_img2dataset_shard("cc3m", tar)  # same bytes: CapFilt output is still valid
    assert [s.status for s in catalog.shard_statuses("capfilt", "h1")] == ["done"]
    catalog.register_img2dataset_shard("cc3m", shard_maker.write(folder, samples=shard_maker.samples[1:]))
    assert catalog.shard_statuses("capfilt", "h1") == []
    assert [s.shard for s in catalog.pending_shards("capfilt", "h1")] == ["00000"]


def test_tar_with_fewer_samples_than_parquet_successes_is_refused(catalog, shard_maker):
    ok_keys = [
        shard_maker.key(0, i) for i, (status, _) in enumerate(shard_maker.samples) if status == "success"
    ]
    tar = shard_maker.write(catalog.layout.shards("cc3m"), tar_keys=ok_keys[:-1])
    with pytest.raises(ShardIntegrityError) as err:
        catalog.register_img2dataset_shard("cc3m", tar)
    message = str(err.value)
    assert str(tar) in message
    assert f"holds {len(ok_keys) - 1} samples" in message
    assert ok_keys[-1] in message
    assert catalog.shards() == []


def test_stats_json_disagreeing_with_parquet_is_refused(catalog, shard_maker):
    tar = shard_maker.write(catalog.layout.shards("cc3m"))
    stats_path = tar.with_name("00000_stats.json")
    stats = json.loads(stats_path.read_text())
    stats_path.write_text(json.dumps({**stats, "count": stats["count"] + 1}))
    with pytest.raises(ShardIntegrityError, match="_stats.json"):
        catalog.register_img2dataset_shard("cc3m", tar)


def test_missing_or_corrupt_files_are_named(catalog, shard_maker):
    tar = shard_maker.write(catalog.layout.shards("cc3m"))
    tar.with_suffix(".parquet").unlink()
    with pytest.raises(ShardIntegrityError, match=r"missing file .*00000\.parquet"):
        catalog.register_img2dataset_shard("cc3m", tar)
    tar = shard_maker.write(catalog.layout.shards("cc3m"), shard_id=1)
    tar.write_bytes(b"this is not a tar file" * 30)
    with pytest.raises(ShardIntegrityError, match="not a readable tar"):
        catalog.register_img2dataset_shard("cc3m", tar)
    tar = shard_maker.write(catalog.layout.shards("cc3m"), shard_id=2)
    # A download killed mid-write: cut inside a member's data, and at a member boundary.
    intact = tar.read_bytes()
    tar.write_bytes(intact[: 512 * 5 + 7])
    with pytest.raises(ShardIntegrityError, match="cut short|runs past the end"):
        catalog.register_img2dataset_shard("cc3m", tar)
    tar.write_bytes(intact[: 512 * 6])
    with pytest.raises(ShardIntegrityError, match=re.escape(str(tar)) + ".*no end-of-archive block"):
        catalog.register_img2dataset_shard("cc3m", tar)
    assert catalog.shards() == []


def test_parquet_without_img2dataset_columns_is_refused(catalog, shard_maker):
    tar = shard_maker.write(catalog.layout.shards("cc3m"))
    pq.write_table(pa.table({"key": ["x"]}), tar.with_suffix(".parquet"))
    with pytest.raises(ShardIntegrityError, match="lacks column.*status, error_message"):
        catalog.register_img2dataset_shard("cc3m", tar)


def test_shard_of_an_unknown_source_is_refused(catalog, shard_maker):
    tar = shard_maker.write(catalog.layout.shards("laion"))
    with pytest.raises(CatalogError, match="unknown source 'laion'"):
        catalog.register_img2dataset_shard("laion", tar)


# -- views over Parquet ---------------------------------------------------------------------------------


def test_views_with_no_files_give_empty_results(catalog):
    assert catalog.sample_status_counts() == {}
    assert catalog.sample_status_counts("cc3m") == {}
    assert catalog.failed_samples("cc3m") == []
    assert catalog.failed_samples("cc3m", "00000") == []
    assert catalog.capfilt_score_stats() == []
    assert catalog.capfilt_score_stats("h1") == []


def _register_views_corpus(catalog, shard_maker):
    """cc3m 00000 (all samples) and 00001 (the first two), sbu 00000 (all but the first three)."""
    samples = shard_maker.samples
    catalog.upsert_source("sbu", "sbu", "/m/sbu", 100, {})
    shard_maker.register(catalog, "cc3m", 0)
    shard_maker.register(catalog, "cc3m", 1, samples[:2])
    shard_maker.register(catalog, "sbu", 0, samples[3:])
    return {
        "cc3m": dict(Counter(s for s, _ in samples) + Counter(s for s, _ in samples[:2])),
        "sbu": dict(Counter(s for s, _ in samples[3:])),
    }


def _write_unregistered_noise(folder, shard_maker):
    """What else lies in a shard folder: a shard img2dataset is still writing, a finished shard not yet
    registered, a temp file, a quarantined shard and retry staging. Returns the half-written Parquet."""
    half = shard_maker.write(folder, shard_id=2).with_suffix(".parquet")
    half.with_name("00002_stats.json").unlink()
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    shard_maker.write(folder, shard_id=3)
    (folder / ".tmp-00004.parquet").write_bytes(b"half a parquet")
    shard_maker.write(folder / "_quarantine" / "00005-20250101T000000", shard_id=5)
    shard_maker.write(folder / "_retry" / "00000", shard_id=0)
    return half


def test_sample_views_read_only_registered_shards(catalog, shard_maker):
    expected = _register_views_corpus(catalog, shard_maker)
    before = (catalog.sample_status_counts(), catalog.failed_samples("cc3m"))
    half = _write_unregistered_noise(catalog.layout.shards("cc3m"), shard_maker)
    with pytest.raises(duckdb.Error):  # what a glob of the folder would have met
        duckdb.sql(f"SELECT count(*) FROM read_parquet('{half}')").fetchall()

    counts = catalog.sample_status_counts()
    assert counts == expected
    assert catalog.sample_status_counts("sbu") == {"sbu": expected["sbu"]}
    assert (counts, catalog.failed_samples("cc3m")) == before
    assert {f.shard for f in before[1]} == {"00000"}  # 00001 holds two successes only
    assert catalog.failed_samples("cc3m", "00003") == []
    assert catalog.failed_samples("cc3m", "00002") == []


def test_registered_shard_whose_parquet_vanished_is_named(catalog, shard_maker):
    tar = shard_maker.register(catalog, "cc3m", 0)
    tar.with_suffix(".parquet").unlink()
    with pytest.raises(CatalogError, match=r"cc3m/00000 is registered but its Parquet .*00000\.parquet"):
        catalog.sample_status_counts()


def test_failed_samples_carry_url_caption_and_reason(catalog, shard_maker):
    samples = shard_maker.samples
    shard_maker.register(catalog, "cc3m", 0)
    shard_maker.register(catalog, "cc3m", 1, samples[3:5])
    failed = catalog.failed_samples("cc3m")
    expected = [
        ("cc3m", f"{shard:05d}", shard_maker.key(shard, i), message, classify_error(message))
        for shard, shard_samples in ((0, samples), (1, samples[3:5]))
        for i, (status, message) in enumerate(shard_samples)
        if status != "success"
    ]
    assert [(f.source, f.shard, f.key, f.message, f.reason) for f in failed] == expected
    assert failed[0].url == f"http://example.test/{failed[0].key}.jpg"
    assert failed[0].caption == f"caption {failed[0].key}"
    keys_of_00001 = [f.key for f in catalog.failed_samples("cc3m", "00001")]
    assert keys_of_00001 == [shard_maker.key(1, 0), shard_maker.key(1, 1)]


def _write_sidecar(home, config_hash, source, shard, rows):
    folder = Layout(home).capfilt(config_hash, source)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "key": [r["key"] for r in rows],
            "web_caption": [r["web"] for r in rows],
            "candidates": [[r["top1"], r["top2"], "other"] for r in rows],
            "scores": [[r["s1"], r["s2"], 0.0] for r in rows],
            "top1": [r["top1"] for r in rows],
            "top2": [r["top2"] for r in rows],
            "top1_score": pa.array([r["s1"] for r in rows], pa.float64()),
            "top2_score": pa.array([r["s2"] for r in rows], pa.float64()),
            "web_caption_rank": [0 for _ in rows],
            "error": pa.array([r.get("error") for r in rows], pa.string()),
        }
    )
    pq.write_table(table, folder / f"{shard}.parquet")


def _capfilt_done(catalog, config_hash, source, shard, rows):
    """What the CapFilt flow does per shard: write the sidecar, then mark the shard done."""
    _write_sidecar(catalog.home, config_hash, source, shard, rows)
    run = catalog.start_run(CAPFILT_STAGE, config_hash, {})
    catalog.set_shard_status(CAPFILT_STAGE, config_hash, source, shard, "done", run)


def test_capfilt_score_stats_per_config_hash(catalog, shard_maker):
    _register_views_corpus(catalog, shard_maker)
    rng = np.random.default_rng(0)
    rows_a = []
    for i in range(40):
        web = f"web {i}"
        kept = i % 4 == 0  # the web caption survives ranking for every fourth sample
        rows_a.append(
            {
                "key": f"{i:09d}",
                "web": web,
                "top1": web if kept else f"syn {i}",
                "top2": f"syn2 {i}",
                "s1": float(rng.uniform(0.2, 0.4)),
                "s2": 0.1,
            }
        )
    rows_a.append(
        {"key": "x", "web": "w", "top1": None, "top2": None, "s1": None, "s2": None, "error": "boom"}
    )
    _capfilt_done(catalog, "aaa", "cc3m", "00000", rows_a[:20])
    _capfilt_done(catalog, "aaa", "sbu", "00000", rows_a[20:])
    rows_b = [{"key": "y", "web": "w", "top1": "t", "top2": "w", "s1": 0.5, "s2": 0.4}]
    _capfilt_done(catalog, "bbb", "cc3m", "00000", rows_b)

    stats = {s.config_hash: s for s in catalog.capfilt_score_stats()}
    assert set(stats) == {"aaa", "bbb"}
    scored = [r for r in rows_a if r.get("error") is None]
    top1 = [r["s1"] for r in scored]
    a = stats["aaa"]
    assert (a.samples, a.errors) == (len(scored), 1)
    assert a.top1_mean == pytest.approx(statistics.fmean(top1))
    # Quantiles come from the per-shard fixed-bin histograms: within one bin width; exact=True reads Parquet.
    exact = np.quantile(top1, [0.1, 0.5, 0.9])
    assert (a.top1_p10, a.top1_median, a.top1_p90) == pytest.approx(exact, abs=SCORE_BIN_WIDTH)
    exact_a = {s.config_hash: s for s in catalog.capfilt_score_stats(exact=True)}["aaa"]
    assert (exact_a.top1_p10, exact_a.top1_median, exact_a.top1_p90) == pytest.approx(exact)
    assert a.web_caption_kept_share == pytest.approx(
        sum(r["web"] in (r["top1"], r["top2"]) for r in scored) / 40
    )
    assert stats["bbb"].web_caption_kept_share == 1.0
    assert [s.config_hash for s in catalog.capfilt_score_stats("bbb")] == ["bbb"]


def test_capfilt_score_stats_read_only_sidecars_of_done_shards(catalog, shard_maker):
    _register_views_corpus(catalog, shard_maker)
    row = {"key": "k", "web": "w", "top1": "t", "top2": "u", "s1": 0.3, "s2": 0.2}
    _capfilt_done(catalog, "aaa", "cc3m", "00000", [row])
    # Shard 00001 is still running: its sidecar exists (a crashed run's?) but is not trusted yet.
    run = catalog.start_run(CAPFILT_STAGE, "aaa", {})
    catalog.set_shard_status(CAPFILT_STAGE, "aaa", "cc3m", "00001", "running", run)
    _write_sidecar(catalog.home, "aaa", "cc3m", "00001", [row] * 5)
    folder = catalog.layout.capfilt("aaa", "cc3m")
    (folder / ".tmp-00002.parquet").write_bytes(b"half a sidecar")
    _write_sidecar(catalog.home, "aaa", "sbu", "00000", [row] * 7)  # no status at all
    # Done under another stage name: not a CapFilt sidecar.
    other = catalog.start_run("stage1", "aaa", {})
    catalog.set_shard_status("stage1", "aaa", "sbu", "00000", "done", other)

    [stats] = catalog.capfilt_score_stats()
    assert (stats.config_hash, stats.samples, stats.errors) == ("aaa", 1, 0)

    # New bytes for a shard make its old sidecar stale: it leaves the view with the 'done' status.
    shard_maker.register(catalog, "cc3m", 0, shard_maker.samples[1:])
    assert catalog.capfilt_score_stats() == []


def test_done_shard_whose_sidecar_vanished_is_named(catalog, shard_maker):
    shard_maker.register(catalog, "cc3m", 0)
    row = {"key": "k", "web": "w", "top1": "t", "top2": "u", "s1": 0.3, "s2": 0.2}
    _capfilt_done(catalog, "aaa", "cc3m", "00000", [row])
    catalog.layout.capfilt_sidecar("aaa", "cc3m", "00000").unlink()
    with pytest.raises(CatalogError, match="done for shard cc3m/00000, but its sidecar .* is missing"):
        catalog.capfilt_score_stats("aaa")


def test_a_damaged_tar_header_is_refused(catalog, shard_maker):
    tar = shard_maker.write(catalog.layout.shards("cc3m"))
    data = bytearray(tar.read_bytes())
    data[3] ^= 0xFF  # one flipped byte in the first member's name: its header checksum no longer holds
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="bad header checksum at byte 0"):
        catalog.register_img2dataset_shard("cc3m", tar)
