"""The capfilt flow on Ray: a local CPU instance (loopback only), two model-holding actors, tiny shards."""

from __future__ import annotations

import tempfile
import time

import pyarrow.parquet as pq
import pytest
from test_capfilt_flow import (
    SHARDS,
    assert_done_shards_have_one_complete_sidecar,
    copy_home,
    ingested_template,
    make_params,
    sidecars,
    statuses,
    task_run_names,
    tiny_models,
)

import flows.capfilt as fc
from data_catalog.layout import Layout
from flows.capfilt import capfilt_flow
from flows.ray_capfilt import start_local_ray

ray = pytest.importorskip("ray")


def _refuse_in_driver(cfg):
    raise AssertionError("the ray engine loaded models in the flow process")


@pytest.fixture()
def local_ray():
    """A 2-CPU Ray instance on this machine, started and stopped by the test."""
    # Ray's socket paths must stay short (AF_UNIX limit), hence a temp dir of its own under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="ray-capfilt-", dir="/tmp")
    start = time.monotonic()
    start_local_ray(num_cpus=2, object_store_memory=80 * 2**20, _temp_dir=temp_dir)  # the flow's setting
    print(f"ray.init: {time.monotonic() - start:.1f} s")
    try:
        yield
    finally:
        ray.shutdown()
    assert not ray.is_initialized()


@pytest.mark.slow  # Ray start-up (~9-14 s) and actor start-up (~30 s) on the 2 shared cores
def test_ray_engine_runs_batches_on_actors_and_matches_the_local_engine(
    tmp_path_factory, tmp_path, prefect_harness, local_ray, monkeypatch
):
    model_dir = tiny_models(tmp_path_factory)
    home = copy_home(ingested_template(tmp_path_factory), tmp_path / "var", SHARDS[:2])
    params = make_params(model_dir, home, engine="ray", num_workers=2, shards_per_task=1)

    # Every batch must run on an actor: in this (driver) process, loading models fails.
    monkeypatch.setattr(fc, "_MODELS", {})
    monkeypatch.setattr(fc, "load_capfilt_models", _refuse_in_driver)
    start = time.monotonic()
    summary = capfilt_flow(params)
    print(f"ray capfilt flow, 2 shards of 20 on 2 CPU actors: {time.monotonic() - start:.1f} s")
    chash = summary.config_hash
    assert (summary.engine, summary.shards_done, summary.shards_failed, summary.samples_ok) == (
        "ray",
        2,
        0,
        40,
    )
    assert task_run_names(home, summary.run_id) == ["capfilt-web-00000", "capfilt-web-00001"]
    assert {s: st for s, (st, _) in statuses(home, chash).items()} == {"00000": "done", "00001": "done"}
    assert assert_done_shards_have_one_complete_sidecar(home, chash) == SHARDS[:2]
    assert ray.is_initialized()  # the flow joined the test's instance and left it running
    monkeypatch.undo()

    # The same config on the local engine reproduces the actors' sidecars exactly.
    ray_tables = {s: pq.read_table(p) for s, p in sidecars(home, chash).items()}
    local = capfilt_flow(params.model_copy(update={"engine": "local", "force": True}))
    assert local.config_hash == chash
    for shard, table in ray_tables.items():
        assert pq.read_table(Layout(home).capfilt_sidecar(chash, "web", shard)).equals(table)
