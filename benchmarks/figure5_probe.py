"""Does stage 2 of the miniature use the image? (issue 5, Figure 5 in miniature)

Reads a finished demo home (read only) and prints two diagnostics as JSON:

1. `llm_loss_at_offset`: the frozen OPT teacher's own caption loss (no visual prompt) when the caption
   starts at position 0, 4, 8, 16. The bridge puts the Q queries first and OPT numbers positions from the
   attention mask, so every caption is read Q positions on; a teacher that never saw text there pays for it.
2. `stage2_runs`: for every finished stage-2 run (with and without stage 1), the loss on stage-2 batches
   with the true images and with the images rolled by one within the batch. Equal numbers mean the run
   ignores the image, whatever its training loss. The batches are a fresh draw from the runs' own source
   (the demo has no held-out pretraining split), which if anything flatters a run's use of the image.

    .venv/bin/python benchmarks/figure5_probe.py var            # a demo home
    .venv/bin/python benchmarks/figure5_probe.py var --batches 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

OFFSETS = (0, 4, 8, 16)


def stage2_batches(job_path: Path, count: int) -> list[dict]:
    from blip2_core import train as T
    from flows.torchrun_entry import TrainJob, build_data

    job = TrainJob.read(job_path)
    job = TrainJob(**{**job.__dict__, "num_workers": 0, "seed": 12345})  # not the run's own sample order
    batches = iter(build_data(job, job.blip2_config(), T.DistEnv.from_env()))
    return [next(batches) for _ in range(count)]


@torch.no_grad()
def llm_loss_at_offsets(llm_dir: str, batches: list[dict]) -> dict[int, float]:
    from blip2_core.llm_bridge import decoder_text_inputs, lm_loss, load_llm

    llm, tokenizer = load_llm(llm_dir)
    losses = {}
    for offset in OFFSETS:
        total = 0.0
        for batch in batches:
            text = decoder_text_inputs(tokenizer, batch["captions"], None, "\n", 32)
            positions = (text.attention_mask.cumsum(1) - 1).clamp(min=0) + offset
            logits = llm(input_ids=text.input_ids, attention_mask=text.attention_mask, position_ids=positions)
            total += lm_loss(logits.logits, text.labels).item()
        losses[offset] = round(total / len(batches), 4)
    return losses


@torch.no_grad()
def true_and_shuffled_loss(run_dir: Path, batches: list[dict]) -> dict[str, float]:
    from safetensors.torch import load_file

    from blip2_core.checkpoints import WEIGHTS_FILE
    from flows.torchrun_entry import TrainJob, build_model

    job = TrainJob.read(run_dir / "job.json")
    model = build_model(job, job.blip2_config()).eval()
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    missing = model.load_state_dict(load_file(last / WEIGHTS_FILE), strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    true = shuffled = 0.0
    for batch in batches:
        rolled = torch.roll(torch.arange(len(batch["captions"])), 1)
        true += model(batch).loss.item()
        shuffled += model({"images": batch["images"][rolled], "captions": batch["captions"]}).loss.item()
    return {
        "step": int(last.name.split("-")[1]),
        "stage1_checkpoint": job.stage1_checkpoint,
        "true_images": round(true / len(batches), 4),
        "shuffled_images": round(shuffled / len(batches), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", type=Path, help="a demo home (var/) with finished stage-2 runs")
    parser.add_argument("--batches", type=int, default=6, help="batches of the stage-2 batch size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = sorted(p.parent for p in (args.home / "runs" / "stage2").glob("*/job.json"))
    runs = [r for r in runs if any((r / "checkpoints").glob("step-*"))]
    if not runs:
        raise SystemExit(f"no finished stage-2 run under {args.home}/runs/stage2")
    batches = stage2_batches(runs[0] / "job.json", args.batches)
    from flows.torchrun_entry import TrainJob

    llm_dir = TrainJob.read(runs[0] / "job.json").blip2_config().llm.name
    report = {
        "llm": llm_dir,
        "llm_loss_at_offset": llm_loss_at_offsets(llm_dir, batches),
        "stage2_runs": {r.name: true_and_shuffled_loss(r, batches) for r in runs},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
