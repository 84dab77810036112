"""The evaluation flow: from predictions files (hand-computed scores), from checkpoints; `blip2 generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from finetune_fixtures import open_catalog

from data_catalog.layout import Layout
from flows.cli import main
from flows.evaluate import EvaluateParams, evaluate_flow, generate_from_checkpoint, paper_numbers, paper_table

torch.set_num_threads(1)


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_vqa_from_a_predictions_file_by_hand(tmp_path, prefect_harness):
    answers = {1: ["2"] * 10, 2: ["red"] * 2 + ["blue"] * 8}
    types = {1: ("number", "how many"), 2: ("other", "what color is the")}
    annotations = _write(tmp_path / "ann.json", {"annotations": [
        {"question_id": q, "image_id": q, "answer_type": types[q][0], "question_type": types[q][1],
         "answers": [{"answer": a} for a in answers[q]]} for q in answers]})  # fmt: skip
    predictions = _write(
        tmp_path / "res.json", [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "Red"}]
    )
    summary = evaluate_flow(
        EvaluateParams(task="vqa", annotations=annotations, predictions=predictions, home=tmp_path / "var")
    )
    # q1: all agree, exact match: 1. q2: humans disagree, so "Red" is normalised to "red", which 2 of 10
    # annotators gave: leave-one-out mean = (2 x 1/3 + 8 x 2/3) / 10 = 0.6. Overall (1 + 0.6) / 2.
    assert summary.metrics["overall"] == pytest.approx(80.0)
    assert summary.metrics["answer_type/number"] == pytest.approx(100.0)
    assert summary.metrics["answer_type/other"] == pytest.approx(60.0)
    assert summary.metrics["question_type/what color is the"] == pytest.approx(60.0)
    assert (summary.n, summary.dataset, summary.checkpoint) == (2, "ann", None)
    with open_catalog(tmp_path / "var") as cat:
        recorded = {r.metric: r.value for r in cat.eval_results(summary.run_id)}
        assert cat.run(summary.run_id).stage == "evaluate" and cat.run(summary.run_id).status == "done"
    assert recorded == summary.metrics

    missing = _write(tmp_path / "res2.json", [{"question_id": 1, "answer": "2"}])
    with pytest.raises(ValueError, match="no answer for question_id 2"):
        evaluate_flow(
            EvaluateParams(task="vqa", annotations=annotations, predictions=missing, home=tmp_path / "var")
        )


def test_caption_from_a_predictions_file(tmp_path, prefect_harness):
    refs = {
        1: ["a red square on a blue background", "a red square"],
        2: ["two green circles", "green circles"],
    }
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in refs]
    anns = [{"image_id": i, "caption": c} for i, caps in refs.items() for c in caps]
    annotations = _write(tmp_path / "captions_test.json", {"images": images, "annotations": anns})
    perfect = _write(tmp_path / "res.json", [{"image_id": i, "caption": caps[0]} for i, caps in refs.items()])
    # METEOR (a Java process loading its paraphrase tables) is left out: slow, and tested in metrics/.
    asked = ("bleu", "rouge", "spice")
    summary = evaluate_flow(EvaluateParams(
        task="caption", annotations=annotations, predictions=perfect, caption_metrics=asked,
        home=tmp_path / "var",
    ))  # fmt: skip
    assert summary.metrics["bleu_1"] == pytest.approx(1.0)
    assert summary.metrics["rouge_l"] == pytest.approx(1.0)
    assert "spice" not in summary.metrics and "spice" in summary.unavailable  # never reported as 0
    assert "n/a" in paper_table(summary)

    # NoCaps: annotations whose images carry a domain are scored per domain too.
    for img, domain in zip(images, ("in-domain", "out-domain"), strict=True):
        img["domain"] = domain
    nocaps = _write(tmp_path / "nocaps_val.json", {"images": images, "annotations": anns})
    summary = evaluate_flow(EvaluateParams(
        task="caption", annotations=nocaps, predictions=perfect, caption_metrics=("bleu", "cider"),
        home=tmp_path / "var",
    ))  # fmt: skip
    assert {"cider", "in-domain/cider", "out-domain/cider", "in-domain/bleu_4"} <= set(summary.metrics)


def test_paper_numbers_by_preset_and_benchmark():
    assert paper_numbers("paper-vitg-flant5xl", "EVA01-g-14", "vqa", "vqav2-val") == {"overall": 63.1}
    assert paper_numbers("paper-vitg-opt2.7b", "EVA01-g-14", "caption", "nocaps_val") == {"cider": 1.197}
    assert paper_numbers("paper-vitg-opt2.7b", "EVA01-g-14", "retrieval", "flickr30k-test")["txt_r1"] == 97.6
    assert paper_numbers("tiny", "blip2-tiny-clip", "vqa", "vqav2-val") == {}


def test_caption_and_vqa_from_a_catalog_checkpoint(built, home):
    files = built.files
    caption = evaluate_flow(EvaluateParams(
        task="caption", annotations=files["coco_captions_test"], checkpoint=built.stage2_run,
        images=built.corpus, num_beams=1, max_new_tokens=4, caption_metrics=("bleu", "cider"), home=home,
    ))  # fmt: skip
    assert caption.model_run == built.stage2_run and caption.n == 3
    rows = json.loads(Path(caption.predictions).read_text())
    assert len(rows) == 3 and all(isinstance(r["caption"], str) for r in rows)
    assert 0.0 <= caption.metrics["bleu_4"] <= 1.0 and caption.unavailable == {}

    vqa = evaluate_flow(EvaluateParams(
        task="vqa", annotations=files["vqa_annotations_val"], questions=files["vqa_questions_val"],
        checkpoint=built.stage2_run, images=built.corpus / "images" / "vqa_val",
        image_pattern="{image_id:07d}.jpg", num_beams=2, home=home,
    ))  # fmt: skip
    assert vqa.n == 10 and 0.0 <= vqa.metrics["overall"] <= 100.0
    assert len(json.loads(Path(vqa.predictions).read_text())) == 10
    with open_catalog(home) as cat:
        # recorded under the evaluation run and under the run whose weights were evaluated
        model_evals = {(r.task, r.metric) for r in cat.eval_results(built.stage2_run)}
        checkpoint = cat.checkpoints(built.stage2_run)[-1].path
        assert {r.checkpoint for r in cat.eval_results(vqa.run_id)} == {checkpoint}
    assert ("caption", "cider") in model_evals and ("vqa", "overall") in model_evals


def test_retrieval_from_a_checkpoint_folder(built, home):
    run_dir = Layout(home).run_dir("stage1", built.stage1_run)
    summary = evaluate_flow(EvaluateParams(
        task="retrieval", annotations=built.files["retrieval_test"], checkpoint=str(run_dir),
        images=built.corpus, k=4, batch_size=8, dataset="synth-retrieval", home=home,
    ))  # fmt: skip
    assert summary.n == 8 + 40 and summary.model_run == built.stage1_run
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "itc_txt_r1"):
        assert 0.0 <= summary.metrics[key] <= 100.0
    assert summary.metrics["txt_r10"] >= summary.metrics["txt_r1"]
    # Text queries rank 8 images: the 4 re-ranked ones first, the rest after them, so R@10 is 100.
    assert summary.metrics["img_r10"] == 100.0
    with pytest.raises(ValueError, match="not a stage-2 model"):
        evaluate_flow(EvaluateParams(
            task="caption", annotations=built.files["coco_captions_test"], checkpoint=built.stage1_run,
            images=built.corpus, home=home,
        ))  # fmt: skip


def test_generate_from_a_checkpoint(built, home, capsys):
    image = (
        built.corpus
        / "images"
        / "coco_test"
        / sorted(p.name for p in (built.corpus / "images" / "coco_test").iterdir())[0]
    )
    args = ["generate", str(image), "--checkpoint", built.stage2_run, "--prompt", "a photo of",
            "--num-beams", "2", "--max-new-tokens", "5", "--home", str(home)]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    texts = generate_from_checkpoint([image, image], built.stage2_run, "a photo of", 2, 5, home=home)
    assert len(texts) == 2 and texts[0] == texts[1] and isinstance(texts[0], str)
    assert main(["generate", str(image), "--checkpoint", built.stage1_run, "--home", str(home)]) == 1
    assert "stage-1 model" in capsys.readouterr().err
    assert main(["generate", "nope.jpg", "--checkpoint", built.stage2_run, "--home", str(home)]) == 1
    assert "nope.jpg does not exist" in capsys.readouterr().err


def test_cli_evaluate_and_finetune_arguments(tmp_path, prefect_harness, capsys):
    from flows.cli import build_parser

    annotations = _write(tmp_path / "ann.json", {"annotations": [
        {"question_id": 1, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10}]})  # fmt: skip
    predictions = _write(tmp_path / "res.json", [{"question_id": 1, "answer": "no"}])
    base = ["evaluate", "vqa", "--annotations", str(annotations), "--home", str(tmp_path / "var")]
    assert main([*base, "--predictions", str(predictions)]) == 0
    out = capsys.readouterr().out
    assert "overall" in out and "answer_type/yes/no" in out and "0.00" in out
    assert main(base) == 2  # neither predictions nor checkpoint: the parameters name the problem
    assert "exactly one of predictions" in capsys.readouterr().err

    args = build_parser().parse_args([
        "finetune", "vqa", "--start-run", "stage2-x", "--annotations", "a.json", "--questions", "q.json",
        "--images", "img", "--image-pattern", "{image_id:07d}.jpg", "--no-layer-decay", "--steps", "2",
    ])  # fmt: skip
    assert (args.task, args.start_run, args.annotations, args.no_layer_decay) == (
        "vqa", "stage2-x", [Path("a.json")], True
    )  # fmt: skip
