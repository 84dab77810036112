"""`evaluate`: VQA accuracy, captioning metrics and retrieval recall, from a model or a predictions file.

`evaluate_flow(EvaluateParams(task=..., annotations=..., predictions=... | checkpoint=..., images=...))`:
- From a predictions file in the standard result format (VQAv2 results JSON `[{"question_id", "answer"}]`,
  COCO caption results JSON `[{"image_id", "caption"}]`) against standard annotation files: no model.
- From a checkpoint: a catalog run id (its latest recorded checkpoint), a run folder, a checkpoint folder,
  a folder imported from Hugging Face, or a Hugging Face BLIP-2 folder. The model writes its predictions
  in the standard format into the evaluation's run folder, and they are scored like a given file.
  VQA: the paper's prompt, beam 5, length penalty -1 (a VQA fine-tuned Q-Former also reads the
  question). Captioning: beam 5 after the run's prompt ("a photo of " once fine-tuned). Retrieval
  (stage-1 models): ITC top-k candidates re-ranked by ITM (k = 128), recall@1/5/10 both directions;
  with nproc > 1 split over torchrun ranks (`flows.downstream_entry`, log in the run folder), each
  embedding its share of the images and texts and re-ranking its share of the queries.

Metrics come from `blip2_core.metrics` (the official VQA normalisation and leave-one-out accuracy,
pycocoevalcap; NoCaps per domain when the annotations carry domains). A metric that cannot run here (SPICE
without its jars, METEOR without Java) is listed in `EvalSummary.unavailable`, never reported as 0.

Every evaluation is a catalog run (stage `evaluate`); its metrics go to `record_eval` under that run and,
when the weights came from a catalog run, under that run too, with the checkpoint path (its lineage:
checkpoints -> stage_runs). For the paper presets the summary carries the paper's numbers beside ours.

On the synthetic corpus (folder C):
    caption:   annotations=C/coco/annotations/captions_test.json, images=C
    vqa:       annotations=C/vqa/v2_synth_val_annotations.json,
               questions=C/vqa/v2_OpenEnded_synth_val_questions.json,
               images=C/images/vqa_val, image_pattern="{image_id:07d}.jpg"
    retrieval: annotations=C/retrieval/captions_test.json, images=C
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, model_validator

from blip2_core.fileio import atomic_write_text, path_under
from data_catalog.layout import Layout
from flows.common import catalog_session, flow_run_id, layout_for

STAGE = "evaluate"
CAPTION_METRICS = ("bleu", "meteor", "rouge", "cider", "spice")

# SPEC.md "Headline numbers": (preset, benchmark) -> {our metric name: the paper's value, on our scale}.
PAPER_NUMBERS: dict[str, dict[str, dict[str, float]]] = {
    "paper-vitl-opt2.7b": {"vqav2-val": {"overall": 50.1}, "vqav2-test-dev": {"overall": 49.7},
                           "okvqa": {"overall": 30.2}, "gqa": {"overall": 33.9}},
    "paper-vitg-opt2.7b": {"vqav2-val": {"overall": 53.5}, "vqav2-test-dev": {"overall": 52.3},
                           "okvqa": {"overall": 31.7}, "gqa": {"overall": 34.6}, "nocaps": {"cider": 1.197}},
    "paper-vitg-opt6.7b": {"vqav2-val": {"overall": 54.3}, "vqav2-test-dev": {"overall": 52.6},
                           "okvqa": {"overall": 36.4}, "gqa": {"overall": 36.4}, "nocaps": {"cider": 1.210}},
    "paper-vitl-flant5xl": {"vqav2-val": {"overall": 62.6}, "vqav2-test-dev": {"overall": 62.3},
                            "okvqa": {"overall": 39.4}, "gqa": {"overall": 44.4}},
    "paper-vitg-flant5xl": {"vqav2-val": {"overall": 63.1}, "vqav2-test-dev": {"overall": 63.0},
                            "okvqa": {"overall": 40.7}, "gqa": {"overall": 44.2}, "nocaps": {"cider": 1.216}},
    "paper-vitg-flant5xxl": {"vqav2-val": {"overall": 65.2}, "vqav2-test-dev": {"overall": 65.0},
                             "okvqa": {"overall": 45.9}, "gqa": {"overall": 44.7}},
}  # fmt: skip
PAPER_RETRIEVAL_VITG = {"flickr": {"txt_r1": 97.6, "img_r1": 89.7}}  # any ViT-g stage-1 model


class EvaluateParams(BaseModel):
    """One evaluation. Give `predictions` (no model) or `checkpoint` (+ `images`); paths may be relative.

    annotations, by task:
    - vqa:       VQAv2 / OK-VQA annotations JSON; `questions` is its questions JSON (needed with a
                 checkpoint: the question text; optional with predictions). Images: `image_pattern`
                 under `images`, e.g. "COCO_val2014_{image_id:012d}.jpg".
    - caption:   COCO captions JSON (Karpathy test split) or NoCaps (images with a `domain`: per-domain
                 scores); images are `images[].file_name` under `images`.
    - retrieval: Karpathy dataset JSON (pick `split`, e.g. "test"), COCO captions JSON or LAVIS's
                 [{"image", "caption": [...]}]; image paths relative to `images`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["vqa", "caption", "retrieval"]
    annotations: Path = Field(description="ground truth file (see above)")
    questions: Path | None = Field(None, description="vqa: VQAv2 questions JSON")
    predictions: Path | None = Field(None, description="a results file in the standard format: score it")
    checkpoint: str | None = Field(None, description="catalog run id, run/checkpoint folder, or HF folder")
    images: Path | None = Field(None, description="image root (with a checkpoint)")
    image_pattern: str = Field("{image_id}.jpg", description="vqa: image file name from its image_id")
    split: str | None = Field(None, description="retrieval: Karpathy split to use (e.g. test)")
    dataset: str | None = Field(None, description="name in the catalog; default: the annotations file stem")
    prompt: str | None = Field(None, description="caption: prompt; default: the model's (llm.prompt)")
    num_beams: int = Field(5, ge=1)
    max_new_tokens: int | None = Field(None, ge=1, description="default 10 (vqa), 30 (caption)")
    k: int = Field(128, ge=1, description="retrieval: ITC candidates re-ranked by ITM per query")
    rerank: Literal["itm+itc", "itm"] = Field("itm+itc", description="retrieval: ITM logit (+ ITC sim)")
    batch_size: int = Field(16, ge=1)
    nproc: int = Field(1, ge=1, description="retrieval: processes (torchrun ranks) sharing the work")
    caption_metrics: tuple[str, ...] = Field(CAPTION_METRICS, description="caption: pycocoevalcap metrics")
    tokenizer: Path | None = Field(None, description="BERT-style tokenizer; default: the run's lineage")
    device: str = Field("auto", description="auto: cuda when available")
    home: Path | None = Field(None, description="data root; default $BLIP2_HOME or ./var")

    @model_validator(mode="after")
    def _check(self) -> EvaluateParams:
        if (self.predictions is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of predictions (a results file) and checkpoint (a model)")
        if self.task == "retrieval" and self.predictions is not None:
            raise ValueError("retrieval is evaluated from a checkpoint (there is no standard results file)")
        if self.checkpoint is not None and self.images is None:
            raise ValueError("images: evaluating a checkpoint needs the image folder")
        if self.checkpoint is not None and self.task == "vqa" and self.questions is None:
            raise ValueError("questions: evaluating a VQA checkpoint needs the questions file")
        if self.nproc > 1 and self.task != "retrieval":
            raise ValueError(f"nproc: only retrieval runs on several processes, not {self.task}")
        return self


class EvalSummary(BaseModel):
    run_id: str
    task: str
    dataset: str
    metrics: dict[str, float]
    unavailable: dict[str, str]  # metric -> why it could not run here
    n: int  # questions / images / queries scored
    predictions: str | None  # the scored results file
    checkpoint: str | None  # the evaluated weights
    model_run: str | None  # the catalog run that produced them
    preset: str | None
    paper: dict[str, float]  # the paper's numbers for this preset and benchmark (our metric names)
    run_dir: Path


# --- the model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """Where weights come from: kind "trained" (our checkpoint folder), "imported" or "hf"."""

    path: Path
    kind: str
    run_id: str | None = None


def resolve_checkpoint(ref: str, layout: Layout) -> ModelRef:
    """A catalog run id, a run folder, a checkpoint folder, an imported folder or a HF BLIP-2 folder."""
    from blip2_core.checkpoints import WEIGHTS_FILE, latest_checkpoint
    from blip2_core.hf_interop import META_FILE

    path = Path(ref)
    if path.is_dir():
        if (path / META_FILE).is_file():
            return ModelRef(path.resolve(), "imported")
        if (path / "config.json").is_file() and "architectures" in json.loads(
            (path / "config.json").read_text()
        ):
            return ModelRef(path.resolve(), "hf")
        if (path / WEIGHTS_FILE).is_file():
            run = path.resolve().parents[1].name if path.resolve().parent.name == "checkpoints" else None
            return ModelRef(path.resolve(), "trained", run)
        if (path / "checkpoints").is_dir():
            latest = latest_checkpoint(path / "checkpoints")
            if latest is None:
                raise FileNotFoundError(f"checkpoint: run folder {path} holds no finished checkpoint")
            return ModelRef(latest.resolve(), "trained", path.resolve().name)
        raise FileNotFoundError(
            f"checkpoint: {path} is neither a checkpoint, a run folder nor a BLIP-2 folder"
        )
    from flows.train import latest_recorded_checkpoint

    with catalog_session(layout, read_only=layout.catalog.exists()) as cat:
        if cat.run(ref) is None:
            raise ValueError(
                f"checkpoint: {ref!r} is neither a folder nor a run in the catalog {layout.catalog}"
            )
        return ModelRef(latest_recorded_checkpoint(cat, ref, "checkpoint run"), "trained", ref)


def load_model(ref: ModelRef, scratch: Path, device: str = "auto"):
    """The model of a ModelRef, in eval mode on `device` (a HF folder is imported into `scratch` first)."""
    from flows.downstream_entry import load_eval_model

    return load_eval_model(ref.path, ref.kind, scratch, device)


def model_tokenizer(ref: ModelRef, given: Path | None, max_len: int, required: bool):
    """The Q-Former's BERT-style tokenizer: given, else the run's lineage, else beside imported weights."""
    from flows.finetune import lineage
    from flows.torchrun_entry import BertTokenize

    folder = given
    if folder is None and ref.kind == "trained":
        run_dir = ref.path.parents[1] if ref.path.parent.name == "checkpoints" else ref.path
        folder = lineage(run_dir)["tokenizer"]
    if folder is None and (ref.path / "tokenizer_config.json").is_file():
        folder = ref.path
    if folder is None or not Path(folder).is_dir():
        if required:
            raise ValueError(
                f"the Q-Former needs its BERT-style tokenizer; none found for {ref.path}: pass tokenizer"
            )
        return None
    return BertTokenize(str(Path(folder).resolve()), max_len)


# --- predictions from a model -------------------------------------------------------------------------


def _images_of_coco(annotations: Path, images: Path) -> dict[Any, str]:
    """image_id -> file under `images`, from a COCO captions file's `images[].file_name`."""
    data = json.loads(annotations.read_text())
    files = {
        img["id"]: str(path_under(images, img["file_name"], f"{annotations}: images[{i}] (id {img['id']!r})"))
        for i, img in enumerate(data.get("images", []))
        if "file_name" in img
    }
    if not files:
        raise ValueError(f"{annotations}: no images[].file_name to find the image files by")
    _require_files(annotations, list(files.values()))
    return files


def _retrieval_image_files(annotations: Path, images: Path, keys: Sequence[Any]) -> list[str]:
    """The files under `images` of a retrieval file's image keys (Karpathy `filepath/filename`, COCO
    `file_name`, LAVIS `image`), in order."""
    files = [str(path_under(images, key, f"{annotations}: image #{i}")) for i, key in enumerate(keys)]
    _require_files(annotations, files)
    return files


def _require_files(annotations: Path, files: list[str]) -> None:
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{annotations}: {len(missing)} image file(s) do not exist, e.g. {missing[0]}"
        )


def predict_captions(model, params: EvaluateParams) -> list[dict]:
    from blip2_core.generate import CAPTION_GENERATION, GenerationConfig
    from blip2_core.inference import generate_texts

    files = _images_of_coco(Path(params.annotations), Path(params.images))
    ids = list(files)
    prompt = params.prompt if params.prompt is not None else model.cfg.llm.prompt
    cfg = GenerationConfig(
        num_beams=params.num_beams, max_new_tokens=params.max_new_tokens or CAPTION_GENERATION.max_new_tokens,
        min_new_tokens=min(CAPTION_GENERATION.min_new_tokens, params.max_new_tokens or 30),
        num_return_sequences=1,
    )  # fmt: skip
    texts = generate_texts(model, [files[i] for i in ids], [prompt] * len(ids), cfg, params.batch_size)
    return [{"image_id": i, "caption": t} for i, t in zip(ids, texts, strict=True)]


def predict_answers(model, params: EvaluateParams, tokenize) -> list[dict]:
    from blip2_core.finetune import image_file
    from blip2_core.generate import VQA_GENERATION, GenerationConfig
    from blip2_core.inference import answer_vqa
    from blip2_core.metrics import load_vqa_annotations

    anns = load_vqa_annotations(params.questions, params.annotations)
    qids = list(anns)
    paths = [image_file(Path(params.images), anns[q].image_id, params.image_pattern, str(params.questions))
             for q in qids]  # fmt: skip
    cfg = GenerationConfig(
        num_beams=params.num_beams, length_penalty=VQA_GENERATION.length_penalty,
        max_new_tokens=params.max_new_tokens or VQA_GENERATION.max_new_tokens,
    )  # fmt: skip
    answers = answer_vqa(model, paths, [anns[q].question for q in qids], tokenize, cfg, params.batch_size)
    return [{"question_id": q, "answer": a} for q, a in zip(qids, answers, strict=True)]


def retrieval_metrics(params: EvaluateParams, recalls) -> tuple[dict[str, float], int]:
    """Recall@K by LAVIS's names, from `recalls(image files, ground truth)`: the (re-ranked, ITC-only)
    `RetrievalScores` of a model (`inference.RetrievalOutput.recalls`)."""
    from blip2_core.metrics import load_retrieval_gt

    gt = load_retrieval_gt(params.annotations, params.split)
    paths = _retrieval_image_files(params.annotations, Path(params.images), gt.image_keys)
    reranked, itc_only = recalls(paths, gt)
    metrics = _recall_names(reranked) | {f"itc_{k}": v for k, v in _recall_names(itc_only).items()}
    return metrics, len(gt.image_keys) + len(gt.texts)


def retrieval_in_process(model, params: EvaluateParams, tokenize) -> tuple[dict[str, float], int]:
    from blip2_core.inference import retrieval_scores

    def recalls(paths: list[str], gt):
        k, batch, mode = params.k, params.batch_size, params.rerank
        out = retrieval_scores(model, paths, list(gt.texts), tokenize, k, batch, mode)
        return out.recalls(gt.img2txt, gt.txt2img)

    return retrieval_metrics(params, recalls)


def retrieval_with_torchrun(ref: ModelRef, params: EvaluateParams, run_dir: Path) -> dict[str, Any]:
    """Retrieval over `params.nproc` torchrun ranks (flows.downstream_entry), which score the images and
    texts and, on rank 0, write the recalls to <run_dir>/retrieval_recalls.json: metrics, n, preset, model."""
    from flows.downstream_entry import read_recalls
    from flows.train import train_with_torchrun

    tokenizer = model_tokenizer(ref, params.tokenizer, 1, required=True).folder
    saved: dict[str, Any] = {}

    def recalls(paths: list[str], gt):
        job = {
            "kind": "retrieval", "checkpoint": str(ref.path), "checkpoint_kind": ref.kind,
            "tokenizer": tokenizer, "images": paths, "texts": list(gt.texts), "img2txt": gt.img2txt,
            "txt2img": gt.txt2img, "k": params.k, "batch_size": params.batch_size, "rerank": params.rerank,
            "device": params.device, "out": str(run_dir / "retrieval_recalls.json"),
        }  # fmt: skip
        atomic_write_text(run_dir / "retrieval_job.json", json.dumps(job, indent=1))
        train_with_torchrun(str(run_dir / "retrieval_job.json"), params.nproc, "flows.downstream_entry")
        saved.update(json.loads(Path(job["out"]).read_text()))
        return read_recalls(saved)

    metrics, n = retrieval_metrics(params, recalls)
    return {"metrics": metrics, "n": n, "unavailable": {}, "preset": saved["preset"], "model": saved["model"]}


def _recall_names(scores) -> dict[str, float]:
    """LAVIS's names: txt_r1 = text retrieval (image queries) R@1, img_r1 = image retrieval R@1."""
    out = {f"txt_r{k}": v for k, v in scores.i2t.items()} | {f"img_r{k}": v for k, v in scores.t2i.items()}
    return out | {"txt_r_mean": scores.i2t_mean, "img_r_mean": scores.t2i_mean, "r_mean": scores.mean}


# --- scoring files --------------------------------------------------------------------------------------


def score_vqa(predictions: Path, params: EvaluateParams) -> tuple[dict[str, float], dict[str, str], int]:
    from blip2_core.metrics import evaluate_vqa_files

    scores = evaluate_vqa_files(predictions, params.questions, params.annotations)
    metrics = {"overall": scores.overall}
    metrics |= {f"answer_type/{k}": v for k, v in scores.per_answer_type.items()}
    metrics |= {f"question_type/{k}": v for k, v in scores.per_question_type.items()}
    return metrics, {}, scores.n


def _is_nocaps(annotations: Path) -> bool:
    data = json.loads(Path(annotations).read_text())
    images = data.get("images") if isinstance(data, dict) else None
    return bool(images) and all(isinstance(i, dict) and "domain" in i for i in images)


def score_captions(predictions: Path, params: EvaluateParams) -> tuple[dict[str, float], dict[str, str], int]:
    from blip2_core.metrics import evaluate_caption_files, evaluate_nocaps_files

    metrics_asked = params.caption_metrics
    if _is_nocaps(params.annotations):
        scores = evaluate_nocaps_files(predictions, params.annotations, metrics_asked)
        metrics = dict(scores.overall.values)
        for domain, part in scores.per_domain.items():
            metrics |= {f"{domain}/{k}": v for k, v in part.values.items()}
        return metrics, dict(scores.overall.unavailable), scores.overall.n
    scores = evaluate_caption_files(predictions, params.annotations, metrics_asked)
    return dict(scores.values), dict(scores.unavailable), scores.n


# --- the flow --------------------------------------------------------------------------------------------


def dataset_name(params: EvaluateParams) -> str:
    return params.dataset or Path(params.annotations).stem


def paper_numbers(preset: str | None, cfg_model: str | None, task: str, dataset: str) -> dict[str, float]:
    """The paper's values for this preset and benchmark, recognised by the dataset name."""
    name = dataset.lower().replace("_", "-")
    if task == "retrieval":
        if cfg_model and "EVA01-g" in cfg_model and "flickr" in name:
            return dict(PAPER_RETRIEVAL_VITG["flickr"])
        return {}
    table = PAPER_NUMBERS.get(preset or "", {})
    for bench in ("vqav2-test-dev", "vqav2-val", "okvqa", "gqa", "nocaps"):
        if bench in name or bench.replace("-", "") in name.replace("-", ""):
            return dict(table.get(bench, {}))
    return {}


def _evaluate(params: EvaluateParams, layout: Layout, run_dir: Path) -> dict[str, Any]:
    """Predictions (from the file or the model), then metrics."""
    out: dict[str, Any] = {"checkpoint": None, "model_run": None, "preset": None, "model": None}
    predictions = Path(params.predictions).resolve() if params.predictions else None
    if params.checkpoint is not None:
        ref = resolve_checkpoint(params.checkpoint, layout)
        out |= {"checkpoint": str(ref.path), "model_run": ref.run_id}
        if params.task == "retrieval" and params.nproc > 1:
            return out | retrieval_with_torchrun(ref, params, run_dir)
        with tempfile.TemporaryDirectory(prefix="blip2-eval-") as scratch:
            model = load_model(ref, Path(scratch), params.device)
            out |= {"preset": model.cfg.name, "model": model.cfg.vision.model_name}
            needs_text = params.task == "retrieval" or (
                params.task == "vqa" and getattr(model.qformer, "embeddings", None) is not None
            )
            tokenize = model_tokenizer(ref, params.tokenizer, model.cfg.qformer.max_text_len, needs_text)
            if params.task == "retrieval":
                if not hasattr(model, "itm_logits"):
                    raise ValueError(f"checkpoint {ref.path} is not a stage-1 (retrieval) model")
                out["metrics"], out["n"] = retrieval_in_process(model, params, tokenize)
                out["unavailable"] = {}
                return out
            if not hasattr(model, "bridge"):
                raise ValueError(
                    f"checkpoint {ref.path} is not a stage-2 model (it has no LLM): {params.task}"
                )
            rows = (
                predict_answers(model, params, tokenize)
                if params.task == "vqa"
                else predict_captions(model, params)
            )
        predictions = run_dir / ("vqa_results.json" if params.task == "vqa" else "caption_results.json")
        atomic_write_text(predictions, json.dumps(rows, indent=1))
    score = score_vqa if params.task == "vqa" else score_captions
    out["metrics"], out["unavailable"], out["n"] = score(predictions, params)
    out["predictions"] = str(predictions)
    return out


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: EvaluateParams) -> EvalSummary:
    """Score a predictions file, or a model's predictions, and record the metrics in the catalog."""
    layout = layout_for(params.home)
    dataset = dataset_name(params)
    chash = hashlib.sha256(params.model_dump_json().encode()).hexdigest()[:12]
    with catalog_session(layout) as cat:
        run_id = cat.start_run(STAGE, chash, params.model_dump(mode="json"), flow_run_id())
    run_dir = layout.run_dir(STAGE, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = _evaluate(params, layout, run_dir)
    except BaseException as err:
        with catalog_session(layout) as cat:
            status = "cancelled" if isinstance(err, KeyboardInterrupt) else "failed"
            cat.finish_run(run_id, status, {"error": f"{type(err).__name__}: {err}"})
        raise
    summary = EvalSummary(
        run_id=run_id, task=params.task, dataset=dataset, metrics=result["metrics"],
        unavailable=result["unavailable"], n=result["n"], predictions=result.get("predictions"),
        checkpoint=result["checkpoint"], model_run=result["model_run"], preset=result["preset"],
        paper=paper_numbers(result["preset"], result["model"], params.task, dataset), run_dir=run_dir,
    )  # fmt: skip
    atomic_write_text(run_dir / "metrics.json", summary.model_dump_json(indent=1))
    with catalog_session(layout) as cat:
        cat.record_eval(run_id, params.task, dataset, summary.metrics, summary.checkpoint)
        if summary.model_run is not None and cat.run(summary.model_run) is not None:
            cat.record_eval(summary.model_run, params.task, dataset, summary.metrics, summary.checkpoint)
        cat.finish_run(run_id, "done", summary.model_dump(mode="json"))
    get_run_logger().info("evaluate %s on %s: %s", params.task, dataset, format_metrics(summary.metrics))
    return summary


def generate_from_checkpoint(
    images: list[Path],
    checkpoint: str,
    prompt: str | None = None,
    num_beams: int = 5,
    max_new_tokens: int = 30,
    device: str = "auto",
    home: Path | None = None,
) -> list[str]:
    """`blip2 generate`: instructed zero-shot generation, the prompt following the visual prompt, from a
    stage-2 model (catalog run id, run or checkpoint folder, imported or HF BLIP-2 folder). One text per
    image; `prompt` None uses the model's own (llm.prompt)."""
    from blip2_core.generate import GenerationConfig
    from blip2_core.inference import generate_texts

    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"image file {missing[0]} does not exist")
    ref = resolve_checkpoint(checkpoint, layout_for(home))
    with tempfile.TemporaryDirectory(prefix="blip2-generate-") as scratch:
        model = load_model(ref, Path(scratch), device)
    if not hasattr(model, "bridge"):
        raise ValueError(f"checkpoint {ref.path} is a stage-1 model: generation needs a stage-2 (LLM) model")
    prompt = model.cfg.llm.prompt if prompt is None else prompt
    cfg = GenerationConfig(num_beams=num_beams, max_new_tokens=max_new_tokens)
    return generate_texts(model, [str(p) for p in images], [prompt] * len(images), cfg)


def format_metrics(metrics: dict[str, float], limit: int = 8) -> str:
    items = list(metrics.items())[:limit]
    return ", ".join(f"{k} {v:.4g}" for k, v in items) + (" ..." if len(metrics) > limit else "")


def paper_table(summary: EvalSummary) -> str:
    """Our metrics beside the paper's (caption metrics x100, as the paper prints them)."""
    scale = 100.0 if summary.task == "caption" else 1.0
    lines = [f"{'metric':<28}{'ours':>10}{'paper':>10}"]
    for name, value in summary.metrics.items():
        paper = summary.paper.get(name)
        shown = "" if paper is None else f"{paper * scale:.1f}"
        lines.append(f"{name:<28}{value * scale:>10.2f}{shown:>10}")
    for name, why in summary.unavailable.items():
        lines.append(f"{name:<28}{'n/a':>10}  ({why})")
    return "\n".join(lines)


__all__ = [
    "EvalSummary",
    "EvaluateParams",
    "evaluate_flow",
    "load_model",
    "paper_table",
    "resolve_checkpoint",
]
