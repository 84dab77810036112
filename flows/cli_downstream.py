"""`blip2 finetune`, `blip2 evaluate` and `blip2 generate`: the downstream subcommands of the CLI.

Only argparse is imported at module level; each command imports its flow when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _add_home(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", type=Path, help="data root (default $BLIP2_HOME or ./var)")


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


# --- finetune --------------------------------------------------------------------------------------------

_FINETUNE_OPTIONS = (
    "image_pattern", "image_size", "steps", "epochs", "batch_size", "lr", "min_lr", "warmup_steps",
    "weight_decay", "prompt", "crop_scale_min", "precision", "tokenizer", "num_workers", "nproc", "seed",
    "log_every", "ckpt_every", "keep_last", "run_id", "home",
)  # fmt: skip


def cmd_finetune(args: argparse.Namespace) -> int:
    from flows.finetune import FinetuneParams, finetune_flow

    fields = _given(args, _FINETUNE_OPTIONS)
    for name in ("annotations", "questions", "images", "sources"):
        fields[name] = tuple(getattr(args, name) or ())
    if args.no_layer_decay:
        fields["layer_decay"] = None
    elif args.layer_decay is not None:
        fields["layer_decay"] = args.layer_decay
    s = finetune_flow(
        FinetuneParams(
            task=args.task, start_run=args.start_run, hflip=args.hflip, resume=not args.no_resume, **fields
        )
    )
    print(f"{s.stage} run {s.run_id} from {s.start_run}: step {s.step}/{s.steps}, {s.image_size} px")
    if s.resumed_from_run:
        print(f"  continued run {s.resumed_from_run} from step {s.start_step}")
    for name, value in sorted(s.losses.items()):
        print(f"  {name:<12} {value:.4f}")
    print(f"checkpoint {s.last_checkpoint}")
    return 0


def _add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune for captioning, VQA or retrieval (catalog runs)")
    p.add_argument("task", choices=["caption", "vqa", "retrieval"])
    p.add_argument("--start-run", required=True, help="stage-2 run (caption, vqa) or stage-1 run (retrieval)")
    p.add_argument("--annotations", type=Path, action="append", help="COCO captions / VQAv2 / VG QA file")
    p.add_argument(
        "--questions", type=Path, action="append", help="vqa: VQAv2 questions file (per annotations)"
    )
    p.add_argument("--images", type=Path, action="append", help="image folder (per annotations file, or one)")
    p.add_argument(
        "--image-pattern", help="vqa: image file from its id, e.g. COCO_train2014_{image_id:012d}.jpg"
    )
    p.add_argument("--sources", action="append", help="caption: catalog source of ingested shards")
    p.add_argument("--image-size", type=int, help="default 364 (caption, retrieval) / 490 (vqa)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--layer-decay", type=float, help="ViT layer-wise lr decay (default 0.95)")
    p.add_argument("--no-layer-decay", action="store_true")
    p.add_argument("--prompt", help="caption: the text the caption follows (default 'a photo of ')")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips")
    p.add_argument("--crop-scale-min", type=float)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--tokenizer", type=Path, help="BERT-style tokenizer (default: the start run's lineage)")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--nproc", type=int, help="training processes: >1 launches torchrun (DDP)")
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--keep-last", type=int)
    p.add_argument("--no-resume", action="store_true", help="start over instead of continuing the same run")
    p.add_argument("--run-id", help="continue this run (same parameters) instead of the newest")
    _add_home(p)
    p.set_defaults(func=cmd_finetune)


# --- evaluate --------------------------------------------------------------------------------------------

_EVALUATE_OPTIONS = (
    "questions", "predictions", "checkpoint", "images", "image_pattern", "split", "dataset", "prompt",
    "num_beams", "max_new_tokens", "k", "rerank", "batch_size", "nproc", "tokenizer", "device", "home",
)  # fmt: skip


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.evaluate import EvaluateParams, evaluate_flow, paper_table

    summary = evaluate_flow(
        EvaluateParams(task=args.task, annotations=args.annotations, **_given(args, _EVALUATE_OPTIONS))
    )
    source = summary.checkpoint or summary.predictions
    print(
        f"evaluate run {summary.run_id}: {summary.task} on {summary.dataset} "
        f"({summary.n} scored) from {source}"
    )
    print(paper_table(summary))
    if summary.preset and summary.preset.startswith("paper-") and not summary.paper:
        print(f"(no paper number for {summary.preset} on {summary.dataset})")
    return 0


def _add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="VQA accuracy, caption metrics, retrieval recall (model or file)")
    p.add_argument("task", choices=["vqa", "caption", "retrieval"])
    p.add_argument(
        "--annotations", type=Path, required=True, help="VQAv2 / COCO captions / NoCaps / Karpathy"
    )
    p.add_argument("--questions", type=Path, help="vqa: VQAv2 questions file")
    p.add_argument("--predictions", type=Path, help="results file in the standard format: score it, no model")
    p.add_argument("--checkpoint", help="catalog run id, run or checkpoint folder, or HF BLIP-2 folder")
    p.add_argument("--images", type=Path, help="image root (with --checkpoint)")
    p.add_argument(
        "--image-pattern", help="vqa: image file from its id, e.g. COCO_val2014_{image_id:012d}.jpg"
    )
    p.add_argument("--split", help="retrieval: Karpathy split (e.g. test)")
    p.add_argument("--dataset", help="name recorded in the catalog (vqav2-val, nocaps, flickr30k-test, ...)")
    p.add_argument("--prompt", help="caption: prompt (default: the model's)")
    p.add_argument("--num-beams", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--k", type=int, help="retrieval: ITC candidates re-ranked by ITM (default 128)")
    p.add_argument("--rerank", choices=["itm+itc", "itm"])
    p.add_argument("--batch-size", type=int)
    p.add_argument("--nproc", type=int, help="retrieval: processes sharing the work (torchrun ranks)")
    p.add_argument("--tokenizer", type=Path, help="BERT-style tokenizer (default: the run's lineage)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    _add_home(p)
    p.set_defaults(func=cmd_evaluate)


# --- generate --------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from flows.evaluate import generate_from_checkpoint

    texts = generate_from_checkpoint(
        args.images, args.checkpoint, args.prompt, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens, device=args.device or "auto", home=args.home,
    )  # fmt: skip
    for image, text in zip(args.images, texts, strict=True):
        print(text if len(args.images) == 1 else f"{image}\t{text}")
    return 0


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="instructed zero-shot generation: IMAGE + prompt -> text")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, help="stage-2 run id, run/checkpoint folder, or HF folder")
    p.add_argument("--prompt", help="the instruction that follows the visual prompt (default: the model's)")
    p.add_argument("--num-beams", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--device", help="auto, cpu, cuda ...")
    _add_home(p)
    p.set_defaults(func=cmd_generate)


def add_downstream_parsers(sub) -> None:
    _add_finetune_parser(sub)
    _add_evaluate_parser(sub)
    _add_generate_parser(sub)
