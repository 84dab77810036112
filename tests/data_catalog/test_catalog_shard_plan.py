"""The planners' light shard listing (Catalog.shard_plan) against the full records it stands in for."""

import pytest

from data_catalog import CAPFILT_STAGE, PlannedShard

ONLY_OK = (("success", None),) * 2


@pytest.fixture
def planned(catalog, shard_maker):
    """cc3m shards 00000-00002 (00001 without failures) and sbu 00000; CapFilt under 'h1': cc3m 00000
    done, 00001 failed, sbu 00000 running; under 'h2': cc3m 00001 done."""
    catalog.upsert_source("cc3m", "cc3m", "/m/cc3m", 16, {})
    catalog.upsert_source("sbu", "sbu", "/m/sbu", 16, {})
    shard_maker.register(catalog, "cc3m", 0)
    shard_maker.register(catalog, "cc3m", 1, ONLY_OK)
    shard_maker.register(catalog, "cc3m", 2, shard_maker.samples[4:])
    shard_maker.register(catalog, "sbu", 0)
    run = catalog.start_run(CAPFILT_STAGE, "h1", {})
    catalog.set_shard_status(CAPFILT_STAGE, "h1", "cc3m", "00000", "done", run)
    catalog.set_shard_status(CAPFILT_STAGE, "h1", "cc3m", "00001", "failed", run, error="OOM")
    catalog.set_shard_status(CAPFILT_STAGE, "h1", "sbu", "00000", "running", run)
    catalog.set_shard_status(CAPFILT_STAGE, "h2", "cc3m", "00001", "done", run)
    return catalog


def test_shard_plan_gives_the_records_fields_and_the_stage_status(planned):
    plan = planned.shard_plan("cc3m", CAPFILT_STAGE, "h1")
    assert all(isinstance(p, PlannedShard) for p in plan)
    records = planned.shards("cc3m")
    assert [(p.source, p.shard, p.tar_path, p.samples_ok) for p in plan] == [
        (r.source, r.shard, str(r.tar_path), r.samples_ok) for r in records
    ]
    assert [p.status for p in plan] == ["done", "failed", "pending"]  # 00002: no status row
    statuses = {s.shard: s.status for s in planned.shard_statuses(CAPFILT_STAGE, "h1", "cc3m")}
    assert {p.shard: p.status for p in plan if p.status != "pending"} == statuses
    assert [p.status for p in planned.shard_plan("cc3m", CAPFILT_STAGE, "h2")] == [
        "pending",
        "done",
        "pending",
    ]


def test_shard_plan_over_all_sources_and_without_a_stage(planned):
    every = planned.shard_plan(stage=CAPFILT_STAGE, config_hash="h1")
    assert [(p.source, p.shard, p.status) for p in every] == [
        ("cc3m", "00000", "done"),
        ("cc3m", "00001", "failed"),
        ("cc3m", "00002", "pending"),
        ("sbu", "00000", "running"),
    ]
    assert {p.status for p in planned.shard_plan()} == {"pending"}
    assert [p.shard for p in planned.shard_plan("sbu")] == ["00000"]
    # Its not-done shards are pending_shards' answer.
    pending = [(p.source, p.shard) for p in every if p.status != "done"]
    assert pending == [(r.source, r.shard) for r in planned.pending_shards(CAPFILT_STAGE, "h1")]
    assert planned.shard_plan("nope") == []


def test_shard_plan_wants_stage_and_config_hash_together(planned):
    with pytest.raises(ValueError, match="both stage and config_hash"):
        planned.shard_plan("cc3m", CAPFILT_STAGE)
    with pytest.raises(ValueError, match="both stage and config_hash"):
        planned.shard_plan("cc3m", config_hash="h1")


def test_each_shard_record_keeps_its_own_failures(planned, shard_maker):
    """Failures of many shards are parsed in one go: each record still gets its shard's own dict."""
    records = planned.shards()
    assert [(r.source, r.shard) for r in records] == [
        ("cc3m", "00000"),
        ("cc3m", "00001"),
        ("cc3m", "00002"),
        ("sbu", "00000"),
    ]
    expected = shard_maker.expected_failures
    assert [r.failures for r in records] == [
        expected(),
        {},
        expected(shard_maker.samples[4:]),
        expected(),
    ]
    records[0].failures["http_404"] = -1
    assert records[3].failures == expected()
    assert [r.failures for r in planned.pending_shards(CAPFILT_STAGE, "h1")] == [
        {},
        expected(shard_maker.samples[4:]),
        expected(),
    ]
