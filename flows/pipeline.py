"""The `pipeline` flow: every stage of the miniature replication as a subflow, in order.

    corpus + ingest -> teachers -> capfilt -> stage1 -> stage2 (and stage 2 without stage 1: Figure 5)
      -> finetune caption | vqa | retrieval -> evaluate (zero-shot and fine-tuned, beside baselines) -> report

Each stage is the same flow its own deployment and CLI subcommand run; this flow only builds their params.
A stage that is not in `stages` is not run: its output is resolved from the catalog instead (the newest
finished run of that stage, or the run named in `use`), so `--only stage2` re-runs stage 2 alone from
the cached shards, CapFilt sidecars and stage-1 checkpoint. Stages that find their work done on disk
(ingested shards, CapFilt sidecars under the same config hash, teachers of the same config) are cache hits
and say so in their artifacts.

Per-stage parameters: `overrides[stage]` is merged into that stage's params model (and validated by it),
e.g. {"stage1": {"steps": 600}, "capfilt": {"batch_size": 32}}.
"""

from __future__ import annotations

import importlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from flows.common import artifact_key, catalog_session, layout_for

# Stage names, in order. "figure5" is stage 2 without stage 1; "baselines" the untrained-bridge and
# majority-answer baselines the evaluation is compared with.
STAGES = (
    "ingest",
    "teachers",
    "capfilt",
    "stage1",
    "stage2",
    "figure5",
    "finetune",
    "evaluate",
    "report",
)
PRETRAIN_SOURCE = "synth-pretrain"
# The paper's Figure 5 in miniature: both stage-2 runs (with and without stage 1) keep a checkpoint at every
# quarter of their steps, and each is evaluated zero-shot on VQA (the stage-2 run's metric FIGURE5_METRIC).
FIGURE5_POINTS = 4
# The stage-2 run whose bridge never learns (evaluate's baseline): one step at this lr. Stage 2 is never
# resolved from the catalog to a run with it.
UNTRAINED_BRIDGE_LR = 1e-12


class PipelineParams(BaseModel):
    """The miniature replication, end to end. Unset stage numbers come from each stage's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: tuple[str, ...] = Field(STAGES, description="stages to run; the others come from the catalog")
    use: dict[str, str] = Field(
        default_factory=dict, description="stage -> run id to reuse instead of the newest finished run"
    )
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="stage -> fields merged into that stage's params"
    )
    seed: int = 0
    n_pretrain: int = Field(2000, ge=10, description="pretraining images of the synthetic corpus")
    n_coco: int = Field(600, ge=10)
    n_vqa_images: int = Field(400, ge=10)
    n_retrieval: int = Field(300, ge=10)
    n_teacher: int = Field(0, ge=0, description="clean captioned images for the teachers only")
    stage1_steps: int = Field(400, ge=1)
    stage2_steps: int = Field(400, ge=1)
    finetune_steps: int = Field(150, ge=1)
    batch_size: int = Field(32, ge=1)
    retrieval_k: int = Field(16, ge=1, description="ITC candidates re-ranked by ITM per query")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    home: Path | None = Field(None, description="data root; default $BLIP2_HOME or ./var")

    @field_validator("stages")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [s for s in value if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
        return value

    @field_validator("overrides", "use")
    @classmethod
    def _known_keys(cls, value: dict) -> dict:
        unknown = [s for s in value if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
        return value

    @field_validator("overrides")
    @classmethod
    def _valid_fields(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Each override names a parameter of its stage with a valid value; checked before any stage runs."""
        for stage, fields in value.items():
            model = _params_model(stage)
            for name, field_value in fields.items():
                info = model.model_fields.get(name)
                if info is None:
                    raise ValueError(
                        f"{stage}.{name}: no such parameter; {stage} has {sorted(model.model_fields)}"
                    )
                annotation = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
                try:
                    TypeAdapter(annotation).validate_python(field_value)
                except ValidationError as err:
                    problem = err.errors()[0]["msg"]
                    raise ValueError(f"{stage}.{name}={field_value!r}: {problem}") from None
        return value


_PARAMS_MODELS = {
    "ingest": ("flows.demo", "CorpusIngestParams"),
    "teachers": ("flows.teachers", "TeachersParams"),
    "capfilt": ("flows.capfilt", "CapFiltParams"),
    "stage1": ("flows.train", "Stage1Params"),
    "stage2": ("flows.train", "Stage2Params"),
    "figure5": ("flows.train", "Stage2Params"),
    "finetune": ("flows.finetune", "FinetuneParams"),
    "evaluate": ("flows.evaluate", "EvaluateParams"),
    "report": ("flows.reports", "ReportParams"),
}


def _params_model(stage: str) -> type[BaseModel]:
    """The params model of a pipeline stage (its module imported lazily, as the stages themselves are)."""
    module, name = _PARAMS_MODELS[stage]
    return getattr(importlib.import_module(module), name)


class MetricRow(BaseModel):
    what: str  # e.g. "retrieval R@1 (text->image), zero-shot"
    task: str
    dataset: str
    metric: str
    value: float
    baseline: str
    baseline_value: float | None


class PipelineSummary(BaseModel):
    home: Path
    catalog: Path
    report: Path | None
    runs: dict[str, str]  # stage (or stage/what) -> run id used
    ran: list[str]  # stages run now (the rest were taken from the catalog)
    seconds: dict[str, float]
    metrics: list[MetricRow]


# --- resolving a stage that is not run from the catalog ---------------------------------------------


def latest_run(
    home: Path | None, stage: str, where: dict[str, Any] | None = None, unless: dict[str, Any] | None = None
) -> Any:
    """The newest finished run of `stage` whose params contain `where` (and not all of `unless`, when
    given); a clear error when there is none."""
    layout = layout_for(home)
    if not layout.catalog.is_file():
        raise LookupError(
            f"no finished {stage} run: there is no catalog at {layout.catalog} yet; run the pipeline from "
            "its first stage (blip2 pipeline) or point --home at an existing one"
        )
    with catalog_session(layout, read_only=True) as cat:
        runs = [r for r in cat.runs(stage) if r.status == "done"]
    runs = [r for r in runs if all(r.params.get(k) == v for k, v in (where or {}).items())]
    if unless:
        runs = [r for r in runs if not all(r.params.get(k) == v for k, v in unless.items())]
    if not runs:
        hint = f" with {where}" if where else ""
        raise LookupError(
            f"no finished {stage} run{hint} in the catalog {layout.catalog}: run that stage first "
            f"(blip2 pipeline --only {stage.split('-')[0]})"
        )
    return runs[-1]


def named_run(home: Path | None, run_id: str, stage: str) -> Any:
    with catalog_session(layout_for(home), read_only=True) as cat:
        run = cat.run(run_id)
    if run is None or run.stage != stage or run.status != "done":
        raise LookupError(f"use: {run_id!r} is not a finished {stage} run in the catalog")
    return run


# --- the flow ----------------------------------------------------------------------------------------


class _Pipeline:
    """The state of one pipeline run: which stages run, their timings and the runs they produced."""

    def __init__(self, params: PipelineParams):
        self.p = params
        self.layout = layout_for(params.home)
        self.home = self.layout.home
        self.corpus = self.home / "corpus"
        self.runs: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.ran: list[str] = []
        self.logger = get_run_logger()

    def params(self, stage: str, model: type[BaseModel], **fields: Any) -> Any:
        return model(**(fields | {"home": self.home} | self.p.overrides.get(stage, {})))

    def runs_now(self, stage: str) -> bool:
        return stage in self.p.stages

    def needed(self, stage: str) -> bool:
        """Whether `stage` runs now or a later stage does (and reads its outputs from the catalog)."""
        return any(STAGES.index(s) >= STAGES.index(stage) for s in self.p.stages)

    def timed(self, stage: str, fn, *args):
        start = time.perf_counter()
        self.logger.info("pipeline: %s ...", stage)
        out = fn(*args)
        self.seconds[stage] = round(time.perf_counter() - start, 1)
        self.ran.append(stage)
        self.logger.info("pipeline: %s done in %.0f s", stage, self.seconds[stage])
        return out

    def resolved(self, stage: str, catalog_stage: str, where: dict | None = None, unless: dict | None = None):
        run_id = self.p.use.get(stage)
        run = (
            named_run(self.home, run_id, catalog_stage)
            if run_id
            else latest_run(self.home, catalog_stage, where, unless)
        )
        self.logger.info("pipeline: %s taken from the catalog: run %s", stage, run.run_id)
        return run

    def corpus_file(self, key: str) -> Path:
        files = json.loads((self.corpus / "corpus.json").read_text(encoding="utf-8"))["files"]
        return self.corpus / files[key]


@flow(name="pipeline", log_prints=True)
def pipeline_flow(params: PipelineParams) -> PipelineSummary:
    """The miniature replication: every stage as a subflow (see the module docstring)."""
    import torch

    if params.threads:
        torch.set_num_threads(params.threads)
    pl = _Pipeline(params)
    _ingest(pl)
    # A stage after the last one asked for is neither run nor looked up: `--only ingest teachers` must not
    # fail for want of a stage-2 run.
    teachers = _teachers(pl) if pl.needed("teachers") else None
    capfilt_hash = _capfilt(pl, teachers) if pl.needed("capfilt") else None
    stage1 = _stage1(pl, teachers, capfilt_hash) if pl.needed("stage1") else None
    stage2, ablation = _stage2(pl, teachers, capfilt_hash, stage1) if pl.needed("stage2") else (None, None)
    finetuned = _finetune(pl, teachers, stage1, stage2) if pl.needed("finetune") else {}
    metrics = _evaluate(pl, teachers, stage1, stage2, ablation, finetuned)
    report = _report(pl, stage2, ablation, capfilt_hash)
    summary = PipelineSummary(
        home=pl.home,
        catalog=pl.layout.catalog,
        report=report,
        runs=pl.runs,
        ran=pl.ran,
        seconds=pl.seconds,
        metrics=metrics,
    )
    create_table_artifact(
        [
            {
                "result": m.what,
                "value": round(m.value, 4),
                "baseline": m.baseline,
                "baseline value": None if m.baseline_value is None else round(m.baseline_value, 4),
            }
            for m in metrics
        ],  # fmt: skip
        key=artifact_key("pipeline", "metrics"),
        description="the miniature replication's metrics beside their baselines",
    )
    return summary


def _ingest(pl: _Pipeline) -> None:
    from flows.demo import CorpusIngestParams, corpus_ingest_flow

    if not pl.runs_now("ingest"):
        return
    p = pl.params(
        "ingest",
        CorpusIngestParams,
        seed=pl.p.seed,
        n_pretrain=pl.p.n_pretrain,
        n_coco=pl.p.n_coco,
        n_vqa_images=pl.p.n_vqa_images,
        n_retrieval=pl.p.n_retrieval,
        n_teacher=pl.p.n_teacher,
    )
    summaries = pl.timed("ingest", corpus_ingest_flow, p)
    for source, s in summaries.items():
        pl.runs[f"ingest/{source}"] = s.run_id


def _teachers(pl: _Pipeline):
    from flows.teachers import TeachersParams, TeachersSummary, teachers_flow

    if pl.runs_now("teachers"):
        p = pl.params("teachers", TeachersParams, corpus=pl.corpus, seed=pl.p.seed, threads=pl.p.threads)
        summary = pl.timed("teachers", teachers_flow, p)
    else:
        run = pl.resolved("teachers", "teachers")
        summary = TeachersSummary.model_validate(run.summary | {"run_id": run.run_id})
    pl.runs["teachers"] = summary.run_id
    return summary


def _capfilt(pl: _Pipeline, teachers) -> str:
    from flows.capfilt import CapFiltParams, RankerParams, capfilt_flow

    if pl.runs_now("capfilt"):
        ranker = RankerParams(
            model=teachers.clip_model, weights=teachers.clip_weights, config=teachers.clip_config
        )
        p = pl.params(
            "capfilt",
            CapFiltParams,
            sources=(PRETRAIN_SOURCE,),
            captioner=teachers.captioner,
            ranker=ranker,
            device="cpu",
            shards_per_task=1,
        )
        summary = pl.timed("capfilt", capfilt_flow, p)
        pl.runs["capfilt"] = summary.run_id
        return summary.config_hash
    run = pl.resolved("capfilt", "capfilt")
    pl.runs["capfilt"] = run.run_id
    return run.config_hash


def _train_fields(pl: _Pipeline, teachers, steps: int) -> dict:
    return {
        "preset": str(teachers.preset),
        "steps": steps,
        "batch_size": pl.p.batch_size,
        "seed": pl.p.seed,
        "num_workers": 1,
        "swap_left_right": True,  # flipped images: "on the left" becomes "on the right"
        "ckpt_every": max(steps, 1),
    }


def _stage1(pl: _Pipeline, teachers, capfilt_hash: str) -> str:
    from flows.train import Stage1Params, stage1_flow

    if pl.runs_now("stage1"):
        p = pl.params(
            "stage1",
            Stage1Params,
            sources=(PRETRAIN_SOURCE,),
            capfilt=capfilt_hash,
            tokenizer=teachers.wordpiece,
            **_train_fields(pl, teachers, pl.p.stage1_steps),
        )
        run_id = pl.timed("stage1", stage1_flow, p).run_id
    else:
        run_id = pl.resolved("stage1", "stage1").run_id
    pl.runs["stage1"] = run_id
    return run_id


def _stage2(pl: _Pipeline, teachers, capfilt_hash: str, stage1: str) -> tuple[str, str | None]:
    from flows.train import Stage2Params, stage2_flow

    def params(stage: str, stage1_run: str | None) -> Stage2Params:
        fields = _train_fields(pl, teachers, pl.p.stage2_steps)
        fields |= {"ckpt_every": -(-pl.p.stage2_steps // FIGURE5_POINTS), "keep_last": None}
        return pl.params(
            stage,
            Stage2Params,
            sources=(PRETRAIN_SOURCE,),
            capfilt=capfilt_hash,
            stage1_run=stage1_run,
            **fields,
        )

    if pl.runs_now("stage2"):
        with_stage1 = pl.timed("stage2", stage2_flow, params("stage2", stage1)).run_id
    else:
        # The untrained bridge (evaluate's baseline) is a newer stage-2 run from the same stage-1 run.
        unless = {"lr": UNTRAINED_BRIDGE_LR}
        with_stage1 = pl.resolved("stage2", "stage2", {"stage1_run": stage1}, unless).run_id
    ablation = None
    if pl.runs_now("figure5"):
        ablation = pl.timed("figure5", stage2_flow, params("figure5", None)).run_id
    elif "figure5" in pl.p.use or pl.runs_now("evaluate") or pl.runs_now("report"):
        try:
            ablation = pl.resolved("figure5", "stage2", {"stage1_run": None}).run_id
        except LookupError as err:
            pl.logger.warning("no stage-2 run without stage 1 to draw Figure 5 with: %s", err)
    pl.runs["stage2"] = with_stage1
    if ablation:
        pl.runs["stage2 without stage1"] = ablation
    return with_stage1, ablation


def _finetune(pl: _Pipeline, teachers, stage1: str, stage2: str) -> dict[str, str]:
    from flows.finetune import FinetuneParams, finetune_flow, finetune_stage

    coco_train = pl.corpus_file("coco_captions_train")
    common = {
        "steps": pl.p.finetune_steps,
        "batch_size": pl.p.batch_size,
        "warmup_steps": 10,
        "num_workers": 0,
        "seed": pl.p.seed,
        "images": (pl.corpus,),
        "tokenizer": teachers.wordpiece,
        "ckpt_every": pl.p.finetune_steps,
        "lr": 1e-4,
        "crop_scale_min": 0.9,
    }
    tasks = {
        "caption": {"start_run": stage2, "annotations": (coco_train,), "image_size": 64},
        "vqa": {
            "start_run": stage2,
            "annotations": (pl.corpus_file("vqa_annotations_train"),),
            "questions": (pl.corpus_file("vqa_questions_train"),),
            "image_pattern": "images/vqa_train/{image_id:07d}.jpg",
            "image_size": 64,
        },
        "retrieval": {"start_run": stage1, "annotations": (coco_train,), "image_size": 64},
    }
    out: dict[str, str] = {}
    for task, fields in tasks.items():
        stage = finetune_stage(task)
        if pl.runs_now("finetune"):
            p = pl.params("finetune", FinetuneParams, task=task, **(common | fields))
            out[task] = pl.timed(stage, finetune_flow, p).run_id
        else:
            out[task] = pl.resolved("finetune", stage).run_id
        pl.runs[stage] = out[task]
    return out


def _majority_predictions(pl: _Pipeline) -> Path:
    """A VQA results file answering every validation question with the commonest training answer."""
    train = json.loads(pl.corpus_file("vqa_annotations_train").read_text(encoding="utf-8"))["annotations"]
    answer = Counter(a["multiple_choice_answer"] for a in train).most_common(1)[0][0]
    questions = json.loads(pl.corpus_file("vqa_questions_val").read_text(encoding="utf-8"))["questions"]
    path = pl.home / "baselines" / "vqa_majority_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    from blip2_core.fileio import atomic_write_text

    atomic_write_text(
        path, json.dumps([{"question_id": q["question_id"], "answer": answer} for q in questions])
    )
    return path


def _untrained_bridge(pl: _Pipeline, teachers, stage1: str) -> str:
    """The captioning baseline: stage 2 from the same stage-1 run, its bridge left as initialised
    (one step at a learning rate of 1e-12: the checkpoint holds the initial weights)."""
    from flows.train import Stage2Params, stage2_flow

    fields = _train_fields(pl, teachers, 1) | {"lr": UNTRAINED_BRIDGE_LR, "warmup_steps": 0, "resume": False}
    p = Stage2Params(sources=(PRETRAIN_SOURCE,), stage1_run=stage1, home=pl.home, **fields)
    return stage2_flow(p).run_id


def _evaluate(pl: _Pipeline, teachers, stage1, stage2, ablation, finetuned) -> list[MetricRow]:
    from flows.evaluate import EvalSummary, EvaluateParams, evaluate_flow

    if not pl.runs_now("evaluate"):
        return []
    start = time.perf_counter()
    coco_test = pl.corpus_file("coco_captions_test")
    vqa = {
        "annotations": pl.corpus_file("vqa_annotations_val"),
        "questions": pl.corpus_file("vqa_questions_val"),
        "image_pattern": "images/vqa_val/{image_id:07d}.jpg",
    }
    retrieval = {"annotations": pl.corpus_file("retrieval_test"), "k": pl.p.retrieval_k}
    common = {"images": pl.corpus, "tokenizer": teachers.wordpiece, "batch_size": 32, "device": "cpu"}

    def evaluation(task: str, checkpoint: str | None = None, **fields) -> EvalSummary:
        base = {} if checkpoint is None else common | {"checkpoint": checkpoint}
        p = pl.params("evaluate", EvaluateParams, task=task, **(base | fields))
        summary = evaluate_flow(p)
        pl.runs[f"evaluate/{task}/{summary.dataset}/{checkpoint or 'predictions'}"] = summary.run_id
        return summary

    def run(task: str, checkpoint: str | None = None, **fields) -> dict[str, float]:
        return evaluation(task, checkpoint, **fields).metrics

    rows: list[MetricRow] = []

    def row(what, task, dataset, metrics, metric, baseline, baseline_value):
        rows.append(MetricRow(what=what, task=task, dataset=dataset, metric=metric, value=metrics[metric],
                              baseline=baseline, baseline_value=baseline_value))  # fmt: skip

    # Retrieval: zero-shot after stage 1 and fine-tuned, against chance (1 / images).
    n_images = len(json.loads(retrieval["annotations"].read_text())["images"])
    chance = 100.0 / n_images
    for what, run_id in (("zero-shot", stage1), ("fine-tuned", finetuned["retrieval"])):
        m = run("retrieval", run_id, **retrieval)
        row(
            f"retrieval text->image R@1, {what}",
            "retrieval",
            "synth",
            m,
            _metric(m, "img_r1"),
            "chance",
            chance,
        )
        row(
            f"retrieval image->text R@1, {what}",
            "retrieval",
            "synth",
            m,
            _metric(m, "txt_r1"),
            "chance",
            chance,
        )
    # Captioning: zero-shot after stage 2 and fine-tuned, against a stage 2 whose bridge was never trained.
    untrained = _untrained_bridge(pl, teachers, stage1)
    pl.runs["stage2 untrained bridge"] = untrained
    base = run("caption", untrained, annotations=coco_test)
    cider = _metric(base, "CIDEr")
    for what, run_id in (("zero-shot", stage2), ("fine-tuned", finetuned["caption"])):
        m = run("caption", run_id, annotations=coco_test)
        row(
            f"captioning CIDEr, {what}",
            "caption",
            "synth-coco-test",
            m,
            cider,
            "untrained bridge",
            base[cider],
        )
    if ablation:
        m = run("caption", ablation, annotations=coco_test)
        row("captioning CIDEr, stage 2 without stage 1", "caption", "synth-coco-test", m, cider,
            "untrained bridge", base[cider])  # fmt: skip
    # VQA: zero-shot after stage 2 (with and without stage 1: at each checkpoint, Figure 5) and fine-tuned,
    # against the majority answer.
    majority = run("vqa", predictions=_majority_predictions(pl), annotations=vqa["annotations"])
    acc = _metric(majority, "overall")
    # The frozen LLM alone: the untrained bridge gives it no image, so this is its question prior, the part
    # of zero-shot accuracy that owes nothing to the image.
    prior = run("vqa", untrained, **vqa)
    row("VQA accuracy, untrained bridge (the LLM alone)", "vqa", "synth-vqa-val", prior, acc,
        "majority answer", majority[acc])  # fmt: skip
    zero_shot = {"zero-shot": stage2, "fine-tuned": None}
    if ablation:
        zero_shot["zero-shot, stage 2 without stage 1"] = ablation
    answers = {}  # run id -> {step: that checkpoint's predictions file}
    for what, run_id in zero_shot.items():
        if run_id is None:
            m = run("vqa", finetuned["vqa"], **vqa)
        else:
            m, answers[run_id] = _vqa_over_training(
                pl, run_id, lambda checkpoint: evaluation("vqa", checkpoint, **vqa), acc
            )
        row(f"VQA accuracy, {what}", "vqa", "synth-vqa-val", m, acc, "majority answer", majority[acc])
    if ablation:
        gap = _figure5_gap(pl, stage2, answers[stage2], answers[ablation], vqa)
        if gap is not None:
            rows.append(gap)
    pl.seconds["evaluate"] = round(time.perf_counter() - start, 1)
    pl.ran.append("evaluate")
    return rows


def _vqa_over_training(
    pl: _Pipeline, run_id: str, evaluate, metric: str
) -> tuple[dict[str, float], dict[int, str | None]]:
    """Zero-shot VQA of every checkpoint a stage-2 run kept, oldest first: the metrics of the last, the
    run's result (evaluated last, so that the catalog's evaluation of the run is the final one), and each
    checkpoint's predictions file by step. Each checkpoint's `metric` also goes to the run's metrics as
    FIGURE5_METRIC at its step: Figure 5's curve."""
    from flows.reports import FIGURE5_METRIC

    with catalog_session(pl.layout, read_only=True) as cat:
        checkpoints = [c for c in cat.checkpoints(run_id) if Path(c.path).is_dir()]
    if not checkpoints:
        return evaluate(run_id).metrics, {}
    predictions = {}
    for checkpoint in checkpoints:
        summary = evaluate(checkpoint.path)
        predictions[checkpoint.step] = summary.predictions
        with catalog_session(pl.layout) as cat:
            cat.log_metrics(run_id, checkpoint.step, {FIGURE5_METRIC: summary.metrics[metric]})
    return summary.metrics, predictions


def _figure5_gap(pl: _Pipeline, with_run: str, with_answers: dict, without_answers: dict, vqa: dict):
    """Figure 5's verdict: at every step both runs were evaluated at, the zero-shot VQA accuracy of the run
    from stage 1 minus that of the run without, question by question, with its standard error. Both go to
    the run from stage 1's metrics (FIGURE5_GAP_METRIC, FIGURE5_GAP_SE_METRIC) for the report; the row of
    the last step is returned, its baseline the noise (two standard errors) the gap must exceed."""
    from blip2_core.metrics import load_vqa_annotations, load_vqa_results, paired_vqa_difference
    from flows.reports import FIGURE5_GAP_METRIC, FIGURE5_GAP_SE_METRIC

    steps = sorted(set(with_answers) & set(without_answers))
    steps = [s for s in steps if with_answers[s] and without_answers[s]]
    if not steps:
        return None
    annotations = load_vqa_annotations(vqa["questions"], vqa["annotations"])
    gaps = {
        step: paired_vqa_difference(
            load_vqa_results(with_answers[step]), load_vqa_results(without_answers[step]), annotations
        )
        for step in steps
    }
    with catalog_session(pl.layout) as cat:
        for step, gap in gaps.items():
            cat.log_metrics(
                with_run, step, {FIGURE5_GAP_METRIC: gap.difference, FIGURE5_GAP_SE_METRIC: gap.se}
            )
    last = gaps[steps[-1]]
    return MetricRow(what="Figure 5: zero-shot VQA, stage 1's lead (points)", task="vqa",
                     dataset="synth-vqa-val", metric=FIGURE5_GAP_METRIC, value=last.difference,
                     baseline="noise (2 SE, paired)", baseline_value=2 * last.se)  # fmt: skip


def _metric(metrics: dict[str, float], name: str) -> str:
    """The key of `name` in an evaluation's metrics (exact, else the one ending in it)."""
    if name in metrics:
        return name
    matches = [k for k in metrics if k.endswith(name) or k.lower() == name.lower()]
    if not matches:
        raise KeyError(f"evaluation reported no {name!r}: it has {sorted(metrics)}")
    return matches[0]


def _report(pl: _Pipeline, stage2: str, ablation: str | None, capfilt_hash: str) -> Path | None:
    from flows.reports import ReportParams, report_flow

    if not pl.runs_now("report"):
        return None
    run_ids = sorted(set(pl.runs.values()))
    p = pl.params(
        "report",
        ReportParams,
        run_ids=tuple(run_ids),
        title="BLIP-2 miniature replication",
        figure5=(stage2, ablation) if ablation else None,
        capfilt=(capfilt_hash,),
    )
    return pl.timed("report", report_flow, p)
