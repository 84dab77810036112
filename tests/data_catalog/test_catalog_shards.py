"""Registering img2dataset shards, and the per-sample views over shard Parquet and CapFilt sidecars."""

import hashlib
import io
import json
import re
import statistics
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_catalog.catalog import Catalog, CatalogError, ShardIntegrityError
from data_catalog.failures import classify_error
from data_catalog.layout import Layout

# (status, error_message) of each sample in the hand-built shard, in img2dataset's vocabulary.
SAMPLES = [
    ("success", None),
    ("success", None),
    ("success", None),
    ("failed_to_download", "HTTP Error 404: Not Found"),
    ("failed_to_download", "HTTP Error 404: Not Found"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>"),
    ("failed_to_download", "The read operation timed out"),
    ("failed_to_resize", "cannot identify image file <_io.BytesIO object at 0x7f>"),
]


def _key(shard_id: int, index: int) -> str:
    return f"{shard_id:05d}{index:04d}"  # img2dataset's layout: shard digits then sample digits


def write_img2dataset_shard(folder, shard_id=0, samples=SAMPLES, tar_keys=None):
    """Write `<shard>.tar`, `.parquet` and `_stats.json` as img2dataset's webdataset writer does."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{shard_id:05d}"
    keys = [_key(shard_id, i) for i in range(len(samples))]
    ok_keys = [k for k, (status, _) in zip(keys, samples, strict=True) if status == "success"]
    with tarfile.open(folder / f"{name}.tar", "w") as tar:
        for key in ok_keys if tar_keys is None else tar_keys:
            for ext, payload in (
                ("jpg", b"\xff\xd8fake-jpeg" + key.encode()),
                ("txt", b"a cat"),
                ("json", b"{}"),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    table = pa.table(
        {
            "url": [f"http://example.test/{k}.jpg" for k in keys],
            "caption": [f"caption {k}" for k in keys],
            "key": keys,
            "status": [status for status, _ in samples],
            "error_message": [message for _, message in samples],
            "width": pa.array([224 if s == "success" else None for s, _ in samples], pa.int32()),
            "height": pa.array([224 if s == "success" else None for s, _ in samples], pa.int32()),
        }
    )
    pq.write_table(table, folder / f"{name}.parquet")
    stats = {
        "count": len(samples),
        "successes": len(ok_keys),
        "failed_to_download": sum(s == "failed_to_download" for s, _ in samples),
        "failed_to_resize": sum(s == "failed_to_resize" for s, _ in samples),
        "duration": 1.5,
        "status_dict": {},
    }
    (folder / f"{name}_stats.json").write_text(json.dumps(stats))
    return folder / f"{name}.tar"


@pytest.fixture
def catalog(tmp_path):
    with Catalog.open(tmp_path / "catalog.duckdb") as cat:
        cat.upsert_source("cc3m", "cc3m", str(tmp_path / "manifests" / "cc3m"), len(SAMPLES), {})
        yield cat


def expected_failures(samples):
    return dict(Counter(classify_error(message) for status, message in samples if status != "success"))


def test_register_counts_samples_failures_bytes_and_checksum(catalog):
    tar = write_img2dataset_shard(catalog.layout.shards("cc3m"))
    record = catalog.register_img2dataset_shard("cc3m", tar)
    assert record.shard == "00000"
    assert record.tar_path == tar
    assert record.samples_ok == sum(s == "success" for s, _ in SAMPLES)
    assert record.samples_failed == len(SAMPLES) - record.samples_ok
    assert record.failures == expected_failures(SAMPLES)
    assert record.failures["http_404"] == 2
    assert record.bytes == tar.stat().st_size
    assert record.sha256 == hashlib.sha256(tar.read_bytes()).hexdigest()
    assert record.download_s == 1.5
    assert catalog.shard("cc3m", "00000") == record
    assert catalog.failures_by_reason("cc3m") == expected_failures(SAMPLES)


def test_re_registering_replaces_the_row(catalog):
    folder = catalog.layout.shards("cc3m")
    catalog.register_img2dataset_shard("cc3m", write_img2dataset_shard(folder))
    retried = [("success", None)] * 2 + [("failed_to_download", "timed out")]
    record = catalog.register_img2dataset_shard("cc3m", write_img2dataset_shard(folder, samples=retried))
    assert (record.samples_ok, record.samples_failed, record.failures) == (2, 1, {"timeout": 1})
    assert len(catalog.shards("cc3m")) == 1
    assert catalog.failures_by_reason() == {"timeout": 1}


def test_changed_shard_content_drops_its_stale_stage_status(catalog):
    folder = catalog.layout.shards("cc3m")
    tar = write_img2dataset_shard(folder)
    catalog.register_img2dataset_shard("cc3m", tar)
    run = catalog.start_run("capfilt", "h1", {})
    catalog.set_shard_status("capfilt", "h1", "cc3m", "00000", "done", run)
    catalog.register_img2dataset_shard("cc3m", tar)  # same bytes: CapFilt output is still valid
    assert [s.status for s in catalog.shard_statuses("capfilt", "h1")] == ["done"]
    catalog.register_img2dataset_shard("cc3m", write_img2dataset_shard(folder, samples=SAMPLES[1:]))
    assert catalog.shard_statuses("capfilt", "h1") == []
    assert [s.shard for s in catalog.pending_shards("capfilt", "h1")] == ["00000"]


def test_tar_with_fewer_samples_than_parquet_successes_is_refused(catalog):
    ok_keys = [_key(0, i) for i, (status, _) in enumerate(SAMPLES) if status == "success"]
    tar = write_img2dataset_shard(catalog.layout.shards("cc3m"), tar_keys=ok_keys[:-1])
    with pytest.raises(ShardIntegrityError) as err:
        catalog.register_img2dataset_shard("cc3m", tar)
    message = str(err.value)
    assert str(tar) in message
    assert f"holds {len(ok_keys) - 1} samples" in message
    assert ok_keys[-1] in message
    assert catalog.shards() == []


def test_stats_json_disagreeing_with_parquet_is_refused(catalog):
    tar = write_img2dataset_shard(catalog.layout.shards("cc3m"))
    stats_path = tar.with_name("00000_stats.json")
    stats = json.loads(stats_path.read_text())
    stats_path.write_text(json.dumps({**stats, "count": stats["count"] + 1}))
    with pytest.raises(ShardIntegrityError, match="_stats.json"):
        catalog.register_img2dataset_shard("cc3m", tar)


def test_missing_or_corrupt_files_are_named(catalog):
    tar = write_img2dataset_shard(catalog.layout.shards("cc3m"))
    tar.with_suffix(".parquet").unlink()
    with pytest.raises(ShardIntegrityError, match=r"missing file .*00000\.parquet"):
        catalog.register_img2dataset_shard("cc3m", tar)
    tar = write_img2dataset_shard(catalog.layout.shards("cc3m"), shard_id=1)
    tar.write_bytes(b"this is not a tar file" * 30)
    with pytest.raises(ShardIntegrityError, match="not a readable tar"):
        catalog.register_img2dataset_shard("cc3m", tar)
    tar = write_img2dataset_shard(catalog.layout.shards("cc3m"), shard_id=2)
    # A download killed mid-write: cut inside a member's data, and at a member boundary.
    intact = tar.read_bytes()
    tar.write_bytes(intact[: 512 * 5 + 7])
    with pytest.raises(ShardIntegrityError, match="unexpected end of data"):
        catalog.register_img2dataset_shard("cc3m", tar)
    tar.write_bytes(intact[: 512 * 6])
    with pytest.raises(ShardIntegrityError, match=re.escape(str(tar))):
        catalog.register_img2dataset_shard("cc3m", tar)
    assert catalog.shards() == []


def test_parquet_without_img2dataset_columns_is_refused(catalog):
    tar = write_img2dataset_shard(catalog.layout.shards("cc3m"))
    pq.write_table(pa.table({"key": ["x"]}), tar.with_suffix(".parquet"))
    with pytest.raises(ShardIntegrityError, match="lacks column.*status, error_message"):
        catalog.register_img2dataset_shard("cc3m", tar)


def test_shard_of_an_unknown_source_is_refused(catalog):
    tar = write_img2dataset_shard(catalog.layout.shards("laion"))
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


def test_sample_status_counts_per_source_ignore_temp_files(catalog):
    write_img2dataset_shard(catalog.layout.shards("cc3m"), shard_id=0)
    write_img2dataset_shard(catalog.layout.shards("cc3m"), shard_id=1, samples=SAMPLES[:2])
    write_img2dataset_shard(catalog.layout.shards("sbu"), shard_id=0, samples=SAMPLES[3:])
    # A half-written file from an interrupted atomic write must not be read.
    (catalog.layout.shards("cc3m") / ".tmp-00002.parquet").write_bytes(b"half a parquet")
    expected_cc3m = Counter(s for s, _ in SAMPLES) + Counter(s for s, _ in SAMPLES[:2])
    counts = catalog.sample_status_counts()
    assert counts == {"cc3m": dict(expected_cc3m), "sbu": dict(Counter(s for s, _ in SAMPLES[3:]))}
    assert catalog.sample_status_counts("sbu") == {"sbu": counts["sbu"]}


def test_failed_samples_carry_url_caption_and_reason(catalog):
    write_img2dataset_shard(catalog.layout.shards("cc3m"), shard_id=0)
    write_img2dataset_shard(catalog.layout.shards("cc3m"), shard_id=1, samples=SAMPLES[3:5])
    failed = catalog.failed_samples("cc3m")
    expected = [
        (f"{shard:05d}", _key(shard, i), message, classify_error(message))
        for shard, samples in ((0, SAMPLES), (1, SAMPLES[3:5]))
        for i, (status, message) in enumerate(samples)
        if status != "success"
    ]
    assert [(f.shard, f.key, f.message, f.reason) for f in failed] == expected
    assert failed[0].url == f"http://example.test/{failed[0].key}.jpg"
    assert failed[0].caption == f"caption {failed[0].key}"
    assert [f.key for f in catalog.failed_samples("cc3m", "00001")] == [_key(1, 0), _key(1, 1)]


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


def test_capfilt_score_stats_per_config_hash(catalog):
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
    _write_sidecar(catalog.home, "aaa", "cc3m", "00000", rows_a[:20])
    _write_sidecar(catalog.home, "aaa", "sbu", "00000", rows_a[20:])
    rows_b = [{"key": "y", "web": "w", "top1": "t", "top2": "w", "s1": 0.5, "s2": 0.4}]
    _write_sidecar(catalog.home, "bbb", "cc3m", "00000", rows_b)

    stats = {s.config_hash: s for s in catalog.capfilt_score_stats()}
    assert set(stats) == {"aaa", "bbb"}
    scored = [r for r in rows_a if r.get("error") is None]
    top1 = [r["s1"] for r in scored]
    a = stats["aaa"]
    assert (a.samples, a.errors) == (len(scored), 1)
    assert a.top1_mean == pytest.approx(statistics.fmean(top1))
    assert (a.top1_p10, a.top1_median, a.top1_p90) == pytest.approx(np.quantile(top1, [0.1, 0.5, 0.9]))
    assert a.web_caption_kept_share == pytest.approx(
        sum(r["web"] in (r["top1"], r["top2"]) for r in scored) / 40
    )
    assert stats["bbb"].web_caption_kept_share == 1.0
    assert [s.config_hash for s in catalog.capfilt_score_stats("bbb")] == ["bbb"]
