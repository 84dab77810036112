"""The fine-tuning flows on the tiny preset: a few steps per task from catalog runs, into the catalog."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from finetune_fixtures import open_catalog
from safetensors.torch import load_file

from flows.evaluate import EvaluateParams, evaluate_flow
from flows.finetune import FinetuneParams, finetune_flow

torch.set_num_threads(1)


def params(built, home: Path, task: str, **kw) -> FinetuneParams:
    files = built.files
    data = {
        "caption": {"annotations": (files["coco_captions_train"],), "images": (built.corpus,)},
        "retrieval": {"annotations": (files["coco_captions_train"],), "images": (built.corpus,)},
        "vqa": {
            "annotations": (files["vqa_annotations_train"],),
            "questions": (files["vqa_questions_train"],),
            "images": (built.corpus / "images" / "vqa_train",),
            "image_pattern": "{image_id:07d}.jpg",
        },
    }[task]
    start = built.stage1_run if task == "retrieval" else built.stage2_run
    base = dict(task=task, start_run=start, steps=3, batch_size=4, lr=1e-4, warmup_steps=1, image_size=72,
                num_workers=0, log_every=1, ckpt_every=3, home=home)  # fmt: skip
    return FinetuneParams(**{**base, **data, **kw})


def _tower_moved(start: dict, after: dict) -> bool:
    return any(k.startswith("visual_encoder.") for k in after) and not any(
        k.startswith("visual_encoder.") for k in start
    )


def test_caption_finetune_trains_the_tower_at_a_new_size(built, home):
    summary = finetune_flow(params(built, home, "caption"))

    assert (summary.step, summary.steps, summary.image_size, summary.stage) == (3, 3, 72, "finetune-caption")
    assert summary.records == 24 * 5  # 24 training images (80% of 30), 5 captions each
    with open_catalog(home) as cat:
        run = cat.run(summary.run_id)
        losses = cat.metrics(summary.run_id, "loss")
        checkpoints = cat.checkpoints(summary.run_id)
    assert run.status == "done" and run.stage == "finetune-caption"
    assert [m.step for m in losses] == [1, 2, 3] and all(math.isfinite(m.value) for m in losses)
    assert [c.step for c in checkpoints] == [3]
    weights = load_file(Path(summary.last_checkpoint) / "model.safetensors")
    # The image tower is trained (saved with the checkpoint), at 72 px: a 9 x 9 patch grid + CLS.
    assert weights["visual_encoder.visual.positional_embedding"].shape == (82, 64)
    assert "bridge.llm_projection.weight" in weights and "itm_head.weight" not in weights
    config = json.loads((summary.run_dir / "blip2_config.json").read_text())
    assert config["vision"]["image_size"] == 72 and config["vision"]["freeze"] is False
    assert config["llm"]["prompt"] == "a photo of "


def test_vqa_finetune_feeds_the_question_to_the_qformer(built, home):
    summary = finetune_flow(params(built, home, "vqa", image_size=64))

    assert summary.step == 3 and summary.records == 8 * 5  # 8 training images, 5 questions each
    weights = load_file(Path(summary.last_checkpoint) / "model.safetensors")
    # The Q-Former keeps its text branch (from the stage-1 checkpoint the stage-2 run started from).
    assert "qformer.embeddings.word_embeddings.weight" in weights
    assert "qformer.encoder.layer.0.intermediate.dense.weight" in weights
    stage1 = load_file(
        Path(json.loads((summary.run_dir / "job.json").read_text())["start_files"][0]) / "model.safetensors"
    )
    moved = (
        weights["qformer.embeddings.word_embeddings.weight"]
        - stage1["qformer.embeddings.word_embeddings.weight"]
    )
    assert moved.abs().max() > 0  # question tokens reached the loss: their embeddings got gradients
    job = json.loads((summary.run_dir / "job.json").read_text())
    assert Path(job["tokenizer"]) == built.tokenizer.resolve()  # found through the runs' lineage

    # The fine-tuned model answers with the question in its Q-Former (tokenizer from the run's job.json).
    files = built.files
    evaluated = evaluate_flow(EvaluateParams(
        task="vqa", annotations=files["vqa_annotations_val"], questions=files["vqa_questions_val"],
        checkpoint=summary.run_id, images=built.corpus / "images" / "vqa_val",
        image_pattern="{image_id:07d}.jpg", num_beams=1, max_new_tokens=3, home=home,
    ))  # fmt: skip
    assert evaluated.n == 10 and evaluated.model_run == summary.run_id


def test_retrieval_finetune_uses_same_image_targets(built, home):
    summary = finetune_flow(params(built, home, "retrieval"))

    assert summary.step == 3 and {"loss_itc", "loss_itm", "loss_itg"} <= set(summary.losses)
    weights = load_file(Path(summary.last_checkpoint) / "model.safetensors")
    assert "itm_head.weight" in weights and "visual_encoder.visual.conv1.weight" in weights

    # The same parameters again: the finished run is the result (no new run, its checkpoint untouched);
    # resume=False trains a new one.
    again = finetune_flow(params(built, home, "retrieval"))
    assert again == summary
    with open_catalog(home) as cat:
        assert [r.run_id for r in cat.runs("finetune-retrieval")] == [summary.run_id]
    fresh = finetune_flow(params(built, home, "retrieval", resume=False))
    assert fresh.run_id != summary.run_id and fresh.start_step == 0 and fresh.resumed_from_run is None
    with open_catalog(home) as cat:
        assert [r.run_id for r in cat.runs("finetune-retrieval")] == [summary.run_id, fresh.run_id]


def test_clear_errors_before_any_run(built, home):
    with pytest.raises(ValueError, match="is a 'stage1' run"):
        finetune_flow(params(built, home, "caption", start_run=built.stage1_run))
    with pytest.raises(ValueError, match="not a run in the catalog"):
        finetune_flow(params(built, home, "caption", start_run="stage2-nope"))
    with pytest.raises(FileNotFoundError, match="image file .* does not exist"):
        finetune_flow(params(built, home, "vqa", image_pattern="{image_id}.png"))
    with pytest.raises(ValueError, match="needs annotations"):
        FinetuneParams(task="caption", start_run="x")
    with open_catalog(home) as cat:
        assert [r for r in cat.runs() if r.stage.startswith("finetune")] == []
