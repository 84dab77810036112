"""The pretraining flows end to end on a tiny ingested corpus: stage 1, resume, stage 2, clear errors."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from data_catalog import Catalog
from data_catalog.corpus_server import CorpusServer
from data_catalog.layout import Layout
from data_catalog.synth import SynthConfig, synthesize, url_manifest
from flows.common import catalog_session
from flows.download import DownloadOptions
from flows.ingest import IngestParams, ingest_flow
from flows.train import Stage1Params, Stage2Params, resolve_sources, stage1_flow, stage2_flow

# In-process training runs in this process: one thread, as the other CPU tests (2 shared cores).
torch.set_num_threads(1)
TINY_MODELS = Path(__file__).parents[1] / "blip2_core" / "tiny_models.py"


def build_training_home(root: Path) -> tuple[Path, Path]:
    """64 synthetic images ingested as 2 shards of 32 under root/var, and a stage-1 WordPiece tokenizer."""
    from blip2_core.teachers import train_wordpiece

    corpus = root / "corpus"
    synthesize(
        corpus, SynthConfig(seed=3, n_pretrain=64, n_coco=2, n_vqa_images=2, n_retrieval=2, image_size=64)
    )
    home = root / "var"
    with CorpusServer(corpus) as srv:
        manifest = url_manifest(corpus, srv.base_url, "pretrain", out=root / "urls.parquet")
        options = DownloadOptions(image_size=64, samples_per_shard=32, processes=1, threads=8, timeout_s=5.0)
        params = IngestParams(
            source="synth", inputs=(manifest.path,), download=options, allow_loopback=True, home=home
        )
        ingest_flow(params)
    captions = pq.read_table(root / "urls.parquet", columns=["caption"]).column("caption").to_pylist()
    tokenizer = root / "wordpiece"
    train_wordpiece(captions, vocab_size=300).save_pretrained(tokenizer)
    return home, tokenizer


def shared_training_home(tmp_path_factory) -> tuple[Path, Path]:
    """build_training_home once per test session (a marker file says it is complete); tests copy it."""
    root = tmp_path_factory.getbasetemp() / "train-corpus"
    if not (root / "READY").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        build_training_home(root)
        (root / "READY").touch()
    return root / "var", root / "wordpiece"


def copy_home(src: Path, dst: Path) -> Path:
    """A private copy of a data root (the catalog's shard paths still point at the original tars)."""
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, prefect_harness):
    return shared_training_home(tmp_path_factory)


@pytest.fixture()
def home(ingested, tmp_path) -> Path:
    return copy_home(ingested[0], tmp_path / "var")


def stage1_params(home: Path, tokenizer: Path, **kw) -> Stage1Params:
    base = dict(
        preset="tiny", sources=("synth",), steps=10, batch_size=8, num_workers=0, log_every=2, ckpt_every=5,
        tokenizer=tokenizer, home=home,
    )  # fmt: skip
    return Stage1Params(**{**base, **kw})


def open_catalog(home: Path) -> Catalog:
    return Catalog.open(Layout(home).catalog, read_only=True)


def test_stage1_in_process_reaches_the_catalog(home, ingested):
    summary = stage1_flow(stage1_params(home, ingested[1]))

    assert (summary.step, summary.start_step, summary.resumed_from) == (10, 0, None)
    assert summary.sources == {"synth": 2}
    with open_catalog(home) as cat:
        run = cat.run(summary.run_id)
        losses = cat.metrics(summary.run_id, "loss")
        parts = {m.name for m in cat.metrics(summary.run_id)}
        checkpoints = cat.checkpoints(summary.run_id)
    assert run.status == "done" and run.stage == "stage1"
    assert run.summary["step"] == 10 and run.summary["config_hash"] == run.config_hash
    assert [m.step for m in losses] == [2, 4, 6, 8, 10]
    assert all(math.isfinite(m.value) and m.value > 0 for m in losses)
    assert {"loss_itc", "loss_itm", "loss_itg", "lr", "samples_per_s"} <= parts
    assert [c.step for c in checkpoints] == [5, 10]
    assert all((Path(c.path) / "model.safetensors").is_file() for c in checkpoints)
    assert summary.last_checkpoint == checkpoints[-1].path

    run_dir = Layout(home).run_dir("stage1", summary.run_id)
    assert summary.run_dir == run_dir
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["name"] == "tiny" and config["params"]["steps"] == 10
    assert config["job"]["batch_size"] == 8
    # export-hf finds the model config two folders above a checkpoint
    from blip2_core.hf_interop import find_run_config

    assert find_run_config(Path(summary.last_checkpoint)) == run_dir / "blip2_config.json"
    assert json.loads((run_dir / "blip2_config.json").read_text()) == config["config"]
    assert any((run_dir / "tb").iterdir())
    assert "step 10/10" in (run_dir / "log").read_text()
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "result" and events[-1]["step"] == 10


def test_resume_continues_the_latest_run_with_the_same_config(home, ingested):
    first = stage1_flow(stage1_params(home, ingested[1], steps=6, ckpt_every=3))
    second = stage1_flow(stage1_params(home, ingested[1], steps=10, ckpt_every=3))

    assert second.run_id != first.run_id and second.config_hash == first.config_hash
    assert (second.resumed_from_run, second.start_step, second.step) == (first.run_id, 6, 10)
    assert Path(second.resumed_from).name == "step-000006"
    assert Path(second.resumed_from).parent == second.run_dir / "checkpoints"
    with open_catalog(home) as cat:
        steps = [m.step for m in cat.metrics(second.run_id, "loss")]
        checkpoints = [c.step for c in cat.checkpoints(second.run_id)]
        runs = cat.runs("stage1")
    assert steps == [8, 10]  # the step count continues; steps 1-6 belong to the first run
    assert checkpoints == [6, 9, 10]  # the earlier checkpoint it started from, then its own
    assert {r.run_id: r.status for r in runs} == {first.run_id: "done", second.run_id: "done"}
    assert runs[-1].params["resumes"] == first.run_id

    # The same parameters again: the finished run is the result, no new run (stages after it keep their
    # inputs, so the pipeline re-run on a finished home trains nothing).
    again = stage1_flow(stage1_params(home, ingested[1], steps=10, ckpt_every=3))
    assert again == second
    with open_catalog(home) as cat:
        assert [r.run_id for r in cat.runs("stage1")] == [first.run_id, second.run_id]

    # resume=False starts over in a new run; a run with another config cannot be continued.
    fresh = stage1_flow(stage1_params(home, ingested[1], steps=2, resume=False, log_every=1))
    assert (fresh.start_step, fresh.resumed_from_run, fresh.step) == (0, None, 2)

    # A run killed mid-way stays 'running' in the catalog; continuing it closes it as failed.
    with catalog_session(Layout(home)) as cat:
        killed = cat.start_run("stage1", first.config_hash, {})
    shutil.copytree(
        second.last_checkpoint, Layout(home).run_dir("stage1", killed) / "checkpoints" / "step-000010"
    )
    third = stage1_flow(stage1_params(home, ingested[1], steps=12))
    assert (third.resumed_from_run, third.start_step, third.step) == (killed, 10, 12)
    with open_catalog(home) as cat:
        closed = cat.run(killed)
    assert closed.status == "failed" and "interrupted" in closed.summary["error"]
    with pytest.raises(ValueError, match="config hash"):
        stage1_flow(stage1_params(home, ingested[1], steps=12, seed=5, run_id=first.run_id))


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("tiny_models", TINY_MODELS)
    tiny_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_models)
    return tiny_models.save_tiny_llm("opt", tmp_path_factory.mktemp("tiny-opt"))


def test_stage2_starts_from_the_stage1_run(home, ingested, tiny_opt):
    stage1 = stage1_flow(stage1_params(home, ingested[1], steps=4, ckpt_every=2))
    params = Stage2Params(
        preset="tiny", sources=("synth",), stage1_run=stage1.run_id, llm=tiny_opt, steps=3, batch_size=8,
        lr=1e-9, warmup_steps=0, num_workers=0, log_every=1, home=home,
    )  # fmt: skip
    summary = stage2_flow(params)

    assert summary.step == 3 and summary.stage == "stage2"
    with open_catalog(home) as cat:
        run = cat.run(summary.run_id)
        losses = cat.metrics(summary.run_id, "loss")
    assert run.status == "done" and [m.step for m in losses] == [1, 2, 3]
    assert all(math.isfinite(m.value) for m in losses)
    job = json.loads((summary.run_dir / "job.json").read_text())
    assert job["stage1_checkpoint"] == stage1.last_checkpoint
    # lr 1e-9: three steps move no weight by more than ~3e-9, so the stage-2 Q-Former is stage 1's.
    before = load_file(Path(stage1.last_checkpoint) / "model.safetensors")
    after = load_file(Path(summary.last_checkpoint) / "model.safetensors")
    for key in (
        "qformer.query_tokens",
        "ln_vision.weight",
        "qformer.encoder.layer.0.crossattention.attention.query.weight",
    ):
        if key in after:
            assert (after[key] - before[key]).abs().max() < 1e-6, key
    assert "qformer.query_tokens" in after and "itm_head.weight" not in after
    assert any(k.startswith("bridge.") for k in after)  # the projection to the LLM trains too

    with pytest.raises(ValueError, match="not a run"):
        stage2_flow(params.model_copy(update={"stage1_run": "stage1-nope"}))
    with pytest.raises(ValueError, match="not a stage-1 run"):
        stage2_flow(params.model_copy(update={"stage1_run": summary.run_id}))


def test_stage2_without_stage1_starts_from_a_fresh_qformer(home, ingested, tiny_opt):
    """The Figure 5 ablation: stage 2 with `stage1_run=None` trains a Q-Former that stage 1 never saw."""
    with pytest.raises(ValueError, match="stage1_run"):  # the ablation must be asked for explicitly
        Stage2Params(preset="tiny", sources=("synth",), llm=tiny_opt, home=home)
    params = Stage2Params(
        preset="tiny", sources=("synth",), stage1_run=None, llm=tiny_opt, steps=2, batch_size=8,
        warmup_steps=0, num_workers=0, log_every=1, home=home,
    )  # fmt: skip
    summary = stage2_flow(params)

    assert summary.step == 2
    job = json.loads((summary.run_dir / "job.json").read_text())
    assert job["stage1_checkpoint"] is None
    with open_catalog(home) as cat:
        assert cat.run(summary.run_id).status == "done"
        assert all(math.isfinite(m.value) for m in cat.metrics(summary.run_id, "loss"))
    weights = load_file(Path(summary.last_checkpoint) / "model.safetensors")
    assert "qformer.query_tokens" in weights and any(k.startswith("bridge.") for k in weights)


def test_clear_errors_for_unknown_source_and_no_shards(home, ingested):
    with pytest.raises(ValueError, match="unknown source 'nosuch'"):
        stage1_flow(stage1_params(home, ingested[1], sources=("nosuch",)))
    with catalog_session(Layout(home)) as cat:
        cat.upsert_source("empty", "manifest", str(home / "manifests" / "empty"), 0, {})
    with pytest.raises(ValueError, match="'empty' has no registered shards"):
        stage1_flow(stage1_params(home, ingested[1], sources=("empty",)))
    with pytest.raises(ValueError, match="no registered shard '00009'"):
        stage1_flow(stage1_params(home, ingested[1], sources=[{"name": "synth", "shards": ["00009"]}]))
    with pytest.raises(ValueError, match="multiple of nproc"):
        stage1_flow(stage1_params(home, ingested[1], batch_size=7, grad_accum=2))
    with open_catalog(home) as cat:
        assert cat.runs("stage1") == []  # refused before any run was recorded


def test_capfilt_sidecars_only_for_done_shards(home, ingested):
    layout = Layout(home)
    with catalog_session(layout) as cat:
        run = cat.start_run("capfilt", "h1", {})
        for shard, status in (("00000", "done"), ("00001", "failed")):
            cat.set_shard_status("capfilt", "h1", "synth", shard, status, run)
        layout.capfilt(("h1"), "synth").mkdir(parents=True)
        layout.capfilt_sidecar("h1", "synth", "00000").write_bytes(b"")  # existence is what counts here

        jobs, counts = resolve_sources(cat, layout, stage1_params(home, ingested[1], capfilt="h1"))
        assert [(j.name, [Path(s).name for s in j.shards], j.sidecar_dir) for j in jobs] == [
            ("synth", ["00000.tar"], str(layout.capfilt("h1", "synth"))),
            ("synth.web", ["00001.tar"], None),
        ]
        assert sum(j.weight for j in jobs) == pytest.approx(1.0)
        assert counts == {"capfilt_shards": 1, "web_caption_shards": 1, "skipped_shards": 0}

        params = stage1_params(home, ingested[1], capfilt="h1", capfilt_missing="skip")
        jobs, counts = resolve_sources(cat, layout, params)
        assert [j.name for j in jobs] == ["synth"] and counts["skipped_shards"] == 1
        with pytest.raises(ValueError, match="no shard has CapFilt output"):
            resolve_sources(cat, layout, stage1_params(home, ingested[1], capfilt="nohash"))


def test_cli_train_stage1(home, ingested, capsys):
    from flows.cli import _train_sources, build_parser, main

    args = build_parser().parse_args(
        ["train", "stage1", "--source", "synth:2", "--source", "coco", "--shards", "synth=00000,00001"]
    )
    assert _train_sources(args) == [
        {"name": "synth", "weight": 2.0, "shards": ["00000", "00001"]},
        {"name": "coco"},
    ]

    base = ["train", "stage1", "--tokenizer", str(ingested[1]), "--home", str(home), "--num-workers", "0"]
    assert main([*base, "--source", "nosuch"]) == 1
    assert "unknown source 'nosuch'" in capsys.readouterr().err
    code = main([*base, "--source", "synth", "--steps", "2", "--batch-size", "8", "--log-every", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "step 2/2" in out and "loss_itc" in out
    with open_catalog(home) as cat:
        (run,) = cat.runs("stage1")
    assert run.status == "done" and run.run_id in out
