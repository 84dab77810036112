"""One training process: what `torchrun ... -m flows.torchrun_entry <run_dir>/job.json` runs on every rank.

The job file (`TrainJob`, written by `flows.train`) holds everything a rank needs as plain paths and
numbers, so ranks never open the DuckDB catalog (one writer: the flow process) and never import Prefect.
Rank 0 appends one JSON line per event to `<run_dir>/metrics.jsonl`:

    {"event": "metrics", "step": 10, "values": {"loss": 5.1, "loss_itc": ..., "lr": ...}}
    {"event": "checkpoint", "step": 10, "path": ".../checkpoints/step-000010"}
    {"event": "result", "step": 10, "loss": 5.1, "last_checkpoint": ..., "resumed_from": ...}

and the flow tails that file into the catalog. The in-process path (nproc 1) calls `run_job` in the flow
process and goes through the same file, so both paths reach the catalog the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from blip2_core import train as T
from blip2_core.config import Blip2Config, config_from_dict

log = logging.getLogger("blip2_core.torchrun_entry")

Stage = Literal["stage1", "stage2"]
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class SourceJob:
    """A data source as the ranks read it: shard paths, CapFilt sidecar folder (None: web captions)."""

    name: str
    shards: list[str]
    sidecar_dir: str | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class TrainJob:
    """Everything one rank needs, JSON-serialisable. Batch size is per rank and per micro-batch."""

    stage: Stage
    config: dict[str, Any]  # the resolved Blip2Config (config_to_dict), llm.name already set for stage 2
    run_dir: str
    sources: list[SourceJob]
    train: dict[str, Any]  # blip2_core.train.TrainConfig fields except out_dir
    batch_size: int  # per rank, per micro-batch
    seed: int = 0
    num_workers: int = 0
    world_size: int = 1
    swap_left_right: bool = False
    tokenizer: str | None = None  # stage 1: a BERT-style tokenizer folder (save_pretrained)
    bert_init: str | None = None  # stage 1: a local BERT checkpoint that initialises the Q-Former
    stage1_checkpoint: str | None = None  # stage 2: the stage-1 checkpoint folder it starts from

    @property
    def metrics_path(self) -> Path:
        return Path(self.run_dir) / METRICS_FILE

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> TrainJob:
        raw = json.loads(Path(path).read_text())
        raw["sources"] = [SourceJob(**s) for s in raw["sources"]]
        return cls(**raw)

    def blip2_config(self) -> Blip2Config:
        return config_from_dict(self.config, source=f"{self.run_dir}/job.json")


# ----------------------------------------------------------------------------- events


class JsonlEvents(T.Callback):
    """Appends the trainer's metrics and checkpoints to the run's JSONL file, one flushed line each."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, event: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(event) + "\n")  # one write of a whole line: a reader never sees half of one
            fh.flush()

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.write({"event": "metrics", "step": step, "values": metrics})

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.write({"event": "checkpoint", "step": step, "path": str(path)})


class EventTail:
    """Reads the complete lines appended to a JSONL file since the last call (a partial last line waits)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


# ----------------------------------------------------------------------------- model and data


class BertTokenize:
    """Captions -> {"text_ids", "text_mask"} (B, max_len), padded to max_len on every rank (the ITM
    hard negatives are gathered across ranks, which needs one shape). Loaded lazily in each worker."""

    def __init__(self, folder: str, max_len: int) -> None:
        self.folder, self.max_len = folder, max_len
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "max_len": self.max_len, "_tokenizer": None}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        out = self._tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_len, return_tensors="pt"
        )
        return {"text_ids": out["input_ids"], "text_mask": out["attention_mask"]}


def build_data(job: TrainJob, cfg: Blip2Config, env: T.DistEnv):
    """The rank's ShardData: its split of the job's sources, augmented as the preset says."""
    from blip2_core.data import AugmentConfig, Collate, LoaderConfig, ShardData, SourceSpec

    stage_cfg = cfg.stage1 if job.stage == "stage1" else cfg.stage2
    sources = [SourceSpec(s.name, [Path(p) for p in s.shards], s.sidecar_dir, s.weight) for s in job.sources]
    loader = LoaderConfig(
        batch_size=job.batch_size,
        seed=job.seed,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=job.num_workers,
    )
    augment = AugmentConfig(
        image_size=cfg.vision.image_size,
        scale=(stage_cfg.crop_scale_min, 1.0),
        hflip=stage_cfg.hflip,
        swap_left_right=job.swap_left_right,
    )
    if job.stage == "stage1":
        collate = Collate(text_key=None, tokenize=BertTokenize(job.tokenizer, cfg.qformer.max_text_len))
    else:
        collate = Collate(text_key="captions")
    return ShardData(sources, loader, augment, collate)


def build_model(job: TrainJob, cfg: Blip2Config) -> torch.nn.Module:
    """Stage 1: a fresh Blip2Stage1 (Q-Former from BERT when given). Stage 2: Blip2Stage2 with the frozen
    LLM of the preset and the stage-1 checkpoint's ln_vision + Q-Former (fresh ones when none is given).
    A resumed run then overwrites the trainable weights with its own checkpoint (in train())."""
    torch.manual_seed(job.seed)  # the same initial weights on every rank
    if job.stage == "stage1":
        from blip2_core.qformer import load_bert_checkpoint
        from blip2_core.stage1 import Blip2Stage1

        model = Blip2Stage1(cfg)
        if job.bert_init:
            load_bert_checkpoint(model.qformer, job.bert_init)
        return model
    from safetensors.torch import load_file

    from blip2_core.checkpoints import WEIGHTS_FILE
    from blip2_core.stage2 import Blip2Stage2, load_stage1_weights

    model = Blip2Stage2(cfg)
    if job.stage1_checkpoint is not None:  # None: the Figure 5 ablation, a Q-Former never pretrained
        load_stage1_weights(model, load_file(Path(job.stage1_checkpoint) / WEIGHTS_FILE, device="cpu"))
    return model


def run_job(job: TrainJob) -> T.TrainResult:
    """Train one rank of the job; rank 0 reports through the run's JSONL file."""
    env = T.DistEnv.from_env()
    if env.world_size != job.world_size:
        raise RuntimeError(
            f"job {job.run_dir} is for {job.world_size} process(es), WORLD_SIZE={env.world_size}"
        )
    cfg = job.blip2_config()
    data = build_data(job, cfg, env)
    model = build_model(job, cfg)
    train_cfg = T.TrainConfig(out_dir=job.run_dir, **_train_fields(job.train))
    events = JsonlEvents(job.metrics_path) if env.is_main else None
    result = T.train(model, data, train_cfg, callbacks=[events] if events else None, resume=True)
    if events is not None:
        events.write(
            {
                "event": "result",
                "step": result.step,
                "loss": result.loss,
                "last_checkpoint": _str(result.last_checkpoint),
                "resumed_from": _str(result.resumed_from),
                "loader": data.stats.as_dict(),
            }
        )
    return result


def _train_fields(train: dict[str, Any]) -> dict[str, Any]:
    fields = dict(train)
    if "betas" in fields:
        fields["betas"] = tuple(fields["betas"])  # JSON turned the tuple into a list
    return fields


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def rank_job_file(argv: list[str] | None, usage: str) -> str | None:
    """The one argument of a rank's command line (None after printing `usage`); logs go to stdout
    tagged with the rank, where the launcher's log file collects every rank."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: {usage}", file=sys.stderr)
        return None
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank{os.environ.get('RANK', '0')} %(name)s %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    return args[0]


def main(argv: list[str] | None = None) -> int:
    job_file = rank_job_file(argv, "python -m flows.torchrun_entry <run_dir>/job.json")
    if job_file is None:
        return 2
    rank = os.environ.get("RANK", "0")
    job = TrainJob.read(job_file)
    log.info("rank %s of %s starts %s (%s)", rank, os.environ.get("WORLD_SIZE", "1"), job.stage, job.run_dir)
    run_job(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
