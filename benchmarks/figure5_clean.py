"""Figure 5 in miniature on correct captions: stage 2 from stage 1 against stage 2 alone (issue 5).

The demo's stage 2 learns from CapFilt captions, and with the `demo` teachers most of them are wrong about
their image, so the image is worth little to the LLM (0.01 to 0.03 nats per token) and the two runs end
level. This benchmark isolates what stage 1 adds when the image is worth something:

- captions: each pretraining image's ground-truth caption from the corpus manifest (`--captions gt`, the
  default), or its web caption (`--captions web`; 60% correct);
- the frozen LLM: the demo's steerable OPT teacher (`teachers.STEERABLE_OPT`), trained here on the home's
  corpus (about 50 s; a home made before session 8 has an older teacher), or `--llm DIR`. The session-7
  and session-8 figures in BENCHMARKS.md were measured with init 0.1 and position offsets alone;
- stage 1 (`--stage1 same`, the default): trained here in memory on the same training batches and
  captions (`--stage1-steps`, AdamW at `--stage1-lr` with 20 warm-up steps and a cosine to a tenth), as
  the paper trains both stages on the same data; or (`--stage1 home`) the home's newest finished stage-1
  run, trained on the demo's CapFilt captions;
- stage 2 in memory, from that stage-1 Q-Former and from a fresh Q-Former, same seed, batches and steps
  (AdamW, 20 warm-up steps, then `--lr`), for each `--seeds`.

Every `--every` steps it prints the held-out caption loss (the last 6 batches of 32 images, never
trained on) with the true images and with the images shifted by one in the batch: the rise is what the
run reads from the image. Prints JSON: the curves, and per seed the loss difference (without - with)
and the image's worth for each run at every point.

    .venv/bin/python benchmarks/figure5_clean.py var                  # a finished demo home
    .venv/bin/python benchmarks/figure5_clean.py var --captions web --seeds 0
    .venv/bin/python benchmarks/figure5_clean.py var --llm var/teachers/<hash>/opt   # the demo's LLM
    .venv/bin/python benchmarks/figure5_clean.py var --stage1 home    # the demo's own stage-1 run
    .venv/bin/python benchmarks/figure5_clean.py var --html figure5.html   # both curves, as a report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from figure5_probe import pretrain_images, pretrain_rows, true_and_shuffled_loss

BATCH = 32
HELD_OUT_BATCHES = 6


def newest_stage1(home: Path) -> Path:
    runs = sorted(p for p in (home / "runs" / "stage1").glob("*") if any(p.glob("checkpoints/step-*")))
    if not runs:
        raise SystemExit(f"no finished stage-1 run under {home}/runs/stage1: run the demo first")
    return max(runs, key=lambda p: p.stat().st_mtime)


def manifest_batches(home: Path, captions: str, image_size: int) -> list[dict]:
    """Batches of the pretraining images (eval transform) with their ground-truth or web captions."""
    rows = pretrain_rows(home)
    rows = rows[: len(rows) // BATCH * BATCH]
    if len(rows) < (HELD_OUT_BATCHES + 10) * BATCH:
        raise SystemExit(f"{home}/corpus has {len(rows)} pretraining images; this wants at least 512")
    column = {"gt": "gt_caption", "web": "caption"}[captions]
    images = pretrain_images(home, rows, image_size)
    return [
        {"images": images[i : i + BATCH], "captions": [r[column] for r in rows[i : i + BATCH]]}
        for i in range(0, len(rows), BATCH)
    ]


def steerable_teacher(home: Path, out_dir: Path) -> Path:
    from blip2_core import teachers as T

    cfg = T.TeacherConfig(opt=T.STEERABLE_OPT)
    return T.train_opt(T.load_teacher_data(home / "corpus"), out_dir, cfg).path


def held_out_loss(model: torch.nn.Module, batches: list[dict]) -> tuple[float, float]:
    model.eval()
    loss = true_and_shuffled_loss(model, batches)
    model.train()
    return loss["true_images"], loss["shuffled_images"]


def train_stage1(cfg, tokenizer: str, batches: list[dict], args, out_dir: Path) -> Path:
    """Stage 1 (ITC + ITM + ITG) on the training batches; returns the folder of its weights file."""
    from safetensors.torch import save_file

    from blip2_core.checkpoints import WEIGHTS_FILE
    from blip2_core.optim import cosine_lr
    from blip2_core.stage1 import Blip2Stage1
    from flows.torchrun_entry import BertTokenize

    tokenize = BertTokenize(tokenizer, cfg.qformer.max_text_len)
    train = [{"images": b["images"], **tokenize(b["captions"])} for b in batches[:-HELD_OUT_BATCHES]]
    torch.manual_seed(0)
    model = Blip2Stage1(cfg).train()
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.stage1_lr, betas=(0.9, 0.98), weight_decay=0.05)
    rng = random.Random(0)
    start = time.perf_counter()
    for step in range(1, args.stage1_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step - 1, args.stage1_lr, args.stage1_lr / 10, 20, args.stage1_steps)
        out = model(train[rng.randrange(len(train))])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.stage1_steps:
            print(f"stage 1: step {step} loss {out.loss.item():.3f} (itc {out.loss_itc.item():.3f}, itm "
                  f"{out.loss_itm.item():.3f}, itg {out.loss_itg.item():.3f}) "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    folder = out_dir / "stage1"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("visual_encoder.")}
    save_file(state, str(folder / WEIGHTS_FILE))
    return folder


def write_html(path: Path, report: dict) -> None:
    """Both stage-2 curves of every seed (held-out loss, and what each run reads from the image)."""
    from flows import plots

    loss, worth = {}, {}
    for seed, runs in report["curves"].items():
        for name, label in (("with_stage1", "with stage 1"), ("without", "without stage 1")):
            loss[f"{label}, seed {seed}"] = [(c[0], c[1]) for c in runs[name]]
            worth[f"{label}, seed {seed}"] = [(c[0], c[2] - c[1]) for c in runs[name]]
    frame = plots.Frame(width=820, height=400)
    charts = [
        plots.line_chart(loss, title="Held-out stage-2 loss", x_label="stage-2 optimizer step",
                         y_label="caption loss (nats per token)", frame=frame, markers=True),
        plots.line_chart(worth, title="What the run reads from the image: loss with shuffled images minus "
                         "loss with the true ones", x_label="stage-2 optimizer step",
                         y_label="nats per token", frame=frame, markers=True),
    ]  # fmt: skip
    settings = {k: report[k] for k in ("home", "stage1", "llm", "captions", "steps", "lr")}
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in settings.items())
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>Figure 5 in miniature</title>"
        "<h1>Figure 5 in miniature: stage 2 with and without stage 1</h1>"
        f"<table>{rows}</table>{''.join(charts)}",
        encoding="utf-8",
    )


def run_stage2(cfg, stage1: Path | None, batches: list[dict], args, seed: int) -> list[list[float]]:
    """[[step, held-out loss with true images, with shuffled images], ...] from step 0 to args.steps."""
    from safetensors.torch import load_file

    from blip2_core.checkpoints import WEIGHTS_FILE
    from blip2_core.stage2 import Blip2Stage2, load_stage1_weights

    torch.manual_seed(seed)
    model = Blip2Stage2(cfg)
    if stage1 is not None:
        load_stage1_weights(model, load_file(str(stage1 / WEIGHTS_FILE)))
    model.train()
    train, held = batches[:-HELD_OUT_BATCHES], batches[-HELD_OUT_BATCHES:]
    params = [p for _, p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05)
    rng = random.Random(seed)
    curve = [[0, *held_out_loss(model, held)]]
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / 20)
        loss = model(train[rng.randrange(len(train))]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            curve.append([step, *held_out_loss(model, held)])
            label = "with stage 1" if stage1 else "without"
            print(f"seed {seed} {label}: step {step} held-out {curve[-1][1]} (shuffled {curve[-1][2]}) "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", type=Path, help="a demo home (var/) with a finished stage-1 run")
    parser.add_argument("--captions", choices=("gt", "web"), default="gt")
    parser.add_argument("--llm", type=Path, help="frozen OPT folder (default: train the steerable teacher)")
    parser.add_argument(
        "--stage1",
        choices=("same", "home"),
        default="same",
        help="same: train stage 1 here on the benchmark's captions; home: the home's run",
    )
    parser.add_argument("--stage1-run", type=Path, help="with --stage1 home: this run (default: the newest)")
    parser.add_argument("--stage1-steps", type=int, default=400)
    parser.add_argument("--stage1-lr", type=float, default=1e-3)
    parser.add_argument("--html", type=Path, help="also write both curves to this HTML file")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=50, help="steps between held-out measurements")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from blip2_core import teachers as T
    from flows.torchrun_entry import TrainJob

    stage1_run = args.stage1_run or newest_stage1(args.home)
    stage1_job = TrainJob.read(stage1_run / "job.json")
    cfg = stage1_job.blip2_config()
    with tempfile.TemporaryDirectory(prefix="figure5-") as tmp:
        llm = args.llm or steerable_teacher(args.home, Path(tmp))
        batches = manifest_batches(args.home, args.captions, cfg.vision.image_size)
        if args.stage1 == "same":
            if not stage1_job.tokenizer:
                raise SystemExit(f"{stage1_run}/job.json names no stage-1 tokenizer; use --stage1 home")
            stage1 = train_stage1(cfg, stage1_job.tokenizer, batches, args, Path(tmp))
            stage1_text = f"trained here: {args.stage1_steps} steps at lr {args.stage1_lr} on these captions"
        else:
            stage1 = sorted((stage1_run / "checkpoints").glob("step-*"))[-1]
            stage1_text = str(stage1)
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, name=str(llm)))
        curves = {
            seed: {"with_stage1": run_stage2(cfg, stage1, batches, args, seed),
                   "without": run_stage2(cfg, None, batches, args, seed)}
            for seed in args.seeds
        }  # fmt: skip
    summary = {
        seed: [
            {"step": w[0], "without_minus_with": round(o[1] - w[1], 4),
             "image_worth_with": round(w[2] - w[1], 4), "image_worth_without": round(o[2] - o[1], 4)}
            for w, o in zip(c["with_stage1"], c["without"], strict=True)
        ]
        for seed, c in curves.items()
    }  # fmt: skip
    report = {
        "home": str(args.home),
        "stage1": stage1_text,
        "llm": str(args.llm or f"trained here: teachers.STEERABLE_OPT = {T.STEERABLE_OPT}"),
        "captions": args.captions,
        "steps": args.steps,
        "lr": args.lr,
        "train_batches": len(batches) - HELD_OUT_BATCHES,
        "held_out_batches": HELD_OUT_BATCHES,
        "curves": curves,
        "summary": summary,
    }
    if args.html:
        write_html(args.html, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
