"""The ingest flow end to end: synthetic corpus on loopback HTTP -> img2dataset -> shards -> catalog."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_catalog import Catalog, CatalogError
from data_catalog.corpus_server import CorpusServer
from data_catalog.layout import Layout
from data_catalog.synth import FaultSpec, SynthConfig, synthesize, url_manifest
from flows.download import DownloadOptions
from flows.ingest import IngestParams, ingest_flow

# What the catalog must call each injected fault (the server's 500 is one of the 5xx).
EXPECTED_REASON = {
    "http_404": "http_404",
    "http_500": "http_5xx",
    "timeout": "timeout",
    "connection_refused": "connection_refused",
    "not_an_image": "not_an_image",
    "truncated_image": "truncated_image",
    "image_too_large": "image_too_large",
}
FAULTS = FaultSpec(
    http_404=3,
    http_500=2,
    timeout=2,
    connection_refused=2,
    not_an_image=2,
    truncated_image=2,
    image_too_large=1,
    duplicate_url=4,
    slow_seconds=6.0,
)


def tar_samples(tar_path: Path) -> Counter:
    """Sample key -> number of members, read back from the tar itself."""
    with tarfile.open(tar_path) as tf:
        return Counter(m.name.split(".", 1)[0] for m in tf if m.isfile())


def assert_catalog_matches_tars(home: Path, source: str) -> list:
    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        shards = cat.shards(source)
    assert shards, "no shard registered"
    for rec in shards:
        samples = tar_samples(rec.tar_path)
        assert len(samples) == rec.samples_ok, (
            f"shard {rec.shard}: catalog {rec.samples_ok} vs tar {len(samples)}"
        )
        assert set(samples.values()) == {3}, f"shard {rec.shard}: a sample lacks its jpg/txt/json"
        table = pq.read_table(rec.tar_path.with_suffix(".parquet"))
        assert table.num_rows == rec.samples_ok + rec.samples_failed
    return shards


def small_options(**kw) -> DownloadOptions:
    base = dict(image_size=64, samples_per_shard=500, processes=1, threads=32, timeout_s=2.0)
    return DownloadOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """2,000 pretraining images (the issue's acceptance size) and tiny other splits."""
    root = tmp_path_factory.mktemp("corpus")
    synthesize(root, SynthConfig(seed=7, n_pretrain=2000, n_coco=10, n_vqa_images=10, n_retrieval=10))
    return root


def test_ingest_2000_images_with_faults(corpus, tmp_path, prefect_harness):
    home = tmp_path / "var"
    with CorpusServer(corpus) as srv:
        manifest = url_manifest(
            corpus, srv.base_url, "pretrain", out=tmp_path / "urls.parquet", faults=FAULTS
        )
        params = IngestParams(
            source="synth", inputs=(manifest.path,), download=small_options(), allow_loopback=True, home=home
        )
        summary = ingest_flow(params)

    n_faulty = sum(n for kind, n in FAULTS.counts().items() if kind != "duplicate_url")
    assert summary.dropped == {"duplicate_url": FAULTS.duplicate_url}
    assert summary.urls == 2000 + n_faulty
    assert summary.samples_ok == 2000
    assert summary.samples_failed == n_faulty
    expected = Counter()
    for kind, n in FAULTS.counts().items():
        if kind != "duplicate_url":
            expected[EXPECTED_REASON[kind]] += n
    assert summary.failures == dict(expected)

    shards = assert_catalog_matches_tars(home, "synth")
    assert len(shards) == -(-(2000 + n_faulty) // 500)
    # Each failed sample's reason names the fault injected at its URL.
    injected = {f["url"]: f["fault"] for f in json.loads(manifest.faults_path.read_text())["faults"]}
    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        failed = cat.failed_samples("synth")
    assert {s.url: s.reason for s in failed} == {
        url: EXPECTED_REASON[kind] for url, kind in injected.items() if kind != "duplicate_url"
    }

    # A second run downloads nothing: every shard is finished and registered.
    again = ingest_flow(params)
    assert (again.shards_downloaded, again.shards_skipped) == (0, len(shards))
    assert again.samples_ok == 2000


def test_retry_failed_recovers_urls_that_come_back(corpus, tmp_path, prefect_harness):
    home = tmp_path / "var"
    with CorpusServer(corpus) as srv:
        manifest = url_manifest(
            corpus,
            srv.base_url,
            "pretrain",
            out=tmp_path / "urls.parquet",
            faults=FaultSpec(connection_refused=3, http_404=1),
        )
        rows = pq.read_table(manifest.path).to_pylist()
        refused = [r for r in rows if r["fault"] == "connection_refused"]
        small = tmp_path / "small.parquet"
        keep = [r for r in rows if r["fault"] is None][:30] + [r for r in rows if r["fault"] is not None]
        pq.write_table(pa.Table.from_pylist(keep), small)
        params = IngestParams(
            source="flaky",
            inputs=(small,),
            download=small_options(samples_per_shard=20),
            allow_loopback=True,
            home=home,
        )
        first = ingest_flow(params)
        assert first.failures == {"connection_refused": 3, "http_404": 1}

        # The host that refused connections comes up; a retry fetches its images into the same shards.
        port = int(refused[0]["url"].split(":")[2].split("/")[0])
        with CorpusServer(corpus, port=port):
            second = ingest_flow(params.model_copy(update={"retry_failed": True}))
    assert (second.retried, second.recovered) == (3, 3)  # the 404 is not worth a retry
    assert second.failures == {"http_404": 1}
    assert second.samples_ok == first.samples_ok + 3
    shards = assert_catalog_matches_tars(home, "flaky")
    keys = set()
    for rec in shards:
        keys |= set(tar_samples(rec.tar_path))
    assert len(keys) == second.samples_ok  # recovered samples kept their own keys, no collision

    # Another manifest under the same source name would shift every shard id: refused, nothing replaced.
    manifest_dir = Layout(home).manifests("flaky")
    before = {p.name: p.read_bytes() for p in manifest_dir.iterdir()}
    other = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist(keep[5:]), other)
    with pytest.raises(CatalogError, match="new source name"):
        ingest_flow(params.model_copy(update={"inputs": (other,)}))
    assert {p.name: p.read_bytes() for p in manifest_dir.iterdir()} == before


def _run_cli_ingest(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ingest", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_killed_ingest_resumes_to_complete_shards(corpus, tmp_path):
    home = tmp_path / "var"
    env = dict(os.environ, BLIP2_HOME=str(home))
    with CorpusServer(corpus) as srv:
        manifest = url_manifest(
            corpus,
            srv.base_url,
            "pretrain",
            out=tmp_path / "urls.parquet",
            faults=FaultSpec(timeout=6, slow_seconds=3),
        )
        args = [
            "--source",
            "killed",
            "--input",
            str(manifest.path),
            "--image-size",
            "64",
            "--samples-per-shard",
            "100",
            "--processes",
            "1",
            "--threads",
            "4",
            "--timeout",
            "2",
            "--allow-loopback",
        ]
        proc = _run_cli_ingest(args, env)
        shard_dir = Layout(home).shards("killed")
        deadline = time.time() + 240
        while not list(shard_dir.glob("*_stats.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the flow, its img2dataset child and the pool: no goodbye
        proc.wait()
        done_before = len(list(shard_dir.glob("*_stats.json")))
        assert 0 < done_before < 21

        rerun = _run_cli_ingest(args, env)
        out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out.decode()[-3000:]
    shards = assert_catalog_matches_tars(home, "killed")
    assert len(shards) == 21  # 2,006 URLs in shards of 100
    assert sum(s.samples_ok for s in shards) == 2000
    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        assert cat.failures_by_reason("killed") == {"timeout": 6}


def test_one_download_thread_writes_each_shard_in_manifest_order(corpus, tmp_path, prefect_harness):
    """The demo's setting: with one thread per process every fresh home gets the same shards."""
    home = tmp_path / "var"
    with CorpusServer(corpus) as srv:
        manifest = url_manifest(corpus, srv.base_url, "pretrain", out=tmp_path / "urls.parquet")
        options = small_options(samples_per_shard=400, processes=2, threads=1)
        params = IngestParams(
            source="synth", inputs=(manifest.path,), download=options, allow_loopback=True, home=home
        )
        ingest_flow(params)
    shards = assert_catalog_matches_tars(home, "synth")
    assert len(shards) == 5
    for rec in shards:
        with tarfile.open(rec.tar_path) as tf:
            keys = [m.name.split(".", 1)[0] for m in tf if m.name.endswith(".jpg")]
        assert len(keys) == 400
        assert keys == sorted(keys), f"shard {rec.shard} is out of manifest order: {keys[:5]}"
