"""Faults during ingest: the downloader SIGKILLed at a seeded random point, a full disk, a shard changed
on disk after registration, another process contending for the catalog. After each, a re-run completes
and the catalog agrees with the files: every finished shard registered once, checksums that match."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import pytest
from faultkit import (
    Killer,
    child_with_cmdline,
    contender,
    processes_with_env,
    rng,
    sha256,
    small_disk,
    wait_for,
)

from data_catalog import Catalog
from data_catalog.corpus_server import CorpusServer
from data_catalog.layout import Layout
from data_catalog.shard_files import scan_tar, verify_img2dataset_shard
from data_catalog.synth import FaultSpec, SynthConfig, synthesize, url_manifest
from flows.download import DownloadOptions
from flows.ingest import IngestParams, ingest_flow

N_IMAGES, N_SLOW, PER_SHARD = 100, 3, 20
N_SHARDS = -(-(N_IMAGES + N_SLOW) // PER_SHARD)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The corpus on loopback HTTP and its URL manifest (3 URLs time out, to stretch the run)."""
    root = tmp_path_factory.mktemp("fault-corpus")
    synthesize(root, SynthConfig(seed=17, n_pretrain=N_IMAGES, n_coco=0, n_vqa_images=0, n_retrieval=0))
    with CorpusServer(root) as srv:
        faults = FaultSpec(timeout=N_SLOW, slow_seconds=3.0)
        yield url_manifest(root, srv.base_url, "pretrain", out=root.parent / "urls.parquet", faults=faults)


def params_for(manifest, home: Path, **kw) -> IngestParams:
    options = DownloadOptions(
        image_size=32, samples_per_shard=PER_SHARD, processes=1, threads=4, timeout_s=1.0
    )
    base = dict(source="web", inputs=(manifest.path,), download=options, allow_loopback=True, home=home)
    return IngestParams(**{**base, **kw})


def assert_catalog_agrees_with_files(home: Path, complete: bool = True) -> list:
    """Registered shards are exactly the finished ones (when complete), each verified against its
    checksum; no sample key appears twice; samples add up to the manifest."""
    shard_dir = Layout(home).shards("web")
    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        shards = cat.shards("web")
        runs = [r.status for r in cat.runs("ingest")]
    finished = {p.name.removesuffix("_stats.json") for p in shard_dir.glob("*_stats.json")}
    if complete:
        assert {s.shard for s in shards} == finished and len(shards) == N_SHARDS
        assert runs[-1] == "done"
    keys: list[str] = []
    for rec in shards:
        assert sha256(rec.tar_path) == rec.sha256, f"shard {rec.shard} changed after registration"
        verified = verify_img2dataset_shard(rec.tar_path)  # tar, Parquet and stats agree
        assert (verified.samples_ok, verified.samples_failed) == (rec.samples_ok, rec.samples_failed)
        keys += scan_tar(rec.tar_path).keys
    assert len(keys) == len(set(keys)), "a sample key is in two shards"
    if complete:
        assert len(keys) == N_IMAGES and sum(s.samples_failed for s in shards) == N_SLOW
    return shards


def test_killed_downloader_then_a_rerun_against_a_contending_writer(
    served, tmp_path, monkeypatch, prefect_harness
):
    home, r = tmp_path / "var", rng("ingest-sigkill")
    tag = f"fault-{uuid.uuid4().hex}"
    monkeypatch.setenv("BLIP2_FAULT_TAG", tag)  # every process of the download inherits it
    shard_dir = Layout(home).shards("web")
    after = r.randint(1, N_SHARDS - 3)
    killer = Killer(
        ready=lambda: len(list(shard_dir.glob("*_stats.json"))) >= after,
        target=lambda: child_with_cmdline(os.getpid(), "flows.img2dataset_worker"),
        delay=r.uniform(0.0, 0.5),
    )
    killer.start()
    with pytest.raises(RuntimeError, match="img2dataset exited with status -9"):
        ingest_flow(params_for(served, home))
    assert killer.killed is not None
    # The pool processes die with their worker: none is left writing a shard the re-run writes too.
    wait_for(lambda: not processes_with_env(tag), 20, "the download's processes to exit")
    assert_catalog_agrees_with_files(home, complete=False)  # what was registered before the kill is whole

    with contender(Layout(home).catalog) as held:
        before = held()
        summary = ingest_flow(params_for(served, home))
        assert held() > before, "the contender never took the catalog while the flow ran"
    assert summary.samples_ok == N_IMAGES and summary.shards_skipped >= 1
    assert_catalog_agrees_with_files(home)
    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        assert [r.status for r in cat.runs("ingest")] == ["failed", "done"]


def test_full_disk_then_a_shard_changed_on_disk(served, tmp_path, prefect_harness):
    home, r = tmp_path / "var", rng("ingest-disk")
    shard_dir = Layout(home).shards("web")
    params = params_for(served, home)
    with small_disk(shard_dir, size_kb=160) as grow:
        with pytest.raises(Exception, match="not written|img2dataset exited"):
            ingest_flow(params)  # never 'done' with shards missing
        assert_catalog_agrees_with_files(home, complete=False)
        with Catalog.open(Layout(home).catalog, read_only=True) as cat:
            assert cat.runs("ingest")[-1].status == "failed"
            assert len(cat.shards("web")) < N_SHARDS

        grow(32_768)  # space freed: the re-run downloads the rest
        ingest_flow(params)
        shards = assert_catalog_agrees_with_files(home)

        victim = r.choice(shards)
        data = bytearray(victim.tar_path.read_bytes())
        data[r.randrange(1024, len(data) - 1024)] ^= 0xFF  # one flipped byte, same size
        victim.tar_path.write_bytes(bytes(data))
        plain = ingest_flow(params)  # without verify the catalog is trusted: nothing to do
        assert plain.shards_downloaded == 0
        checked = ingest_flow(params.model_copy(update={"verify": True}))
        assert checked.quarantined == 1 and checked.shards_downloaded == 1
        assert_catalog_agrees_with_files(home)
        (moved,) = (shard_dir / "_quarantine").glob(f"{victim.shard}-*")
        # The flipped byte is caught by the checksum, or earlier by the tar walk when it lands in a header.
        assert re.search(r"sha256 differs|not a readable tar", (moved / "REASON.txt").read_text())
        stats = json.loads((shard_dir / f"{victim.shard}_stats.json").read_text())
        assert stats["count"] == victim.samples_ok + victim.samples_failed
