"""Faults during CapFilt: the run SIGKILLed at a seeded random point, a full disk under the sidecars, a
sidecar damaged after it was recorded done, a contending catalog writer. After each, a re-run completes
with exactly one whole sidecar per shard, and no finished sidecar is lost or rewritten."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from faultkit import Killer, contender, rng, sha256, small_disk
from test_capfilt_flow import (
    SHARDS,
    assert_done_shards_have_one_complete_sidecar,
    cli_args,
    cli_env,
    copy_home,
    ingested_template,
    make_params,
    sidecars,
    statuses,
    tiny_models,
)

from data_catalog import Catalog
from data_catalog.layout import Layout
from flows.capfilt import SamplingParams, capfilt_flow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_models(tmp_path_factory)


@pytest.fixture()
def home(tmp_path_factory, tmp_path, prefect_harness):
    return copy_home(ingested_template(tmp_path_factory), tmp_path / "var")


def capfilt_runs(home) -> list[str]:
    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        return [r.status for r in cat.runs("capfilt")]


def test_killed_run_then_a_rerun_against_a_contending_writer(model_dir, home):
    r = rng("capfilt-sigkill")
    root = Layout(home).capfilt_root
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "capfilt", *cli_args(model_dir)],
        env=cli_env(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill once 1 or 2 sidecars exist (seeded), a seeded moment later: mid-shard or between shards.
    after = r.randint(1, len(SHARDS) - 1)
    killer = Killer(
        ready=lambda: proc.poll() is not None or len(list(root.glob("*/*/*.parquet"))) >= after,
        target=lambda: proc.pid if proc.poll() is None else None,
        delay=r.uniform(0.0, 2.0),
    )
    killer.run()  # in this thread: nothing else to do meanwhile
    proc.wait()
    assert killer.killed == proc.pid, "the run ended before the kill"
    (folder,) = [p for p in root.glob("*/*") if p.is_dir()]
    chash = folder.parent.name
    before = {s: sha256(p) for s, p in sidecars(home, chash).items()}
    done_before = [s for s, (st, _) in statuses(home, chash).items() if st == "done"]
    assert set(done_before) <= set(before)  # a shard is 'done' only once its sidecar is in place

    with contender(Layout(home).catalog) as held:
        start = held()
        # The killed command line's parameters (cli_args): the same config hash.
        sampling = SamplingParams(min_length=40, max_length=60)
        summary = capfilt_flow(
            make_params(model_dir, home, shards_per_task=1, batch_size=4, sampling=sampling)
        )
        assert held() > start, "the contender never took the catalog while the flow ran"
    assert summary.config_hash == chash
    # The re-run computes what was not done, and leaves every done sidecar byte for byte as it was.
    assert (summary.shards_done, summary.shards_skipped) == (len(SHARDS) - len(done_before), len(done_before))
    after_rerun = {s: sha256(p) for s, p in sidecars(home, summary.config_hash).items()}
    for shard in done_before:
        assert after_rerun[shard] == before[shard]
    assert assert_done_shards_have_one_complete_sidecar(home, summary.config_hash) == SHARDS
    assert capfilt_runs(home)[-1] == "done" and "running" not in capfilt_runs(home)[-1:]


def test_full_disk_then_a_damaged_sidecar(model_dir, home):
    r = rng("capfilt-disk")
    params = make_params(model_dir, home, shards_per_task=1)
    with small_disk(Layout(home).capfilt_root, size_kb=24) as grow:
        first = capfilt_flow(params)
        chash = first.config_hash
        assert first.shards_failed >= 1, "the small disk held every sidecar: the fault did not happen"
        assert all("No space left" in e for e in first.failed_shards.values())
        assert_done_shards_have_one_complete_sidecar(home, chash)  # no temporary left, done ones whole

        grow(16_384)
        second = capfilt_flow(params)
        assert (second.shards_done, second.shards_failed) == (first.shards_failed, 0)
        assert assert_done_shards_have_one_complete_sidecar(home, chash) == SHARDS

        victim = r.choice(SHARDS)
        path = sidecars(home, chash)[victim]
        original = pq.read_table(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short, still 'done'
        third = capfilt_flow(params)
        assert (third.shards_done, third.shards_skipped) == (1, len(SHARDS) - 1)
        assert pq.read_table(path).equals(original)  # recomputed: same config, same captions
        assert assert_done_shards_have_one_complete_sidecar(home, chash) == SHARDS
    assert capfilt_runs(home) == ["done", "done", "done"]
