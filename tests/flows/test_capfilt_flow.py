"""The capfilt flow: shard batches as tasks, catalog statuses, cache hits, faults, a SIGKILLed CLI run.

Shards come from the synthetic corpus ingested with img2dataset for real (60 images, 3 shards of 20);
the models are the tiny random BLIP captioner and open_clip ranker of tests/blip2_core/capfilt_fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import flows.capfilt as fc
from data_catalog import CAPFILT_STAGE, Catalog
from data_catalog.corpus_server import CorpusServer
from data_catalog.layout import Layout
from data_catalog.synth import SynthConfig, synthesize, url_manifest
from flows.capfilt import CapFiltParams, RankerParams, capfilt_flow
from flows.cli import main
from flows.download import DownloadOptions
from flows.ingest import IngestParams, ingest_flow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "blip2_core"))
import capfilt_fixtures as fx  # noqa: E402

torch.set_num_threads(1)  # two shared cores: more threads only spin against each other
SOURCE = "web"
SHARDS = ["00000", "00001", "00002"]
_TEMPLATE: dict[str, Path] = {}  # session-wide, shared with test_capfilt_ray.py


def tiny_models(tmp_path_factory) -> Path:
    """The tiny captioner and ranker, saved once per session."""
    if "models" not in _TEMPLATE:
        root = tmp_path_factory.mktemp("capfilt-models")
        fx.save_captioner(root / "captioner")
        fx.save_ranker(root / "ranker")
        _TEMPLATE["models"] = root
    return _TEMPLATE["models"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_models(tmp_path_factory)


def ingested_template(tmp_path_factory) -> Path:
    """A home with 60 synthetic images ingested by img2dataset into 3 shards of 20, once per session
    (test_capfilt_ray.py shares it through this module's cache)."""
    if "home" in _TEMPLATE:
        return _TEMPLATE["home"]
    corpus = tmp_path_factory.mktemp("corpus")
    synthesize(corpus, SynthConfig(seed=5, n_pretrain=60, n_coco=0, n_vqa_images=0, n_retrieval=0))
    home = tmp_path_factory.mktemp("template") / "var"
    options = DownloadOptions(image_size=64, samples_per_shard=20, processes=1, threads=8, timeout_s=5.0)
    with CorpusServer(corpus) as srv:
        manifest = url_manifest(corpus, srv.base_url, "pretrain", out=corpus.parent / "urls.parquet")
        summary = ingest_flow(
            IngestParams(
                source=SOURCE, inputs=(manifest.path,), download=options, allow_loopback=True, home=home
            )
        )
    assert (summary.shards, summary.samples_ok) == (3, 60)
    _TEMPLATE["home"] = home
    return home


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, prefect_harness) -> Path:
    return ingested_template(tmp_path_factory)


def copy_home(template: Path, home: Path, shards: list[str] = SHARDS) -> Path:
    """A fresh home holding copies of the template's shards, registered in a new catalog."""
    src_dir, dst_dir = Layout(template).shards(SOURCE), Layout(home).shards(SOURCE)
    dst_dir.mkdir(parents=True)
    for shard in shards:
        for suffix in (".tar", ".parquet", "_stats.json"):
            shutil.copy(src_dir / f"{shard}{suffix}", dst_dir / f"{shard}{suffix}")
    with Catalog.open(Layout(home).catalog) as cat:
        cat.upsert_source(SOURCE, "parquet", str(Layout(home).manifests(SOURCE)), 20 * len(shards), {})
        for shard in shards:
            cat.register_img2dataset_shard(SOURCE, dst_dir / f"{shard}.tar")
    return home


@pytest.fixture()
def home(ingested, tmp_path) -> Path:
    return copy_home(ingested, tmp_path / "var")


def make_params(model_dir: Path, home: Path, **overrides) -> CapFiltParams:
    ranker = RankerParams(
        model="capfilt-tiny-clip",
        weights=model_dir / "ranker" / "capfilt-tiny-clip.safetensors",
        config=model_dir / "ranker" / "capfilt-tiny-clip.json",
    )
    base = dict(
        sources=(SOURCE,),
        captioner=model_dir / "captioner",
        ranker=ranker,
        batch_size=8,
        device="cpu",
        home=home,
    )
    return CapFiltParams(**{**base, **overrides})


def tar_keys(tar_path: Path) -> set[str]:
    with tarfile.open(tar_path) as tf:
        return {m.name.split(".", 1)[0] for m in tf if m.isfile()}


def statuses(home: Path, chash: str) -> dict[str, tuple[str, str | None]]:
    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        return {s.shard: (s.status, s.error) for s in cat.shard_statuses(CAPFILT_STAGE, chash, SOURCE)}


def sidecars(home: Path, chash: str) -> dict[str, Path]:
    return {p.stem: p for p in sorted(Layout(home).capfilt(chash, SOURCE).glob("*.parquet"))}


def assert_done_shards_have_one_complete_sidecar(home: Path, chash: str) -> list[str]:
    """Every 'done' shard has exactly one sidecar, whose keys are the tar's keys; no temporaries remain."""
    folder = Layout(home).capfilt(chash, SOURCE)
    assert not list(folder.glob(".tmp-*"))
    done = [shard for shard, (status, _) in statuses(home, chash).items() if status == "done"]
    files = sidecars(home, chash)
    for shard in done:
        assert len(list(folder.glob(f"{shard}*.parquet"))) == 1
        keys = pq.read_table(files[shard], columns=["key"]).column("key").to_pylist()
        assert len(keys) == len(set(keys))
        assert set(keys) == tar_keys(Layout(home).shards(SOURCE) / f"{shard}.tar")
    return done


def flow_artifacts(home: Path, run_id: str) -> dict[str, list]:
    """type -> the artifacts the flow run behind a catalog run published (progress, table)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        flow_run_id = cat.run(run_id).flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_type: dict[str, list] = {}
    for a in found:
        by_type.setdefault(a.type, []).append(a)
    return by_type


def task_run_names(home: Path, run_id: str) -> list[str]:
    """The Prefect task runs of the flow run behind a catalog run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        flow_run_id = cat.run(run_id).flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(r.name for r in runs)


# --- pure helpers ----------------------------------------------------------------------------------


def test_shard_batches_bound_the_number_of_task_runs():
    items = [{"source": "s", "shard": f"{i:05d}"} for i in range(13_000)]
    batches = fc.shard_batches(items, 8)
    assert len(batches) == 1625  # 13k shards -> low thousands of task runs
    assert [i for b in batches for i in b] == items
    assert fc.batch_label(batches[1]) == "s-00008-to-00015"


def test_shard_choice_names_one_source_or_every_source():
    chosen = fc.parse_shard_choice(("00001", "b/00007"), ("a", "b"))
    assert chosen == {"a": {"00001"}, "b": {"00001", "00007"}}
    with pytest.raises(ValueError, match="not among"):
        fc.parse_shard_choice(("c/00001",), ("a", "b"))


def test_params_forbid_unknown_fields_and_default_to_the_papers_sampling(model_dir, tmp_path):
    params = make_params(model_dir, tmp_path)
    cfg = fc.capfilt_config(params, "cpu")
    assert (cfg.num_captions, cfg.top_p, cfg.repetition_penalty, cfg.max_length, cfg.keep_top) == (
        10,
        0.9,
        1.1,
        30,
        2,
    )
    assert cfg.prompt == "a picture of "
    with pytest.raises(ValueError, match="extra"):
        make_params(model_dir, tmp_path, batchsize=4)
    assert fc.config_from_dict(fc.config_to_dict(cfg)) == cfg


def test_task_fn_records_an_unreadable_shard_and_loads_models_once(model_dir, home, monkeypatch):
    loads = []
    monkeypatch.setattr(fc, "_MODELS", {})
    real_load = fc.load_capfilt_models
    monkeypatch.setattr(fc, "load_capfilt_models", lambda cfg: loads.append(1) or real_load(cfg))
    cfg = fc.config_to_dict(fc.capfilt_config(make_params(model_dir, home), "cpu"))
    shard_dir = Layout(home).shards(SOURCE)
    (shard_dir / "00001.tar").write_bytes(b"not a tar")
    items = [
        {
            "source": SOURCE,
            "shard": s,
            "tar": str(shard_dir / f"{s}.tar"),
            "out": str(home / "out" / f"{s}.pq"),
        }
        for s in ("00000", "00001")
    ]
    first = fc.capfilt_shards.fn(items, cfg, "label")
    second = fc.capfilt_shards.fn(items[:1], cfg, "label")
    assert [r["status"] for r in first + second] == ["done", "failed", "done"]
    assert "not a readable tar" in first[1]["error"]
    assert first[0]["n_ok"] == 20 and 0.0 <= first[0]["web_kept_share"] <= 1.0
    assert sorted(p.name for p in (home / "out").iterdir()) == ["00000.pq"]
    assert loads == [1]  # two batches, one model load in this process


# --- the flow --------------------------------------------------------------------------------------


def test_corrupt_shard_fails_alone_and_a_rerun_does_nothing_new(model_dir, home):
    tar = Layout(home).shards(SOURCE) / "00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # truncated after registration
    params = make_params(model_dir, home, shards_per_task=2)

    first = capfilt_flow(params)
    chash = first.config_hash
    assert (first.shards_done, first.shards_skipped, first.shards_failed) == (2, 0, 1)
    assert first.task_runs == 2  # 3 shards, 2 per task
    assert task_run_names(home, first.run_id) == ["capfilt-web-00000-to-00001", "capfilt-web-00002"]
    assert list(first.failed_shards) == ["web/00001"]
    assert "not a readable tar" in first.failed_shards["web/00001"]
    assert (first.samples_ok, first.samples_failed) == (40, 0)
    assert 0.0 <= first.web_kept_share <= 1.0
    state = statuses(home, chash)
    assert "not a readable tar" in state["00001"][1]
    assert {s: st for s, (st, _) in state.items()} == {"00000": "done", "00001": "failed", "00002": "done"}
    assert assert_done_shards_have_one_complete_sidecar(home, chash) == ["00000", "00002"]
    assert sorted(sidecars(home, chash)) == ["00000", "00002"]
    assert first.score_stats["samples"] == 40
    assert first.score_stats["top1_p10"] <= first.score_stats["top1_median"] <= first.score_stats["top1_p90"]
    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        run = cat.run(first.run_id)
    assert run.status == "done" and run.summary["shards_failed"] == 1
    artifacts = flow_artifacts(home, first.run_id)
    assert [a.data for a in artifacts["progress"]] == [100.0]  # updated as the batches came back
    (table,) = artifacts["table"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["source"] for r in rows] == ["web", "all done shards of the config"]
    assert (rows[0]["done (this run)"], rows[0]["failed"], rows[0]["samples"]) == (2, 1, 40)
    assert "web/00001" in table.description

    mtimes = {s: p.stat().st_mtime_ns for s, p in sidecars(home, chash).items()}
    again = capfilt_flow(params)
    assert again.config_hash == chash
    assert (again.shards_done, again.shards_skipped, again.shards_failed) == (0, 2, 1)  # still corrupt
    assert {s: p.stat().st_mtime_ns for s, p in sidecars(home, chash).items()} == mtimes
    assert statuses(home, chash)["00001"][0] == "failed"


def test_explicit_shards_and_force_recompute_the_same_sidecars(model_dir, ingested, tmp_path):
    home = copy_home(ingested, tmp_path / "var", SHARDS[:2])
    params = make_params(model_dir, home, shards_per_task=2)
    first = capfilt_flow(params)
    chash = first.config_hash
    before = {s: pq.read_table(p) for s, p in sidecars(home, chash).items()}
    inodes = {s: p.stat().st_ino for s, p in sidecars(home, chash).items()}

    chosen = capfilt_flow(params.model_copy(update={"shards": ("00001",)}))
    assert (chosen.shards_done, chosen.shards_skipped, chosen.shards_failed) == (1, 0, 0)
    now = {s: p.stat().st_ino for s, p in sidecars(home, chash).items()}
    assert now["00000"] == inodes["00000"]
    assert now["00001"] != inodes["00001"]  # rewritten (atomic rename of a new file)

    forced = capfilt_flow(params.model_copy(update={"force": True}))
    assert (forced.shards_done, forced.shards_skipped) == (2, 0)
    after = {s: pq.read_table(p) for s, p in sidecars(home, chash).items()}
    assert list(after) == SHARDS[:2]
    assert all(after[s].equals(before[s]) for s in after)  # same config: same captions and scores
    assert assert_done_shards_have_one_complete_sidecar(home, chash) == SHARDS[:2]


def test_unknown_source_or_shard_is_a_clear_error(model_dir, home):
    with pytest.raises(Exception, match="no registered shards"):
        capfilt_flow(make_params(model_dir, home, sources=("nope",)))
    with pytest.raises(Exception, match=r"no shard\(s\) \['00009'\]"):
        capfilt_flow(make_params(model_dir, home, shards=("00009",)))


# --- the command line, killed and resumed ----------------------------------------------------------


def cli_args(model_dir: Path) -> list[str]:
    return [
        "--source",
        SOURCE,
        "--captioner",
        str(model_dir / "captioner"),
        "--ranker-model",
        "capfilt-tiny-clip",
        "--ranker-weights",
        str(model_dir / "ranker" / "capfilt-tiny-clip.safetensors"),
        "--ranker-config",
        str(model_dir / "ranker" / "capfilt-tiny-clip.json"),
        "--device",
        "cpu",
        "--shards-per-task",
        "1",
        # Slow the tiny models down (small batches, long captions: ~5 s a shard) so the kill lands mid-shard.
        "--batch-size",
        "4",
        "--min-length",
        "40",
        "--max-length",
        "60",
    ]


def cli_env(home: Path) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    # The harness's API server: the CLI need not start an ephemeral one of its own (30 s on a busy machine).
    return dict(
        os.environ, BLIP2_HOME=str(home), OMP_NUM_THREADS="1", PREFECT_API_URL=PREFECT_API_URL.value()
    )


@pytest.mark.slow  # a second interpreter start-up: ~30-40 s on the 2 shared cores
def test_sigkilled_cli_run_resumes_to_exactly_one_sidecar_per_shard(model_dir, home, prefect_harness, capsys):
    folder_root = Layout(home).capfilt_root
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "capfilt", *cli_args(model_dir)],
        env=cli_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(folder_root.glob("*/*/*.parquet")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # no goodbye, with the next shard in flight
    proc.wait()
    (folder,) = [p for p in folder_root.glob("*/*") if p.is_dir()]
    chash = folder.parent.name
    killed = statuses(home, chash)
    complete = sidecars(home, chash)
    assert 1 <= len(complete) < 3
    for path in complete.values():  # whatever is there is whole
        assert pq.read_table(path).num_rows == 20
    assert all(status != "done" for s, (status, _) in killed.items() if s not in complete)

    # The re-run goes through the same command line, in this process (no second interpreter start-up).
    assert main(["capfilt", *cli_args(model_dir), "--home", str(home)]) == 0
    out = capsys.readouterr().out
    done_before = sum(1 for status, _ in killed.values() if status == "done")
    assert f"{3 - done_before} shards done, {done_before} skipped (already done), 0 failed" in out
    assert f"{20 * (3 - done_before)} samples captioned" in out
    assert "web caption kept in the top 2:" in out
    assert assert_done_shards_have_one_complete_sidecar(home, chash) == SHARDS
