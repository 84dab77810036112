"""The catalog's typed API: each method round-trips, pending-shard logic, errors that name the problem."""

import math
from pathlib import Path

import pytest

from data_catalog import Catalog, CatalogError
from data_catalog.records import StageRunRecord


@pytest.fixture
def register_shards(catalog, shard_maker):
    def register(source, n_shards):
        """Create `source` and register tiny img2dataset shards 00000, 00001, ... of it."""
        catalog.upsert_source(source, "web", f"/manifests/{source}", 100, {})
        for i in range(n_shards):
            shard_maker.register(catalog, source, i)

    return register


def test_home_is_the_catalogs_folder(tmp_path, catalog):
    assert catalog.home == tmp_path
    assert catalog.layout.catalog == catalog.path


def test_upsert_source_round_trips_and_replaces(catalog):
    catalog.upsert_source("cc3m", "cc3m", "/m/cc3m", 10, {"missing_url": 2, "duplicate": 1})
    catalog.upsert_source("coco", "coco", "/m/coco", 4, {})
    catalog.upsert_source("cc3m", "cc3m", "/m/cc3m-v2", 12, {"missing_url": 1})
    sources = catalog.sources()
    assert [(s.name, s.manifest_dir, s.n_urls, s.dropped) for s in sources] == [
        ("cc3m", "/m/cc3m-v2", 12, {"missing_url": 1}),
        ("coco", "/m/coco", 4, {}),
    ]
    assert sources[0].updated_at.tzinfo is not None


def test_runs_start_finish_and_filter_by_stage(catalog):
    params = {"lr": 1e-4, "batch": 8, "nested": {"shards": ["00000"]}}
    first = catalog.start_run("stage1", "cfg1", params, flow_run_id="flow-123")
    second = catalog.start_run("capfilt", "cfg2", {})
    assert first != second
    running = catalog.run(first)
    assert isinstance(running, StageRunRecord)
    assert (running.stage, running.config_hash, running.params, running.flow_run_id) == (
        "stage1",
        "cfg1",
        params,
        "flow-123",
    )
    assert (running.status, running.finished_at, running.duration_s) == ("running", None, None)

    catalog.finish_run(first, "done", {"steps": 10, "loss": 0.5})
    done = catalog.run(first)
    assert (done.status, done.summary) == ("done", {"steps": 10, "loss": 0.5})
    assert done.finished_at >= done.started_at and done.duration_s >= 0
    assert [r.run_id for r in catalog.runs("stage1")] == [first]
    assert {r.run_id for r in catalog.runs()} == {first, second}
    assert catalog.run("nope") is None


def test_finish_run_errors_name_the_run(catalog):
    with pytest.raises(CatalogError, match="unknown run id 'ghost'"):
        catalog.finish_run("ghost", "done")
    run = catalog.start_run("ingest", "h", {})
    with pytest.raises(ValueError, match="final status .* got 'finished'"):
        catalog.finish_run(run, "finished")
    catalog.finish_run(run, "failed", {"error": "boom"})
    with pytest.raises(CatalogError, match="already finished with status 'failed'"):
        catalog.finish_run(run, "done")


def test_start_run_rejects_bad_input(catalog):
    with pytest.raises(ValueError, match="stage name 'a/b'"):
        catalog.start_run("a/b", "h", {})
    with pytest.raises(ValueError, match="params of stage 'ingest' must be JSON-serialisable"):
        catalog.start_run("ingest", "h", {"path": Path("/x")})
    assert catalog.runs() == []


def test_shard_status_pending_and_reset(catalog, register_shards):
    register_shards("cc3m", 3)
    register_shards("sbu", 1)
    run = catalog.start_run("capfilt", "h1", {})
    catalog.set_shard_status("capfilt", "h1", "cc3m", "00000", "done", run, output_path="/o/00000.parquet")
    catalog.set_shard_status("capfilt", "h1", "cc3m", "00001", "failed", run, error="OOM")
    catalog.set_shard_status("capfilt", "h1", "cc3m", "00002", "running", run)
    catalog.set_shard_status("capfilt", "other-hash", "cc3m", "00001", "done", run)

    statuses = {s.shard: s for s in catalog.shard_statuses("capfilt", "h1", "cc3m")}
    assert {k: s.status for k, s in statuses.items()} == {
        "00000": "done",
        "00001": "failed",
        "00002": "running",
    }
    assert statuses["00000"].output_path == "/o/00000.parquet"
    assert statuses["00001"].error == "OOM"
    assert statuses["00000"].run_id == run

    pending = [(s.source, s.shard) for s in catalog.pending_shards("capfilt", "h1")]
    assert pending == [("cc3m", "00001"), ("cc3m", "00002"), ("sbu", "00000")]
    assert [s.shard for s in catalog.pending_shards("capfilt", "h1", "cc3m")] == ["00001", "00002"]
    assert [s.shard for s in catalog.pending_shards("capfilt", "other-hash", "cc3m")] == ["00000", "00002"]

    # Re-running a chosen shard: forget its progress, it becomes pending again; others keep theirs.
    assert catalog.reset_shard_status("capfilt", "h1", "cc3m", ["00000"]) == 1
    assert [s.shard for s in catalog.pending_shards("capfilt", "h1", "cc3m")] == ["00000", "00001", "00002"]
    assert catalog.reset_shard_status("capfilt", "h1", "cc3m") == 2
    assert catalog.shard_statuses("capfilt", "h1") == []
    assert len(catalog.shard_statuses("capfilt", "other-hash")) == 1


def test_set_shard_status_validates(catalog, register_shards):
    register_shards("cc3m", 1)
    run = catalog.start_run("capfilt", "h1", {})
    with pytest.raises(ValueError, match="status of shard cc3m/00000 .* got 'ok'"):
        catalog.set_shard_status("capfilt", "h1", "cc3m", "00000", "ok", run)
    with pytest.raises(CatalogError, match="shard cc3m/00009 is not registered"):
        catalog.set_shard_status("capfilt", "h1", "cc3m", "00009", "done", run)
    with pytest.raises(CatalogError, match="unknown run id 'ghost'"):
        catalog.set_shard_status("capfilt", "h1", "cc3m", "00000", "done", "ghost")


def test_checkpoints_round_trip_in_step_order(catalog):
    run = catalog.start_run("stage1", "h", {})
    catalog.record_checkpoint(run, 200, "/runs/stage1/x/step-200.safetensors")
    catalog.record_checkpoint(run, 100, "/runs/stage1/x/step-100.safetensors")
    assert [(c.step, c.path) for c in catalog.checkpoints(run)] == [
        (100, "/runs/stage1/x/step-100.safetensors"),
        (200, "/runs/stage1/x/step-200.safetensors"),
    ]
    with pytest.raises(CatalogError, match="unknown run id"):
        catalog.record_checkpoint("ghost", 1, "/x")


def test_metrics_batch_insert_filter_and_resume_overwrite(catalog):
    run = catalog.start_run("stage1", "h", {})
    catalog.log_metrics(run, 1, {"loss_itc": 2.5, "loss_itm": 0.7, "lr": 1e-5})
    catalog.log_metrics(run, 2, {"loss_itc": 2.0, "lr": 2e-5})
    catalog.log_metrics(run, 2, {"loss_itc": 1.9})  # a resumed run re-logs step 2
    catalog.log_metrics(run, 3, {"loss_itc": float("nan")})
    catalog.log_metrics(run, 4, {})
    values = [(m.step, m.value) for m in catalog.metrics(run, "loss_itc")]
    assert values[:2] == [(1, 2.5), (2, 1.9)]
    assert values[2][0] == 3 and math.isnan(values[2][1])
    assert len(catalog.metrics(run)) == 6
    with pytest.raises(ValueError, match="metrics of run .* step 5"):
        catalog.log_metrics(run, 5, {"loss": "high"})
    with pytest.raises(CatalogError, match="unknown run id"):
        catalog.log_metrics("ghost", 1, {"loss": 1.0})


def test_eval_results_round_trip(catalog):
    run = catalog.start_run("evaluate", "h", {})
    other = catalog.start_run("evaluate", "h2", {})
    catalog.record_eval(run, "vqa", "vqav2-val", {"accuracy": 0.61}, checkpoint="/ckpt/stage2.safetensors")
    catalog.record_eval(run, "caption", "coco-karpathy-test", {"cider": 1.2, "bleu4": 0.4})
    catalog.record_eval(other, "retrieval", "flickr30k", {"r@1": 0.9})
    results = catalog.eval_results(run)
    assert [(r.task, r.dataset, r.metric, r.value, r.checkpoint) for r in results] == [
        ("caption", "coco-karpathy-test", "bleu4", 0.4, None),
        ("caption", "coco-karpathy-test", "cider", 1.2, None),
        ("vqa", "vqav2-val", "accuracy", 0.61, "/ckpt/stage2.safetensors"),
    ]
    assert len(catalog.eval_results()) == 4
    with pytest.raises(ValueError, match="got no metrics"):
        catalog.record_eval(run, "vqa", "vqav2-val", {})


def test_status_summary_per_source_and_stage(catalog, register_shards, shard_maker):
    register_shards("cc3m", 2)
    catalog.upsert_source("coco", "coco", "/m/coco", 0, {})
    run = catalog.start_run("capfilt", "h1", {})
    catalog.set_shard_status("capfilt", "h1", "cc3m", "00000", "done", run)

    summary = catalog.status_summary()
    sources = {s.name: s for s in summary.sources}
    samples = shard_maker.samples
    n_ok = sum(status == "success" for status, _ in samples)
    assert (sources["cc3m"].shards, sources["cc3m"].samples_ok) == (2, 2 * n_ok)
    assert sources["cc3m"].samples_failed == 2 * (len(samples) - n_ok)
    assert sources["cc3m"].failures == {k: 2 * v for k, v in shard_maker.expected_failures().items()}
    assert (sources["coco"].shards, sources["coco"].samples_ok, sources["coco"].failures) == (0, 0, {})
    [stage] = summary.stages
    assert (stage.stage, stage.config_hash, stage.done, stage.running, stage.failed, stage.pending) == (
        "capfilt",
        "h1",
        1,
        0,
        0,
        1,
    )


def test_read_only_catalog_reads_but_refuses_writes(tmp_path):
    path = tmp_path / "catalog.duckdb"
    with Catalog.open(path) as catalog:
        catalog.upsert_source("coco", "coco", "/m", 1, {})
    with Catalog.open(path, read_only=True) as catalog:
        assert [s.name for s in catalog.sources()] == ["coco"]
        with pytest.raises(CatalogError, match="opened read-only"):
            catalog.upsert_source("sbu", "sbu", "/m", 1, {})


def test_closed_catalog_says_so(catalog):
    catalog.close()
    catalog.close()  # closing twice is harmless
    with pytest.raises(CatalogError, match="is closed"):
        catalog.sources()


def test_delete_source_forgets_its_rows_and_leaves_files_and_others(catalog, register_shards):
    register_shards("cc3m", 2)
    register_shards("sbu", 1)
    run = catalog.start_run("capfilt", "h1", {})
    catalog.set_shard_status("capfilt", "h1", "cc3m", "00000", "done", run)
    catalog.set_shard_status("capfilt", "h1", "sbu", "00000", "done", run)
    files = sorted(p for p in catalog.layout.shards("cc3m").iterdir())
    sbu_before = (catalog.shards("sbu"), catalog.shard_statuses("capfilt", "h1", "sbu"))

    assert catalog.delete_source("cc3m") == 2
    assert [s.name for s in catalog.sources()] == ["sbu"]
    assert catalog.shards("cc3m") == []
    assert catalog.shard_statuses("capfilt", "h1", "cc3m") == []
    assert catalog.failures_by_reason("cc3m") == {}
    assert catalog.sample_status_counts("cc3m") == {}
    assert (catalog.shards("sbu"), catalog.shard_statuses("capfilt", "h1", "sbu")) == sbu_before
    assert [r.run_id for r in catalog.runs()] == [run]  # history stays
    assert sorted(catalog.layout.shards("cc3m").iterdir()) == files

    # The same name can be ingested again: the source and its shards register afresh.
    register_shards("cc3m", 1)
    assert [s.shard for s in catalog.shards("cc3m")] == ["00000"]
    assert catalog.pending_shards("capfilt", "h1", "cc3m")[0].shard == "00000"


def test_delete_source_is_all_or_nothing(catalog, register_shards, monkeypatch):
    register_shards("cc3m", 1)
    before = (catalog.sources(), catalog.shards(), catalog.failures_by_reason())
    with pytest.raises(CatalogError, match="unknown source 'laion'"):
        catalog.delete_source("laion")
    # A failure after some rows are gone rolls every deletion back.
    real_require = catalog._require_source
    calls = []

    def fail_late(con, name):
        real_require(con, name)
        con.execute("DELETE FROM shards WHERE source = ?", [name])
        calls.append(name)
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(catalog, "_require_source", fail_late)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        catalog.delete_source("cc3m")
    monkeypatch.undo()
    assert calls == ["cc3m"]
    assert (catalog.sources(), catalog.shards(), catalog.failures_by_reason()) == before


def test_delete_source_needs_a_writable_catalog(tmp_path, shard_maker):
    path = tmp_path / "catalog.duckdb"
    with Catalog.open(path) as catalog:
        catalog.upsert_source("cc3m", "web", "/m", 1, {})
        shard_maker.register(catalog, "cc3m", 0)
    with Catalog.open(path, read_only=True) as catalog:
        with pytest.raises(CatalogError, match="opened read-only"):
            catalog.delete_source("cc3m")
        assert len(catalog.shards("cc3m")) == 1
