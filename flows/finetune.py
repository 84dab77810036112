"""`finetune`: captioning, VQA and retrieval fine-tuning (SPEC.md, "Downstream tasks") as Prefect flows.

`finetune_flow(FinetuneParams(task=..., start_run=..., annotations=..., images=...))`:
  1. Resolve the start from the catalog: the run's latest recorded checkpoint and its model config
     (`blip2_config.json` in the run folder). Captioning and VQA start from a finished stage-2 run,
     retrieval from a finished stage-1 run; any of them may also start from a finished fine-tuning run of
     the same task. VQA also reads the Q-Former's text branch (which stage 2 drops) from the stage-1
     checkpoint the stage-2 run started from, and the BERT-style tokenizer follows the same lineage
     (each run's job.json), unless `tokenizer` is given.
  2. Read the training records (COCO captions JSON; VQAv2 questions + annotations or Visual Genome
     question_answers.json) or, for captioning, catalog sources of ingested shards, and fail early on a
     missing file or image.
  3. Start a catalog run (stage `finetune-<task>`), write config.json, blip2_config.json (the fine-tuned
     model's config, image size included, where evaluation and export look for it) and job.json.
  4. Train with `blip2_core.train.train` (the one training loop), layer-wise lr decay on the image
     tower: in this process when nproc == 1, else `torchrun --nproc_per_node N -m flows.downstream_entry
     job.json` (DDP; gloo on CPU, nccl on GPU; `batch_size` is the global batch, split over the ranks),
     launched and streamed to <run_dir>/log as the pretraining flows do. Either way rank 0's metrics.jsonl
     is tailed into the catalog.
  5. Finish the run with a summary; the checkpoints are recorded in the catalog.

Resuming (`resume`, as stage 1/2 do): the parameters hash to the run's config hash; a new flow run with
the same hash continues the newest such run that left a checkpoint (or the `run_id` given): its latest
checkpoint is hard-linked into the new run's folder, where the trainer resumes it (weights, optimizer,
schedule, data position, RNG), and a run still 'running' whose process is gone is closed as failed. A
finished run whose last checkpoint is already the target step is the result itself: no new run.

On the synthetic corpus (`data_catalog.synth`, folder C, corpus.json "files"):
    caption:   annotations=(C/coco/annotations/captions_train.json,), images=(C,)
    retrieval: same files, start_run = a stage-1 run
    vqa:       annotations=(C/vqa/v2_synth_train_annotations.json,),
               questions=(C/vqa/v2_OpenEnded_synth_train_questions.json,),
               images=(C/images/vqa_train,), image_pattern="{image_id:07d}.jpg"
    with image_size=64 (or 72, 80: interpolated) for the tiny preset, whose tower is 64 px.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, model_validator

from blip2_core.checkpoints import WEIGHTS_FILE
from blip2_core.config import Blip2Config, config_from_dict, config_to_dict
from blip2_core.fileio import atomic_write_text
from blip2_core.hf_interop import RUN_CONFIG_FILE
from data_catalog import Catalog
from data_catalog.layout import Layout
from flows.common import catalog_session, flow_run_id, layout_for, source_lock
from flows.train import (
    RunReporter,
    already_finished,
    close_stale_run,
    config_hash,
    find_previous,
    latest_recorded_checkpoint,
    log_to_file,
    resolve_precision,
    seed_checkpoint,
    train_with_torchrun,
    watch,
)

PAPER_BATCH = {"caption": 256, "vqa": 128, "retrieval": 224}
START_STAGES = {"caption": ("stage2",), "vqa": ("stage2",), "retrieval": ("stage1",)}
JOB_FILE = "job.json"


def finetune_stage(task_name: str) -> str:
    """The catalog stage of a fine-tuning run: finetune-caption, finetune-vqa, finetune-retrieval."""
    return f"finetune-{task_name}"


class FinetuneParams(BaseModel):
    """A fine-tuning run. Unset numbers take the paper's values (SPEC.md); paths may be relative.

    Data, by task:
    - caption:   `annotations` = COCO captions JSON files (`images[].file_name` relative to the matching
                 `images` folder), or `sources` = catalog sources of ingested shards (their captions).
    - vqa:       `annotations` = VQAv2 annotations JSON files, each with its `questions` JSON file (same
                 order), and/or Visual Genome question_answers.json files (no questions file: list them
                 after the VQAv2 ones); images found by `image_pattern` under the matching `images` folder.
    - retrieval: `annotations` = COCO captions JSON files (several captions per image: same-image
                 positives).
    `images` holds one folder per annotations file, or one folder for all of them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["caption", "vqa", "retrieval"]
    start_run: str = Field(description="catalog run id: stage-2 (caption, vqa) / stage-1 (retrieval) run")
    annotations: tuple[Path, ...] = Field((), description="training annotation files (see above)")
    questions: tuple[Path, ...] = Field(
        (), description="vqa: VQAv2 questions files, one per VQAv2 annotations"
    )
    images: tuple[Path, ...] = Field((), description="image folder per annotations file, or one for all")
    image_pattern: str = Field(
        "{image_id}.jpg",
        description="vqa: image file name from its id, e.g. COCO_train2014_{image_id:012d}.jpg",
    )
    sources: tuple[str, ...] = Field((), description="caption: catalog sources of ingested shards")
    image_size: int | None = Field(
        None, ge=16, description="default: the paper's, 364 (caption, retrieval) / 490 (vqa)"
    )
    steps: int | None = Field(None, ge=1, description="optimizer steps; default: `epochs` over the data")
    epochs: float = Field(5.0, gt=0, description="used when steps is unset")
    batch_size: int | None = Field(None, ge=1, description="default: the paper's 256 / 128 / 224")
    lr: float | None = Field(None, gt=0, description="peak lr; default 1e-5 (retrieval with ViT-L: 5e-6)")
    min_lr: float = Field(0.0, ge=0, description="cosine floor")
    warmup_steps: int = Field(1000, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    layer_decay: float | None = Field(0.95, gt=0, le=1, description="ViT layer-wise lr decay (None: off)")
    prompt: str = Field("a photo of ", description="caption: the text the caption follows")
    hflip: bool = Field(False, description="random horizontal flips (captions naming left/right get wrong)")
    crop_scale_min: float = Field(0.5, gt=0, le=1, description="random resized crop scale (min, 1.0)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tokenizer: Path | None = Field(None, description="BERT-style tokenizer; default: the start run's lineage")
    num_workers: int = Field(2, ge=0, description="DataLoader processes per training process")
    nproc: int = Field(1, ge=1, description="training processes (1: in the flow process; >1: torchrun)")
    seed: int = 0
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(1000, ge=1, description="steps between checkpoints (the last step always)")
    keep_last: int | None = Field(2, ge=1)
    resume: bool = Field(True, description="continue the newest run with the same config hash")
    run_id: str | None = Field(None, description="continue this run (same config hash) instead")
    home: Path | None = Field(None, description="data root; default $BLIP2_HOME or ./var")

    @model_validator(mode="after")
    def _check_data(self) -> FinetuneParams:
        if not self.annotations and not self.sources:
            raise ValueError(f"{self.task} fine-tuning needs annotations (or, for caption, sources)")
        if self.sources and self.task != "caption":
            raise ValueError("sources (ingested shards) are only read for caption fine-tuning")
        if self.annotations and len(self.images) not in (1, len(self.annotations)):
            raise ValueError(
                f"images: give one folder, or one per annotations file ({len(self.annotations)}); "
                f"got {len(self.images)}"
            )
        return self


class FinetuneSummary(BaseModel):
    run_id: str
    task: str
    stage: str
    config_hash: str
    run_dir: Path
    start_run: str
    start_checkpoint: str
    image_size: int
    records: int  # training examples (or shard samples)
    steps: int
    step: int  # reached, counting the steps of the run it continued
    start_step: int = 0  # where this run began (0, or the continued checkpoint's step)
    resumed_from: str | None = None  # the checkpoint this run started from (in its own folder)
    resumed_from_run: str | None = None
    loss: float | None
    losses: dict[str, float]
    samples_per_s: float | None
    last_checkpoint: str | None


# --- resolving the start ----------------------------------------------------------------------------


def run_config(run_dir: Path) -> Blip2Config:
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"run folder {run_dir} has no {RUN_CONFIG_FILE} (the run's model config)")
    return config_from_dict(json.loads(path.read_text()), source=str(path))


def _job(run_dir: Path) -> dict:
    path = run_dir / JOB_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def lineage(run_dir: Path) -> dict[str, str | None]:
    """What a run's job.json says about its ancestors: `tokenizer` and `stage1_checkpoint`, followed from
    a fine-tuning or stage-2 run back to the stage-1 run (checkpoint folder = <run>/checkpoints/step-N)."""
    found: dict[str, str | None] = {"tokenizer": None, "stage1_checkpoint": None}
    folder: Path | None = run_dir
    for _ in range(4):  # finetune -> stage2 -> stage1 at most
        if folder is None:
            break
        job = _job(folder)
        for key in found:
            found[key] = found[key] or job.get(key)
        upstream = job.get("start_checkpoint") or job.get("stage1_checkpoint")
        folder = Path(upstream).parents[1] if upstream else None
    return found


def resolve_start(cat: Catalog, layout: Layout, params: FinetuneParams) -> dict[str, Any]:
    """Start checkpoint(s), model config and tokenizer of the run to fine-tune from."""
    rec = cat.run(params.start_run)
    allowed = (*START_STAGES[params.task], finetune_stage(params.task))
    if rec is not None and rec.stage not in allowed:
        raise ValueError(
            f"start_run {params.start_run!r} is a {rec.stage!r} run; {params.task} fine-tuning starts from a "
            f"{' or '.join(allowed)} run"
        )
    checkpoint = latest_recorded_checkpoint(cat, params.start_run, "start_run")
    run_dir = layout.run_dir(rec.stage, rec.run_id)
    cfg = run_config(run_dir)
    found = lineage(run_dir)
    files = [str(checkpoint)]
    if params.task == "vqa" and rec.stage == "stage2":
        if not found["stage1_checkpoint"] or not (Path(found["stage1_checkpoint"]) / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"start_run {params.start_run!r}: VQA needs the Q-Former text branch of the stage-1 "
                f"checkpoint it started from, and {found['stage1_checkpoint']!r} is not on disk"
            )
        files.insert(0, found["stage1_checkpoint"])  # text branch first; stage 2's weights win
    tokenizer = params.tokenizer or found["tokenizer"]
    if params.task != "caption" and (tokenizer is None or not Path(tokenizer).is_dir()):
        raise ValueError(
            f"{params.task} fine-tuning needs the Q-Former's BERT-style tokenizer; the lineage of "
            f"{params.start_run!r} gives {tokenizer!r}: pass tokenizer"
        )
    if tokenizer is not None:
        tokenizer = str(Path(tokenizer).resolve())
    return {"checkpoint": str(checkpoint), "files": files, "config": cfg, "tokenizer": tokenizer}


# --- data -------------------------------------------------------------------------------------------


def _folders(params: FinetuneParams) -> list[Path]:
    return [
        Path(p).resolve()
        for p in (params.images * len(params.annotations) if len(params.images) == 1 else params.images)
    ]


def read_records(params: FinetuneParams) -> list:
    """Every training record of the annotation files (raises naming the bad file or image)."""
    from blip2_core.finetune import annotation_records

    if not params.images:
        raise ValueError("images: give the image folder of the annotations files")
    annotations = [Path(a).resolve() for a in params.annotations]
    questions = [Path(q).resolve() for q in params.questions]
    records = annotation_records(params.task, annotations, _folders(params), questions, params.image_pattern)
    if not records:
        raise ValueError(f"annotations {list(map(str, params.annotations))} hold no training examples")
    return records


def shard_paths(cat: Catalog, sources: tuple[str, ...]) -> tuple[list[str], int]:
    """Tar paths and sample count of catalog sources (caption fine-tuning from ingested shards)."""
    paths, samples = [], 0
    known = {s.name for s in cat.sources()}
    for name in sources:
        if name not in known:
            raise ValueError(
                f"unknown source {name!r}; the catalog has: {', '.join(sorted(known)) or 'none'}"
            )
        shards = cat.shards(name)
        if not shards:
            raise ValueError(f"source {name!r} has no registered shards: run `blip2 ingest` first")
        paths += [str(s.tar_path) for s in shards]
        samples += sum(s.samples_ok for s in shards)
    return paths, samples


def plan(params: FinetuneParams, start: dict, n_records: int, shards: list[str]) -> dict:
    """The job: everything the trainer needs, as plain values (its hash keys the run)."""
    from blip2_core.finetune import PAPER_IMAGE_SIZE, finetune_config

    base: Blip2Config = start["config"]
    size = params.image_size or PAPER_IMAGE_SIZE[params.task]
    cfg = finetune_config(base, size)
    raw = config_to_dict(cfg)
    if params.task == "caption":
        raw["llm"]["prompt"] = params.prompt  # generation after fine-tuning uses the same prompt by default
    batch = params.batch_size or PAPER_BATCH[params.task]
    if batch % params.nproc:
        raise ValueError(f"batch_size {batch} must be a multiple of nproc {params.nproc}")
    batches = n_records // batch
    if batches < 1:
        raise ValueError(f"batch_size {batch} is larger than the {n_records} training examples")
    steps = params.steps or max(1, round(params.epochs * batches))
    vit_l = "ViT-L" in base.vision.model_name
    lr = params.lr or (5e-6 if params.task == "retrieval" and vit_l else 1e-5)
    train = {
        "steps": steps, "lr": lr, "min_lr": min(params.min_lr, lr), "warmup_steps": params.warmup_steps,
        "betas": [0.9, 0.999], "weight_decay": params.weight_decay,
        "precision": resolve_precision(params.precision), "seed": params.seed,
        "log_every": params.log_every, "ckpt_every": params.ckpt_every, "keep_last": params.keep_last,
        # DDP: VQA keeps the Q-Former's text branch, whose LM head the answer loss never reaches.
        "find_unused_parameters": params.task == "vqa",
    }  # fmt: skip
    return {
        "kind": "finetune",  # flows.downstream_entry runs it
        "task": params.task,
        "config": raw,
        "start_checkpoint": start["checkpoint"],
        "start_files": start["files"],
        "tokenizer": start["tokenizer"],
        "annotations": [str(Path(a).resolve()) for a in params.annotations],
        "questions": [str(Path(q).resolve()) for q in params.questions],
        "images": [str(f) for f in _folders(params)] if params.annotations else [],
        "image_pattern": params.image_pattern,
        "shards": shards,
        "batch_size": batch // params.nproc,  # per rank
        "world_size": params.nproc,
        "layer_decay": params.layer_decay,
        "hflip": params.hflip,
        "crop_scale_min": params.crop_scale_min,
        "num_workers": params.num_workers,
        "seed": params.seed,
        "train": train,
    }


# --- training ---------------------------------------------------------------------------------------


@task(name="finetune-in-process", cache_policy=NO_CACHE)
def finetune_in_process(job_path: str) -> dict:
    """The trainer in the flow process (CPU or one GPU); its log lines go to <run_dir>/log."""
    from flows.downstream_entry import run_finetune_job

    with log_to_file(Path(job_path).parent / "log"):
        return run_finetune_job(job_path)


# --- the flow ---------------------------------------------------------------------------------------


@flow(name="finetune", log_prints=True)
def finetune_flow(params: FinetuneParams) -> FinetuneSummary:
    """Fine-tune a stage-2 (caption, VQA) or stage-1 (retrieval) run; the new run lands in the catalog."""
    layout = layout_for(params.home)
    stage = finetune_stage(params.task)
    with catalog_session(layout) as cat:
        start = resolve_start(cat, layout, params)
        shards, samples = shard_paths(cat, params.sources) if params.sources else ([], 0)
    n_records = samples if shards else len(read_records(params))
    job = plan(params, start, n_records, shards)
    chash = config_hash(job)
    with catalog_session(layout) as cat:
        previous = find_previous(cat, layout, stage, chash, params)
        steps = job["train"]["steps"]
        finished = already_finished(cat, stage, params, previous, steps, FinetuneSummary)
        if finished is not None:
            return finished
        run_params = params.model_dump(mode="json") | {"resumes": previous[0] if previous else None}
        run_id = cat.start_run(stage, chash, run_params, flow_run_id())
    run_dir = layout.run_dir(stage, run_id)
    try:
        with source_lock(run_dir):
            return _finetune_run(params, layout, stage, run_id, run_dir, job, chash, n_records, previous)
    except BaseException as err:
        status = "cancelled" if isinstance(err, KeyboardInterrupt) else "failed"
        with catalog_session(layout) as cat:
            if cat.run(run_id).status == "running":
                cat.finish_run(run_id, status, {"error": f"{type(err).__name__}: {err}"})
        raise


def _continue(layout: Layout, stage: str, run_id: str, run_dir: Path, previous: tuple[str, Path]) -> Path:
    """Close the earlier run if it was killed, and seed its latest checkpoint into this run's folder."""
    with catalog_session(layout) as cat:
        close_stale_run(cat, layout, stage, previous[0], run_id)
    resumed_from = seed_checkpoint(previous[1], run_dir)
    with catalog_session(layout) as cat:
        cat.record_checkpoint(run_id, int(resumed_from.name.removeprefix("step-")), str(resumed_from))
    get_run_logger().info("%s %s continues run %s from %s", stage, run_id, previous[0], previous[1])
    return resumed_from


def _finetune_run(params, layout, stage, run_id, run_dir, job, chash, n_records, previous) -> FinetuneSummary:
    logger = get_run_logger()
    steps = job["train"]["steps"]
    resumed_from = None if previous is None else _continue(layout, stage, run_id, run_dir, previous)
    start = 0 if resumed_from is None else int(resumed_from.name.removeprefix("step-"))
    atomic_write_text(run_dir / JOB_FILE, json.dumps(job, indent=1, sort_keys=True))
    record = {"stage": stage, "run_id": run_id, "config_hash": chash, "job": job}
    record["params"] = params.model_dump(mode="json")
    atomic_write_text(run_dir / "config.json", json.dumps(record, indent=1, sort_keys=True))
    atomic_write_text(run_dir / RUN_CONFIG_FILE, json.dumps(job["config"], indent=1))
    logger.info(
        "%s run %s from %s: %d step(s) from %d, %d process(es), batch %d per process, %d px, %d examples, "
        "folder %s",
        *(stage, run_id, job["start_checkpoint"], steps, start, params.nproc, job["batch_size"]),
        *(job["config"]["vision"]["image_size"], n_records, run_dir),
    )  # fmt: skip
    reporter = RunReporter(layout, run_id, run_dir, start, steps, stage)
    job_path = str(run_dir / JOB_FILE)
    if params.nproc == 1:
        future = finetune_in_process.submit(job_path)
    else:
        future = train_with_torchrun.submit(job_path, params.nproc, "flows.downstream_entry")
    watch(future, reporter)
    result = reporter.result or {}
    speeds = [s for s in reporter.speeds if s > 0]
    summary = FinetuneSummary(
        run_id=run_id, task=params.task, stage=stage, config_hash=chash, run_dir=run_dir,
        start_run=params.start_run, start_checkpoint=job["start_checkpoint"],
        image_size=job["config"]["vision"]["image_size"], records=n_records, steps=steps,
        step=int(result.get("step", start)), start_step=start, loss=result.get("loss"),
        resumed_from=None if resumed_from is None else str(resumed_from),
        resumed_from_run=None if previous is None else previous[0],
        losses={k: v for k, v in reporter.last_metrics.items() if k == "loss" or k.startswith("loss_")},
        samples_per_s=sum(speeds) / len(speeds) if speeds else None,
        last_checkpoint=result.get("last_checkpoint") or reporter.last_checkpoint,
    )  # fmt: skip
    with catalog_session(layout) as cat:
        cat.finish_run(run_id, "done", summary.model_dump(mode="json"))
    logger.info("%s run %s done: step %d, loss %s", stage, run_id, summary.step, summary.loss)
    return summary


__all__ = ["FinetuneParams", "FinetuneSummary", "finetune_flow", "finetune_stage", "lineage"]
