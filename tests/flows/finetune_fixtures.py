"""A tiny data root for the fine-tuning and evaluation flow tests, built in seconds without training.

- a synthetic corpus (COCO-format caption splits, VQAv2-format questions, a retrieval split, 64 px images);
- the `tiny` preset with a (random, saved) open_clip image tower as `vision.pretrained`, and a tiny OPT;
- a WordPiece tokenizer trained on the corpus captions and questions;
- a finished stage-1 run and a stage-2 run started from it, recorded in the catalog as the training flows
  record them (checkpoint folders, blip2_config.json, job.json with the lineage).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from blip2_core.checkpoints import save_checkpoint
from blip2_core.config import config_to_dict, load_preset
from blip2_core.hf_interop import RUN_CONFIG_FILE
from data_catalog import Catalog
from data_catalog.layout import Layout
from data_catalog.synth import SynthConfig, load_corpus, synthesize
from flows.common import catalog_session

TINY_MODELS = Path(__file__).parents[1] / "blip2_core" / "tiny_models.py"


@dataclass(frozen=True)
class FinetuneHome:
    home: Path
    corpus: Path
    files: dict[str, Path]  # the corpus files (corpus.json "files")
    preset: Path
    tokenizer: Path
    stage1_run: str
    stage2_run: str


def _tiny_models():
    spec = importlib.util.spec_from_file_location("tiny_models_for_finetune", TINY_MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record_run(home: Path, stage: str, model: torch.nn.Module, config: dict, job: dict) -> tuple[str, Path]:
    layout = Layout(home)
    with catalog_session(layout) as cat:
        run_id = cat.start_run(stage, f"fixture-{stage}", {})
        run_dir = layout.run_dir(stage, run_id)
        ckpt = save_checkpoint(run_dir / "checkpoints", 1, model)
        (run_dir / RUN_CONFIG_FILE).write_text(json.dumps(config))
        (run_dir / "job.json").write_text(json.dumps(job))
        cat.record_checkpoint(run_id, 1, str(ckpt))
        cat.finish_run(run_id, "done", {})
    return run_id, ckpt


def build_finetune_home(root: Path) -> FinetuneHome:
    from blip2_core.stage1 import Blip2Stage1
    from blip2_core.stage2 import Blip2Stage2, load_stage1_weights
    from blip2_core.teachers import train_wordpiece
    from blip2_core.vision import create_clip

    corpus = root / "corpus"
    synthesize(
        corpus, SynthConfig(seed=5, n_pretrain=2, n_coco=30, n_vqa_images=10, n_retrieval=8, image_size=64)
    )
    info = load_corpus(corpus)
    torch.manual_seed(0)
    tower = root / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in create_clip("blip2-tiny-clip").state_dict().items()}, str(tower))
    llm = _tiny_models().save_tiny_llm("opt", root / "tiny-opt")
    raw = config_to_dict(load_preset("tiny"))
    raw["name"] = "tiny-test"
    raw["vision"]["pretrained"] = str(tower)
    raw["llm"]["name"] = str(llm)
    preset = root / "tiny-test.json"
    preset.write_text(json.dumps(raw))
    cfg = load_preset(preset)

    texts = []
    for key in ("coco_captions_train", "retrieval_test"):
        texts += [a["caption"] for a in json.loads(info.files[key].read_text())["annotations"]]
    texts += [q["question"] for q in json.loads(info.files["vqa_questions_train"].read_text())["questions"]]
    tokenizer = root / "wordpiece"
    train_wordpiece(texts, vocab_size=300).save_pretrained(tokenizer)

    home = root / "var"
    torch.manual_seed(1)
    stage1 = Blip2Stage1(cfg)
    stage1_run, stage1_ckpt = _record_run(home, "stage1", stage1, raw, {"tokenizer": str(tokenizer)})
    stage2 = Blip2Stage2(cfg)
    load_stage1_weights(stage2, stage1.state_dict())
    job2 = {"tokenizer": None, "stage1_checkpoint": str(stage1_ckpt)}
    stage2_run, _ = _record_run(home, "stage2", stage2, raw, job2)
    return FinetuneHome(home, corpus, dict(info.files), preset, tokenizer, stage1_run, stage2_run)


def shared_finetune_home(tmp_path_factory) -> FinetuneHome:
    """build_finetune_home once per test session (a marker file says it is complete)."""
    import shutil

    root = tmp_path_factory.getbasetemp() / "finetune-home"
    marker = root / "READY.json"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        built = build_finetune_home(root)
        marker.write_text(json.dumps({"stage1_run": built.stage1_run, "stage2_run": built.stage2_run}))
    runs = json.loads(marker.read_text())
    info = load_corpus(root / "corpus")
    return FinetuneHome(
        root / "var", root / "corpus", dict(info.files), root / "tiny-test.json", root / "wordpiece",
        runs["stage1_run"], runs["stage2_run"],
    )  # fmt: skip


def open_catalog(home: Path) -> Catalog:
    """The catalog under `home`, read-only, for a test's assertions."""
    return Catalog.open(Layout(home).catalog, read_only=True)
