"""The pretraining stages: `stage1` (Q-Former representation learning) and `stage2` (generative, frozen LLM).

Both flows do the same five things; only the model side of the job differs:
  1. Resolve the inputs from the catalog and the disk, never from another flow's memory: the preset, the
     shards of each source, which of them have a finished CapFilt sidecar, the tokenizer / BERT init
     (stage 1), the stage-1 run's latest checkpoint and the LLM folder (stage 2).
  2. Hash what determines the training trajectory (everything but `steps` and bookkeeping) and, with
     `resume`, find the newest run of the same stage and hash that left a checkpoint (or the `run_id`
     given). Every flow run is a new catalog run in its own folder; continuing one hard-links the earlier
     run's latest checkpoint into the new folder, where the trainer picks it up (data position, RNG,
     optimizer and schedule included), and records it as the new run's first checkpoint.
  3. Write var/runs/<stage>/<run-id>/config.json (resolved config + params) and job.json (what the ranks
     read: paths and numbers only; ranks never open the catalog).
  4. Train: in this process when nproc == 1, else `torchrun --nproc_per_node N -m flows.torchrun_entry
     job.json` (gloo on CPU, nccl on GPU) with its output streamed to <run_dir>/log. Either way rank 0
     appends metrics and checkpoints to <run_dir>/metrics.jsonl, and this flow tails the file into the
     catalog (the one writer) and a progress artifact while training runs, and once more after it ends.
  5. Finish the catalog run (done with a summary; failed or cancelled with the error) and publish a table.
With `job_only`, steps 4 and 5 give way to printing the infra/launch.py command for a multi-node launch:
job.json is written for `nproc` ranks in all, and the run stays 'running' while the cluster trains it.

CapFilt (`capfilt` = a CapFilt config hash): a shard uses its sidecar captions only when its `capfilt`
status under that hash is 'done' (and the sidecar file exists). The other shards of the same source train
on their web captions (`capfilt_missing="web_caption"`, the default; they become a sub-source "<name>.web"
weighted by its share of the source's samples, so the mix is unchanged) or are left out ("skip").
A source with no CapFilt at all (COCO, VG: human captions) is simply all web captions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator

from blip2_core.checkpoints import WEIGHTS_FILE, latest_checkpoint
from blip2_core.config import Blip2Config, config_from_dict, config_to_dict, load_preset
from blip2_core.fileio import atomic_write_text
from blip2_core.hf_interop import RUN_CONFIG_FILE
from data_catalog import CAPFILT_STAGE, Catalog
from data_catalog.layout import Layout
from flows.common import (
    artifact_key,
    catalog_session,
    flow_run_id,
    layout_for,
    require_paths,
    source_lock,
)
from flows.torchrun_entry import EventTail, SourceJob, TrainJob, run_job

_POLL_S = 1.0
_LOG_FILE = "log"
WEB_SUFFIX = ".web"  # the sub-source of a source's shards that have no finished CapFilt sidecar
SummaryT = TypeVar("SummaryT", bound=BaseModel)


# --- parameters and summary ------------------------------------------------------------------------


class SourceParams(BaseModel):
    """A catalog source, its mixing weight, and optionally only some of its shards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    weight: float = Field(1.0, gt=0, description="relative mixing weight")
    shards: tuple[str, ...] | None = Field(
        None, description="registered shard ids (00003) or .tar paths; default: every registered shard"
    )


class TrainParams(BaseModel):
    """What both pretraining stages take. Unset numbers come from the preset's stage section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = Field("tiny", description="preset name or JSON path (blip2_core/presets)")
    sources: tuple[SourceParams, ...] = Field(min_length=1, description="'name', 'name:weight' or objects")
    capfilt: str | None = Field(None, description="CapFilt config hash whose 'done' sidecars give captions")
    capfilt_missing: Literal["web_caption", "skip"] = Field(
        "web_caption", description="shards without a done sidecar: train on web captions, or leave out"
    )
    steps: int | None = Field(None, ge=1, description="optimizer steps in total (a resumed run continues)")
    batch_size: int | None = Field(None, ge=1, description="samples per optimizer step, all processes")
    lr: float | None = Field(None, gt=0, description="peak learning rate")
    min_lr: float | None = Field(None, ge=0, description="cosine floor")
    warmup_steps: int | None = Field(None, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    num_workers: int = Field(2, ge=0, description="DataLoader processes per training process")
    nproc: int = Field(1, ge=1, description="training processes (1: in the flow process; >1: torchrun)")
    job_only: bool = Field(
        False,
        description="write job.json for nproc ranks (every node's) and print the infra/launch.py command; "
        "train nothing here (multi-node launches)",
    )
    seed: int = 0
    swap_left_right: bool = Field(False, description="swap left/right in the captions of flipped images")
    log_every: int = Field(10, ge=1, description="steps between metric lines")
    ckpt_every: int = Field(1000, ge=1, description="steps between checkpoints (the last step always)")
    keep_last: int | None = Field(3, ge=1, description="checkpoints kept on disk (None: all)")
    resume: bool = Field(True, description="continue the newest run with the same config hash")
    run_id: str | None = Field(None, description="continue this run (same config hash) instead")
    home: Path | None = Field(None, description="data root; default $BLIP2_HOME or ./var")

    @field_validator("sources", mode="before")
    @classmethod
    def _parse_sources(cls, value: Any) -> Any:
        """'name' or 'name:weight' strings are accepted beside objects (the CLI's form)."""
        if isinstance(value, str):
            value = [value]
        return [_source_from_text(v) if isinstance(v, str) else v for v in value]

    @field_validator("preset")
    @classmethod
    def _preset_loads(cls, value: str) -> str:
        load_preset(value)  # unknown name, missing file, unknown key or wrong type: refused here
        return value


def _source_from_text(text: str) -> dict:
    name, _, weight = text.partition(":")
    return {"name": name} if not weight else {"name": name, "weight": weight}  # pydantic checks the number


class Stage1Params(TrainParams):
    tokenizer: Path | None = Field(
        None, description="BERT-style tokenizer folder; default: the preset's qformer.init_checkpoint"
    )
    bert_init: Path | None = Field(
        None, description="BERT checkpoint folder for the Q-Former; default: the preset's, if local"
    )


class Stage2Params(TrainParams):
    stage1_run: str | None = Field(
        description="a finished stage-1 run whose latest checkpoint starts stage 2; None (explicitly) starts "
        "from a freshly initialised Q-Former: the paper's Figure 5 ablation without representation learning"
    )
    llm: Path | None = Field(
        None, description="frozen LLM folder (save_pretrained); default: preset llm.name"
    )


class TrainSummary(BaseModel):
    run_id: str
    stage: str
    config_hash: str
    run_dir: Path
    steps: int  # the target
    step: int  # reached, counting the steps of the run it continued
    start_step: int  # where this run began (0, or the continued checkpoint's step)
    loss: float | None
    losses: dict[str, float]  # last logged loss and loss_* values
    samples_per_s: float | None  # mean over this run's log windows
    metrics_logged: int
    last_checkpoint: str | None
    resumed_from: str | None  # the checkpoint this run started from (in its own folder)
    resumed_from_run: str | None
    sources: dict[str, int]  # (sub-)source -> shards
    capfilt_shards: int  # shards read with CapFilt captions
    web_caption_shards: int  # shards of a CapFilt run read with web captions (no done sidecar)
    skipped_shards: int  # left out by capfilt_missing="skip"


# --- resolving the inputs --------------------------------------------------------------------------


def resolved_config(params: TrainParams) -> Blip2Config:
    cfg = load_preset(params.preset)
    if isinstance(params, Stage2Params) and params.llm is not None:
        raw = config_to_dict(cfg)
        raw["llm"]["name"] = str(Path(params.llm).resolve())
        cfg = config_from_dict(raw, source=f"preset {params.preset} with llm={params.llm}")
    return cfg


def _chosen_shards(cat: Catalog, spec: SourceParams) -> list[tuple[str, Path, int]]:
    """(shard id, tar path, samples) of a source: all registered shards, or the ones named."""
    records = {r.shard: r for r in cat.shard_plan(spec.name)}
    if spec.shards is None:
        return [(r.shard, Path(r.tar_path), r.samples_ok) for r in records.values()]
    chosen = []
    for entry in spec.shards:
        if entry.endswith(".tar"):
            path = Path(entry).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"source {spec.name!r}: shard file {path} does not exist")
            rec = records.get(path.stem)
            chosen.append((path.stem, path, rec.samples_ok if rec else _samples_on_disk(path)))
        elif entry in records:
            chosen.append((entry, Path(records[entry].tar_path), records[entry].samples_ok))
        else:
            raise ValueError(
                f"source {spec.name!r} has no registered shard {entry!r} (has {', '.join(sorted(records))})"
            )
    return chosen


def _samples_on_disk(path: Path) -> int:
    from blip2_core.data import shard_sample_count

    return shard_sample_count(path)


def _done_sidecars(cat: Catalog, layout: Layout, capfilt: str | None, source: str) -> set[str]:
    if capfilt is None:
        return set()
    done = {s.shard for s in cat.shard_statuses(CAPFILT_STAGE, capfilt, source) if s.status == "done"}
    return {shard for shard in done if layout.capfilt_sidecar(capfilt, source, shard).is_file()}


def resolve_sources(cat: Catalog, layout: Layout, params: TrainParams) -> tuple[list[SourceJob], dict]:
    """The data sources of the job, split by CapFilt availability, and counts for the summary."""
    known = sorted(s.name for s in cat.sources())
    if params.capfilt is not None and not cat.shard_statuses(CAPFILT_STAGE, params.capfilt):
        raise ValueError(f"no shard has CapFilt output under config hash {params.capfilt!r}")
    jobs: list[SourceJob] = []
    counts = {"capfilt_shards": 0, "web_caption_shards": 0, "skipped_shards": 0}
    for spec in params.sources:
        if spec.name not in known:
            raise ValueError(f"unknown source {spec.name!r}; the catalog has: {', '.join(known) or 'none'}")
        chosen = _chosen_shards(cat, spec)
        if not chosen:
            raise ValueError(f"source {spec.name!r} has no registered shards: run `blip2 ingest` first")
        done = _done_sidecars(cat, layout, params.capfilt, spec.name)
        with_sidecar = [c for c in chosen if c[0] in done]
        without = [c for c in chosen if c[0] not in done]
        if params.capfilt is not None:
            counts["capfilt_shards"] += len(with_sidecar)
            key = "skipped_shards" if params.capfilt_missing == "skip" else "web_caption_shards"
            counts[key] += len(without)
            if params.capfilt_missing == "skip":
                without = []
        jobs += _source_jobs(spec, layout, params.capfilt, with_sidecar, without)
    if not jobs:
        raise ValueError("no shards to train on (capfilt_missing='skip' left every shard out)")
    return jobs, counts


def _source_jobs(spec, layout, capfilt, with_sidecar, without) -> list[SourceJob]:
    """One SourceJob per caption kind; a split source shares its weight by samples, keeping the mix."""
    total = sum(c[2] for c in with_sidecar + without) or 1
    parts = []
    if with_sidecar:
        parts.append((spec.name, with_sidecar, str(layout.capfilt(capfilt, spec.name))))
    if without:
        parts.append((spec.name + WEB_SUFFIX if with_sidecar else spec.name, without, None))
    return [
        SourceJob(
            name=name,
            shards=[str(c[1]) for c in shards],
            sidecar_dir=sidecar_dir,
            weight=spec.weight * (sum(c[2] for c in shards) / total if len(parts) > 1 else 1.0),
        )
        for name, shards, sidecar_dir in parts
    ]


def latest_recorded_checkpoint(cat: Catalog, run_id: str, what: str) -> Path:
    """The newest checkpoint a finished run recorded, checked to be on disk."""
    rec = cat.run(run_id)
    if rec is None:
        raise ValueError(f"{what} {run_id!r} is not a run in the catalog")
    if rec.status != "done":
        raise ValueError(f"{what} {run_id!r} has status {rec.status!r}: start from a finished run")
    recorded = cat.checkpoints(run_id)
    if not recorded:
        raise ValueError(f"{what} {run_id!r} recorded no checkpoint")
    path = Path(recorded[-1].path)
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{what} {run_id!r}: its latest checkpoint {path} is gone from disk")
    return path


def resolve_stage1_checkpoint(cat: Catalog, layout: Layout, run_id: str, cfg: Blip2Config) -> Path:
    """The latest checkpoint the catalog recorded for a finished stage-1 run, checked against our preset."""
    rec = cat.run(run_id)
    if rec is not None and rec.stage != "stage1":
        raise ValueError(f"stage1_run {run_id!r} is a {rec.stage!r} run, not a stage-1 run")
    path = latest_recorded_checkpoint(cat, run_id, "stage1_run")
    config_file = layout.run_dir("stage1", run_id) / "config.json"
    if config_file.is_file():
        theirs = json.loads(config_file.read_text())["config"]
        ours = config_to_dict(cfg)
        for section in ("vision", "qformer"):
            if theirs[section] != ours[section]:
                raise ValueError(
                    f"stage1_run {run_id!r} was trained with another {section} config than preset "
                    f"{cfg.name!r}; use the stage-1 run's preset"
                )
    return path


def _stage1_folders(params: Stage1Params, cfg: Blip2Config) -> tuple[str, str | None]:
    """(tokenizer folder, BERT init folder or None), checked to exist."""
    preset_bert = cfg.qformer.init_checkpoint
    bert = params.bert_init
    if bert is None and preset_bert is not None:
        if not Path(preset_bert).is_dir():
            raise ValueError(
                f"preset {cfg.name!r} initialises the Q-Former from {preset_bert!r}, which is not a local "
                "folder: pass bert_init (a BERT save_pretrained folder)"
            )
        bert = Path(preset_bert)
    tokenizer = params.tokenizer or bert
    if tokenizer is None:
        raise ValueError(
            f"stage 1 needs a BERT-style tokenizer folder and preset {cfg.name!r} names none: pass tokenizer "
            "(e.g. the wordpiece/ folder that blip2_core.teachers writes)"
        )
    for what, folder in (("tokenizer", tokenizer), ("bert_init", bert)):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{what}: {folder} is not a folder")
    _check_tokenizer(Path(tokenizer), cfg)
    return str(Path(tokenizer).resolve()), None if bert is None else str(Path(bert).resolve())


def _check_tokenizer(folder: Path, cfg: Blip2Config) -> None:
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    if size > cfg.qformer.vocab_size:
        raise ValueError(f"tokenizer {folder} has {size} tokens; the Q-Former has {cfg.qformer.vocab_size}")


def _llm_folder(cfg: Blip2Config) -> str:
    folder = Path(cfg.llm.name) if cfg.llm.name else None
    if folder is None or not (folder / "config.json").is_file():
        raise ValueError(
            f"stage 2 needs the frozen LLM as a local save_pretrained folder; preset {cfg.name!r} gives "
            f"{cfg.llm.name!r}: pass llm"
        )
    return str(folder.resolve())


def resolve_precision(name: str) -> str:
    """The precision a job runs at: for "auto", bf16 on a CUDA device that has it, else fp32."""
    if name != "auto":
        return name
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


# --- the job ----------------------------------------------------------------------------------------


def plan_job(stage: str, params: TrainParams, cfg: Blip2Config, sources: list[SourceJob], **model) -> dict:
    """The trajectory-defining part of the job (its hash keys the run), before a run folder exists."""
    stage_cfg = cfg.stage1 if stage == "stage1" else cfg.stage2
    batch = params.batch_size or stage_cfg.batch_size
    per_rank, rest = divmod(batch, params.nproc * params.grad_accum)
    if rest or per_rank == 0:
        raise ValueError(
            f"batch_size {batch} must be a multiple of nproc x grad_accum = "
            f"{params.nproc * params.grad_accum}"
        )
    lr = params.lr or stage_cfg.lr
    train = {
        "lr": lr,
        "min_lr": params.min_lr if params.min_lr is not None else min(stage_cfg.min_lr, lr),
        "warmup_steps": params.warmup_steps if params.warmup_steps is not None else stage_cfg.warmup_steps,
        "betas": [stage_cfg.beta1, stage_cfg.beta2],
        "weight_decay": stage_cfg.weight_decay,
        "grad_accum": params.grad_accum,
        "precision": resolve_precision(params.precision),
        "seed": params.seed,
    }
    return {
        "stage": stage,
        "config": config_to_dict(cfg),
        "sources": [dataclasses.asdict(s) for s in sources],
        "train": train,
        "batch_size": per_rank,
        "seed": params.seed,
        "num_workers": params.num_workers,
        "world_size": params.nproc,
        "swap_left_right": params.swap_left_right,
        **model,
    }


def config_hash(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:12]


def make_job(plan: dict, params: TrainParams, steps: int, run_dir: Path) -> TrainJob:
    train = plan["train"] | {
        "steps": steps,
        "log_every": params.log_every,
        "ckpt_every": params.ckpt_every,
        "keep_last": params.keep_last,
    }
    raw = plan | {"run_dir": str(run_dir), "train": train}
    raw["sources"] = [SourceJob(**s) for s in plan["sources"]]
    return TrainJob(**raw)


# --- continuing an earlier run -----------------------------------------------------------------------


def find_previous(
    cat: Catalog, layout: Layout, stage: str, chash: str, params: TrainParams
) -> tuple[str, Path] | None:
    """(run id, its latest checkpoint on disk) to continue, or None for a fresh run."""
    if params.run_id is not None:
        rec = cat.run(params.run_id)
        if rec is None or rec.stage != stage:
            raise ValueError(f"run_id {params.run_id!r} is not a {stage} run in the catalog")
        if rec.config_hash != chash:
            raise ValueError(
                f"run {params.run_id!r} has config hash {rec.config_hash}, these parameters give {chash}: "
                "continue it with the same parameters (only steps may change)"
            )
        ckpt = latest_checkpoint(layout.run_dir(stage, rec.run_id) / "checkpoints")
        if ckpt is None:
            raise ValueError(f"run {params.run_id!r} left no checkpoint to continue from")
        return rec.run_id, ckpt
    if not params.resume:
        return None
    for rec in reversed(cat.runs(stage)):
        if rec.config_hash == chash:
            ckpt = latest_checkpoint(layout.run_dir(stage, rec.run_id) / "checkpoints")
            if ckpt is not None:
                return rec.run_id, ckpt
    return None


def already_finished(
    cat: Catalog, stage: str, params: BaseModel, previous: tuple[str, Path] | None, steps: int,
    summary_type: type[SummaryT],
) -> SummaryT | None:  # fmt: skip
    """The summary of `previous` when it is a finished run whose last checkpoint is the target step (and no
    `run_id` was asked for): running again would only copy it under a new run id (and give every stage
    after it new inputs)."""
    if params.run_id is not None or previous is None or not previous[1].name.startswith("step-"):
        return None
    rec = cat.run(previous[0])
    if rec is None or rec.status != "done" or int(previous[1].name.removeprefix("step-")) != steps:
        return None
    try:
        summary = summary_type.model_validate(rec.summary)
    except ValueError:  # a summary from an older version of its module: run as before
        return None
    get_run_logger().info(
        "%s: run %s already reached step %d with these parameters; it is the result (start a new one with "
        "resume=False)", stage, rec.run_id, steps,
    )  # fmt: skip
    return summary


def close_stale_run(cat: Catalog, layout: Layout, stage: str, run_id: str, successor: str) -> None:
    """A 'running' run whose folder lock is free was killed: mark it failed before continuing it.
    While its flow still holds the lock, source_lock raises StageBusyError instead."""
    rec = cat.run(run_id)
    if rec is None or rec.status != "running":
        return
    with source_lock(layout.run_dir(stage, run_id)):
        cat.finish_run(
            run_id, "failed", {"error": f"interrupted (its process is gone); continued by {successor}"}
        )


def seed_checkpoint(ckpt: Path, run_dir: Path) -> Path:
    """Hard-link (or copy) a checkpoint folder into <run_dir>/checkpoints/, atomically by rename."""
    final = run_dir / "checkpoints" / ckpt.name
    tmp = final.with_name(f".tmp-seed-{ckpt.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in ckpt.iterdir():
        try:
            os.link(file, tmp / file.name)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(file, tmp / file.name)
    os.rename(tmp, final)
    return final


# --- running the job ---------------------------------------------------------------------------------


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """The trainer's log lines (blip2_core loggers) into the run's log file while training in-process."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("blip2_core")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()


@task(name="train-in-process", cache_policy=NO_CACHE)
def train_in_process(job_path: str) -> None:
    """One process: the trainer runs here, in the flow process (CPU or a single GPU)."""
    job = TrainJob.read(job_path)
    with log_to_file(Path(job.run_dir) / _LOG_FILE):
        run_job(job)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(job_path: str, nproc: int, port: int, module: str = "flows.torchrun_entry") -> list[str]:
    """`module` runs on every rank with the job file: flows.torchrun_entry (pretraining) or
    flows.downstream_entry (fine-tuning, retrieval evaluation)."""
    return [
        sys.executable, "-m", "torch.distributed.run",  # the `torchrun` of this interpreter
        "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", module, job_path,
    ]  # fmt: skip


def _kill_with_parent() -> None:
    """Runs in the child before exec: torchrun dies with the flow process (and takes its ranks along)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@task(name="train-torchrun", cache_policy=NO_CACHE)
def train_with_torchrun(job_path: str, nproc: int, module: str = "flows.torchrun_entry") -> None:
    """nproc ranks under torchrun; stdout and stderr of all ranks go to <run_dir>/log."""
    log_path = Path(job_path).parent / _LOG_FILE
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            torchrun_command(job_path, nproc, free_port(), module),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_kill_with_parent,
        )
        try:
            code = proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"torchrun exited with status {code}; log {log_path}:\n" + "\n".join(tail))


class RunReporter:
    """Tails the run's JSONL events into the catalog (this process is its one writer) and the artifacts."""

    def __init__(self, layout: Layout, run_id: str, run_dir: Path, start: int, steps: int, stage: str):
        self.layout, self.run_id, self.steps = layout, run_id, steps
        self.tail = EventTail(run_dir / "metrics.jsonl")
        self.last_metrics: dict[str, float] = {}
        self.speeds: list[float] = []
        self.metrics_logged = 0
        self.last_checkpoint: str | None = None
        self.result: dict | None = None
        self.progress_id = create_progress_artifact(
            progress=100.0 * start / steps,
            key=artifact_key(stage, "progress"),
            description=f"{stage} run {run_id}: optimizer steps done (of {steps})",
        )

    def drain(self) -> None:
        events = self.tail.read()
        if not events:
            return
        step = None
        with catalog_session(self.layout) as cat:
            for event in events:
                if event["event"] == "metrics":
                    cat.log_metrics(self.run_id, event["step"], event["values"])
                    self.last_metrics, step = event["values"], event["step"]
                    self.speeds.append(event["values"].get("samples_per_s", 0.0))
                    self.metrics_logged += 1
                elif event["event"] == "checkpoint":
                    cat.record_checkpoint(self.run_id, event["step"], event["path"])
                    self.last_checkpoint = event["path"]
                elif event["event"] == "result":
                    self.result = event
        if step is not None:
            update_progress_artifact(self.progress_id, progress=min(100.0, 100.0 * step / self.steps))


def watch(future, reporter: RunReporter) -> None:
    """Drain the events while the training task runs, once more after it ends, then raise its error."""
    while True:
        finished = future.state.is_final()  # read before draining: nothing written before the end is lost
        reporter.drain()
        if finished:
            break
        future.wait(timeout=_POLL_S)
    future.result()


# --- the flows ---------------------------------------------------------------------------------------


def _model_inputs(cat: Catalog, layout: Layout, stage: str, params: TrainParams, cfg: Blip2Config) -> dict:
    if stage == "stage1":
        tokenizer, bert = _stage1_folders(params, cfg)
        return {"tokenizer": tokenizer, "bert_init": bert}
    _llm_folder(cfg)
    if params.stage1_run is None:
        return {"stage1_checkpoint": None}
    ckpt = resolve_stage1_checkpoint(cat, layout, params.stage1_run, cfg)
    return {"stage1_checkpoint": str(ckpt)}


def run_training(stage: str, params: TrainParams) -> TrainSummary:
    """Steps 1-5 of the module docstring, for either stage."""
    require_paths(dirs={f: getattr(params, f, None) for f in ("tokenizer", "bert_init", "llm")})
    layout = layout_for(params.home)
    cfg = resolved_config(params)
    stage_cfg = cfg.stage1 if stage == "stage1" else cfg.stage2
    steps = params.steps or stage_cfg.steps
    with catalog_session(layout) as cat:
        sources, counts = resolve_sources(cat, layout, params)
        plan = plan_job(stage, params, cfg, sources, **_model_inputs(cat, layout, stage, params, cfg))
        chash = config_hash(plan)
        previous = find_previous(cat, layout, stage, chash, params)
        finished = already_finished(cat, stage, params, previous, steps, TrainSummary)
        if finished is not None:
            return finished
        run_params = params.model_dump(mode="json") | {"resumes": previous[0] if previous else None}
        run_id = cat.start_run(stage, chash, run_params, flow_run_id())
    run_dir = layout.run_dir(stage, run_id)
    try:
        with source_lock(run_dir):
            return _train_run(stage, params, layout, run_id, run_dir, plan, chash, steps, previous, counts)
    except BaseException as err:
        status = "cancelled" if isinstance(err, KeyboardInterrupt) else "failed"
        with catalog_session(layout) as cat:
            if cat.run(run_id).status == "running":
                cat.finish_run(run_id, status, {"error": f"{type(err).__name__}: {err}"})
        raise


def _train_run(stage, params, layout, run_id, run_dir, plan, chash, steps, previous, counts) -> TrainSummary:
    logger = get_run_logger()
    resumed_from, start = None, 0
    if previous is not None:
        with catalog_session(layout) as cat:
            close_stale_run(cat, layout, stage, previous[0], run_id)
        resumed_from = seed_checkpoint(previous[1], run_dir)
        start = int(resumed_from.name.removeprefix("step-"))
        with catalog_session(layout) as cat:
            cat.record_checkpoint(run_id, start, str(resumed_from))
        logger.info(
            "%s %s continues run %s from step %d (%s)", stage, run_id, previous[0], start, previous[1]
        )
    job = make_job(plan, params, steps, run_dir)
    atomic_write_text(run_dir / "job.json", job.to_json())
    record = {"stage": stage, "run_id": run_id, "config_hash": chash, "steps": steps}
    record |= {"params": params.model_dump(mode="json"), "job": json.loads(job.to_json())}
    record |= {"config": plan["config"], "resumed_from": None if previous is None else str(previous[1])}
    atomic_write_text(run_dir / "config.json", json.dumps(record, indent=1, sort_keys=True))
    # The model config alone, where `blip2 checkpoint export-hf <run>/checkpoints/step-N` looks for it.
    atomic_write_text(run_dir / RUN_CONFIG_FILE, json.dumps(plan["config"], indent=1))
    logger.info(
        "%s run %s: %d step(s) from %d, %d process(es), batch %d per process, sources %s, log %s",
        *(stage, run_id, steps, start, params.nproc, job.batch_size, [s.name for s in job.sources], run_dir),
    )
    reporter = RunReporter(layout, run_id, run_dir, start, steps, stage)
    job_path = str(run_dir / "job.json")
    if params.job_only:
        print(launch_instructions(stage, run_id, job_path, params.nproc))
        summary = _summary(stage, run_id, chash, run_dir, steps, start, reporter, previous, resumed_from, job)
        return summary.model_copy(update=counts)
    if params.nproc == 1:
        future = train_in_process.submit(job_path)
    else:
        future = train_with_torchrun.submit(job_path, params.nproc)
    watch(future, reporter)
    summary = _summary(stage, run_id, chash, run_dir, steps, start, reporter, previous, resumed_from, job)
    summary = summary.model_copy(update=counts)
    with catalog_session(layout) as cat:
        cat.finish_run(run_id, "done", summary.model_dump(mode="json"))
    _publish(stage, summary)
    return summary


def launch_instructions(stage: str, run_id: str, job_path: str, ranks: int) -> str:
    """What to run after a `job_only` flow run: the ranks start on the cluster, through infra/launch.py.

    The catalog run stays 'running' meanwhile (the ranks write its checkpoints and metrics.jsonl);
    a later flow run with `resume` takes it over from its last checkpoint.
    """
    return (
        f"{stage} run {run_id}: job written for {ranks} ranks; nothing was launched here.\n"
        f"Put `stage: {stage}`, `job: {job_path}` and nodes x gpus_per_node = {ranks} in a launch file "
        "(a copy of infra/training/stage1-2x8.yaml), then render and check the launchers:\n"
        f"  python infra/launch.py <launch file> --out launch/ --check-job {job_path}"
    )


def _summary(
    stage, run_id, chash, run_dir, steps, start, reporter, previous, resumed_from, job
) -> TrainSummary:
    result = reporter.result or {}
    losses = {k: v for k, v in reporter.last_metrics.items() if k == "loss" or k.startswith("loss_")}
    speeds = [s for s in reporter.speeds if s > 0]
    return TrainSummary(
        run_id=run_id,
        stage=stage,
        config_hash=chash,
        run_dir=run_dir,
        steps=steps,
        step=int(result.get("step", start)),
        start_step=start,
        loss=result.get("loss"),
        losses=losses,
        samples_per_s=sum(speeds) / len(speeds) if speeds else None,
        metrics_logged=reporter.metrics_logged,
        last_checkpoint=result.get("last_checkpoint") or reporter.last_checkpoint,
        resumed_from=None if resumed_from is None else str(resumed_from),
        resumed_from_run=None if previous is None else previous[0],
        sources={s.name: len(s.shards) for s in job.sources},
        capfilt_shards=0,
        web_caption_shards=0,
        skipped_shards=0,
    )


def _publish(stage: str, summary: TrainSummary) -> None:
    rows = [{"what": "steps", "value": f"{summary.step} / {summary.steps} (from {summary.start_step})"}]
    rows += [{"what": name, "value": round(value, 4)} for name, value in sorted(summary.losses.items())]
    speed = "-" if summary.samples_per_s is None else round(summary.samples_per_s, 1)
    rows += [
        {"what": "samples/s", "value": speed},
        {"what": "checkpoint", "value": summary.last_checkpoint or "-"},
        {"what": "continued from", "value": summary.resumed_from or "-"},
    ]
    create_table_artifact(
        rows, key=artifact_key(stage, "summary"), description=f"{stage} run {summary.run_id}"
    )
    get_run_logger().info(
        "%s run %s done: step %d, loss %s, checkpoint %s",
        *(stage, summary.run_id, summary.step, summary.loss, summary.last_checkpoint),
    )


@flow(name="stage1", log_prints=True)
def stage1_flow(params: Stage1Params) -> TrainSummary:
    """Stage-1 pretraining (ITC + ITM + ITG) of the Q-Former on catalog shards and CapFilt captions."""
    return run_training("stage1", params)


@flow(name="stage2", log_prints=True)
def stage2_flow(params: Stage2Params) -> TrainSummary:
    """Stage-2 generative pretraining with a frozen LLM, starting from a finished stage-1 run."""
    return run_training("stage2", params)


__all__ = [
    "SourceParams",
    "Stage1Params",
    "Stage2Params",
    "TrainParams",
    "TrainSummary",
    "stage1_flow",
    "stage2_flow",
]
