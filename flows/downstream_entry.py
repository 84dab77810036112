"""One rank of a fine-tuning run or of a distributed retrieval evaluation: what
`torchrun ... -m flows.downstream_entry <job file>` runs (launched by `flows.train.train_with_torchrun`).

As for pretraining (`flows.torchrun_entry`), the job file holds plain paths and numbers, so ranks never
open the DuckDB catalog and never import Prefect. Its "kind" says what to run:
- "finetune" (<run_dir>/job.json, written by `flows.finetune`): the task's model from its start
  checkpoint(s), trained by `blip2_core.train.train` (DDP over the ranks, each reading its share of every
  batch; a checkpoint already in <run_dir>/checkpoints is resumed). Rank 0 appends metrics, checkpoints
  and the result to <run_dir>/metrics.jsonl, which the flow tails into the catalog.
- "retrieval" (written by `flows.evaluate`): `inference.retrieval_scores` split over the ranks; rank 0
  writes the recalls to the job's `out` file (JSON: kilobytes, where the score matrices of COCO 5K
  would take gigabytes).
With one process the flows call `run_finetune_job` and `retrieval_output` in their own process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from blip2_core import train as T
from blip2_core.config import Blip2Config, config_from_dict
from flows.torchrun_entry import METRICS_FILE, BertTokenize, JsonlEvents, rank_job_file

log = logging.getLogger("blip2_core.downstream_entry")


# --- fine-tuning -------------------------------------------------------------------------------------


def finetune_data(job: dict[str, Any], cfg: Blip2Config, env: T.DistEnv):
    """The rank's DataSource: records of the annotation files, or shards (caption), split by rank."""
    from blip2_core.data import AugmentConfig, Collate, LoaderConfig, ShardData, SourceSpec
    from blip2_core.finetune import RecordCollate, RecordData, annotation_records

    augment = AugmentConfig(
        image_size=cfg.vision.image_size, scale=(job["crop_scale_min"], 1.0), hflip=job["hflip"]
    )
    split = {
        "seed": job["seed"],
        "rank": env.rank,
        "world_size": env.world_size,
        "num_workers": job["num_workers"],
    }
    if job["shards"]:
        loader = LoaderConfig(batch_size=job["batch_size"], **split)
        spec = SourceSpec("finetune", [Path(p) for p in job["shards"]])
        return ShardData([spec], loader, augment, Collate(text_key="captions"))
    tokenize = BertTokenize(job["tokenizer"], cfg.qformer.max_text_len) if job["tokenizer"] else None
    records = annotation_records(
        job["task"], job["annotations"], job["images"], job["questions"], job["image_pattern"]
    )
    collate = RecordCollate(job["task"], prompt=cfg.llm.prompt, tokenize=tokenize)
    return RecordData(records, job["batch_size"], augment, collate, **split)


def run_finetune_job(job_path: str) -> dict[str, Any]:
    """Build the model from the start checkpoint(s) and train it (resuming a checkpoint of the run folder);
    rank 0 reports through metrics.jsonl. Returns the result event."""
    from blip2_core.finetune import build_finetune_model, finetune_param_groups, load_start_weights

    job = json.loads(Path(job_path).read_text())
    env = T.DistEnv.from_env()
    if env.world_size != job["world_size"]:
        raise RuntimeError(
            f"job {job_path} is for {job['world_size']} process(es), WORLD_SIZE={env.world_size}"
        )
    run_dir = Path(job_path).parent
    cfg = config_from_dict(job["config"], source=job_path)
    torch.manual_seed(job["seed"])  # the same initial weights on every rank
    model = build_finetune_model(job["task"], cfg)
    load_start_weights(model, job["start_files"])
    data = finetune_data(job, cfg, env)
    train = dict(job["train"]) | {"betas": tuple(job["train"]["betas"])}
    groups = finetune_param_groups(model, train["weight_decay"], job["layer_decay"])
    events = JsonlEvents(run_dir / METRICS_FILE) if env.is_main else None
    result = T.train(
        model, data, T.TrainConfig(out_dir=str(run_dir), **train),
        callbacks=[events] if events else None, param_groups=groups,
    )  # fmt: skip
    event = {
        "event": "result",
        "step": result.step,
        "loss": result.loss,
        "last_checkpoint": None if result.last_checkpoint is None else str(result.last_checkpoint),
        "resumed_from": None if result.resumed_from is None else str(result.resumed_from),
    }
    if events is not None:
        events.write(event)
    return event


# --- retrieval evaluation ----------------------------------------------------------------------------


def load_eval_model(path: Path, kind: str, scratch: Path, device: str | torch.device = "auto"):
    """The model of a checkpoint, in eval mode on `device`: kind "trained" (our checkpoint folder),
    "imported" (a folder `blip2 checkpoint import-hf` wrote) or "hf" (imported into `scratch` first)."""
    from blip2_core.hf_interop import import_hf, load_imported, load_trained

    if kind == "hf":
        model = load_imported(import_hf(path, scratch / "imported"))
    elif kind == "imported":
        model = load_imported(path)
    else:
        model = load_trained(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def _rank_device(name: str) -> torch.device:
    """auto / cuda: this rank's GPU (LOCAL_RANK) when there is one; anything else as given."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu" if name == "auto" else name)


def retrieval_output(job: dict[str, Any]) -> dict[str, Any]:
    """Recalls of the job's images and texts (ITC top-k re-ranked by ITM, and ITC alone) with the model's
    preset and image tower, as JSON values. Under torch.distributed each rank computes its share of the
    scores and all return the whole result."""
    from blip2_core.inference import retrieval_scores

    device = _rank_device(job["device"])
    with tempfile.TemporaryDirectory(prefix="blip2-eval-") as scratch:
        model = load_eval_model(Path(job["checkpoint"]), job["checkpoint_kind"], Path(scratch), device)
        if not hasattr(model, "itm_logits"):
            raise ValueError(f"checkpoint {job['checkpoint']} is not a stage-1 (retrieval) model")
        tokenize = BertTokenize(job["tokenizer"], model.cfg.qformer.max_text_len)
        out = retrieval_scores(
            model, job["images"], job["texts"], tokenize, job["k"], job["batch_size"], job["rerank"]
        )
    reranked, itc_only = out.recalls(job["img2txt"], job["txt2img"])
    return {
        "reranked": dataclasses.asdict(reranked), "itc": dataclasses.asdict(itc_only),
        "preset": model.cfg.name, "model": model.cfg.vision.model_name,
    }  # fmt: skip


def read_recalls(saved: dict[str, Any]):
    """(re-ranked, ITC-only) RetrievalScores from `retrieval_output`'s JSON (whose keys K became text)."""
    from blip2_core.metrics.retrieval import RetrievalScores

    def scores(raw: dict[str, Any]) -> RetrievalScores:
        by_k = {name: {int(k): v for k, v in raw[name].items()} for name in ("i2t", "t2i")}
        return RetrievalScores(**(raw | by_k))

    return scores(saved["reranked"]), scores(saved["itc"])


def run_retrieval_job(job_path: str) -> None:
    """One rank of a retrieval evaluation; rank 0 writes the recalls to the job's `out` (JSON)."""
    from blip2_core.distributed import get_rank, torchrun_process_group
    from blip2_core.fileio import atomic_write_text

    job = json.loads(Path(job_path).read_text())
    with torchrun_process_group(_rank_device(job["device"])):
        result = retrieval_output(job)
        if get_rank() == 0:
            atomic_write_text(job["out"], json.dumps(result, indent=1))


RUNNERS = {"finetune": run_finetune_job, "retrieval": run_retrieval_job}


def main(argv: list[str] | None = None) -> int:
    job_file = rank_job_file(argv, "python -m flows.downstream_entry <job file>")
    if job_file is None:
        return 2
    kind = json.loads(Path(job_file).read_text()).get("kind")
    if kind not in RUNNERS:
        print(f"{job_file}: job kind {kind!r} is not one of {sorted(RUNNERS)}", file=sys.stderr)
        return 2
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    log.info("rank %s of %s starts a %s job (%s)", rank, world, kind, job_file)
    RUNNERS[kind](job_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
