"""`blip2`: the command line. Each subcommand calls the same flow a deployment runs.

Heavy imports (Prefect, torch, img2dataset) happen inside the subcommands, so `blip2 --help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from flows.cli_downstream import add_downstream_parsers

_ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # The ephemeral API server needs longer than Prefect's 20 s default on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def _add_home(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", type=Path, help="data root (default $BLIP2_HOME or ./var)")


def _add_download_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("download (img2dataset)")
    g.add_argument("--image-size", type=int, help="target side in pixels (224; 364/490 for fine-tuning)")
    g.add_argument(
        "--resize-mode", choices=["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]
    )
    g.add_argument("--samples-per-shard", type=int)
    g.add_argument("--processes", type=int, help="download processes (default: CPU count)")
    g.add_argument("--threads", type=int, help="download threads per process")
    g.add_argument("--timeout", type=float, dest="timeout_s", help="per-URL timeout in seconds")
    g.add_argument("--retries", type=int, help="immediate retries per URL inside img2dataset")
    g.add_argument("--max-image-pixels", type=int, help="refuse larger images before decoding them")


def _download_options(args: argparse.Namespace) -> dict:
    """The download options given; IngestParams validates them, so errors name `download.<field>`."""
    names = (
        "image_size",
        "resize_mode",
        "samples_per_shard",
        "processes",
        "threads",
        "timeout_s",
        "retries",
        "max_image_pixels",
    )
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


# --- subcommands -----------------------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace) -> int:
    from flows.ingest import IngestParams, ingest_flow

    params = IngestParams(
        source=args.source,
        inputs=tuple(args.input or ()),
        format=args.format,
        allow_local=args.allow_local,
        allow_loopback=args.allow_loopback,
        base_url=args.base_url,
        splits=tuple(args.splits) if args.splits else None,
        download=_download_options(args),
        retry_failed=args.retry_failed,
        verify=args.verify,
        home=args.home,
    )
    summary = ingest_flow(params)
    dropped = ", ".join(f"{k} {v}" for k, v in summary.dropped.items()) or "none"
    print(f"manifest {summary.source}: {summary.urls} URLs kept (dropped: {dropped})")
    print(
        f"ingest {summary.source}: {summary.samples_ok} images in {summary.shards} shards "
        f"({summary.shards_downloaded} new, {summary.shards_skipped} already done), "
        f"{summary.samples_failed} failed"
    )
    for reason, n in sorted(summary.failures.items(), key=lambda kv: -kv[1]):
        print(f"  {reason:<20} {n}")
    if summary.retried:
        print(f"retried {summary.retried} failed URL(s), recovered {summary.recovered}")
    return 0


def cmd_capfilt(args: argparse.Namespace) -> int:
    from flows.capfilt import CapFiltParams, capfilt_flow

    sampling = {n: getattr(args, n) for n in ("num_captions", "top_p", "max_length", "min_length", "seed")}
    runner = ("batch_size", "shards_per_task", "device", "num_workers", "num_gpus", "ray_address", "home")
    params = CapFiltParams(
        sources=tuple(args.source),
        shards=tuple(args.shards) if args.shards else None,
        captioner=args.captioner,
        # Plain dicts: CapFiltParams validates them, so an error names `ranker.<field>` / `sampling.<field>`.
        ranker={"model": args.ranker_model, "weights": args.ranker_weights, "config": args.ranker_config},
        sampling={k: v for k, v in sampling.items() if v is not None},
        force=args.force,
        engine=args.engine,
        **{k: getattr(args, k) for k in runner if getattr(args, k) is not None},
    )
    s = capfilt_flow(params)
    kept = "-" if s.web_kept_share is None else f"{100 * s.web_kept_share:.1f}%"
    print(
        f"capfilt {s.config_hash}: {s.shards_done} shards done, {s.shards_skipped} skipped (already done), "
        f"{s.shards_failed} failed; {s.samples_ok} samples captioned, {s.samples_failed} unreadable"
    )
    print(f"web caption kept in the top {params.sampling.keep_top}: {kept} of this run's samples")
    for shard, error in s.failed_shards.items():
        print(f"  failed {shard}: {error}")
    return 0


def _number_or_text(text: str) -> float | str:
    """A number when `text` is one; else the text, for the parameter model to refuse by field name."""
    try:
        return float(text)
    except ValueError:
        return text


def _train_sources(args: argparse.Namespace) -> list:
    """--source NAME[:WEIGHT] entries, with the shards that --shards NAME=ID,ID names for them."""
    chosen: dict[str, list[str]] = {}
    for entry in args.shards or ():
        name, sep, ids = entry.partition("=")
        if not sep or not ids:
            raise ValueError(f"--shards {entry!r}: expected SOURCE=SHARD[,SHARD...]")
        chosen.setdefault(name, []).extend(i for i in ids.split(",") if i)
    sources = []
    for entry in args.source:
        name, _, weight = entry.partition(":")
        source = {"name": name, **({"weight": _number_or_text(weight)} if weight else {})}
        if name in chosen:
            source["shards"] = chosen.pop(name)
        sources.append(source)
    if chosen:
        raise ValueError(f"--shards names source(s) not given with --source: {', '.join(chosen)}")
    return sources


_TRAIN_OPTIONS = (
    "preset", "capfilt", "capfilt_missing", "steps", "batch_size", "lr", "min_lr", "warmup_steps",
    "precision", "grad_accum", "num_workers", "nproc", "seed", "log_every", "ckpt_every", "keep_last",
    "run_id", "home",
)  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from flows.train import Stage1Params, Stage2Params, stage1_flow, stage2_flow

    fields = {k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k) is not None}
    fields |= {"sources": _train_sources(args), "resume": not args.no_resume}
    fields |= {"swap_left_right": True} if args.swap_left_right else {}
    if args.train_stage == "stage1":
        extra = {k: getattr(args, k) for k in ("tokenizer", "bert_init") if getattr(args, k) is not None}
        summary = stage1_flow(Stage1Params(**fields, **extra))
    else:
        extra = {"stage1_run": args.stage1_run} | ({"llm": args.llm} if args.llm is not None else {})
        summary = stage2_flow(Stage2Params(**fields, **extra))
    s = summary
    start = f", continued from {s.resumed_from_run} at step {s.start_step}" if s.resumed_from_run else ""
    print(f"{s.stage} run {s.run_id} (config {s.config_hash}): step {s.step}/{s.steps}{start}")
    for name, value in sorted(s.losses.items()):
        print(f"  {name:<12} {value:.4f}")
    if s.samples_per_s is not None:
        print(f"  samples/s    {s.samples_per_s:.1f}")
    print(f"checkpoint {s.last_checkpoint}")
    print(f"run folder {s.run_dir}")
    return 0


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="pretraining: stage 1 (Q-Former) or stage 2 (frozen LLM)")
    tsub = p.add_subparsers(dest="train_stage", required=True, metavar="STAGE")
    for stage, text in (
        ("stage1", "representation learning: ITC + ITM + ITG with the frozen image encoder"),
        ("stage2", "generative learning with a frozen LLM, from a finished stage-1 run"),
    ):
        c = tsub.add_parser(stage, help=text)
        c.add_argument(
            "--source", action="append", required=True, help="catalog source NAME[:WEIGHT] (repeatable)"
        )
        c.add_argument("--shards", action="append", help="only these shards: SOURCE=ID,ID or .tar paths")
        c.add_argument("--preset", help="preset name or JSON path (default tiny)")
        c.add_argument("--capfilt", help="CapFilt config hash: its done sidecars give the captions")
        c.add_argument("--capfilt-missing", choices=["web_caption", "skip"], help="shards without a sidecar")
        c.add_argument("--steps", type=int, help="optimizer steps in total (default: the preset's)")
        c.add_argument("--batch-size", type=int, help="samples per optimizer step, all processes")
        c.add_argument("--lr", type=float, help="peak learning rate")
        c.add_argument("--min-lr", type=float, help="cosine floor")
        c.add_argument("--warmup-steps", type=int)
        c.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
        c.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
        c.add_argument("--num-workers", type=int, help="DataLoader processes per training process")
        c.add_argument("--nproc", type=int, help="training processes; more than 1 launches torchrun")
        c.add_argument("--seed", type=int)
        c.add_argument("--log-every", type=int)
        c.add_argument("--ckpt-every", type=int)
        c.add_argument("--keep-last", type=int, help="checkpoints kept on disk")
        c.add_argument("--swap-left-right", action="store_true", help="swap left/right in flipped captions")
        c.add_argument("--no-resume", action="store_true", help="start over instead of continuing")
        c.add_argument("--run-id", help="continue this run (same parameters, more steps)")
        if stage == "stage1":
            c.add_argument("--tokenizer", type=Path, help="BERT-style tokenizer folder")
            c.add_argument("--bert-init", type=Path, help="BERT checkpoint folder for the Q-Former")
        else:
            start = c.add_mutually_exclusive_group(required=True)
            start.add_argument("--stage1-run", help="the stage-1 run id to start from")
            start.add_argument(
                "--no-stage1",
                action="store_true",
                help="start from a fresh Q-Former (the paper's Figure 5 ablation without stage 1)",
            )
            c.add_argument("--llm", type=Path, help="frozen LLM folder (default: the preset's llm.name)")
        _add_home(c)
    p.set_defaults(func=cmd_train)


def cmd_corpus_synth(args: argparse.Namespace) -> int:
    from data_catalog.synth import SynthConfig, synthesize

    cfg = SynthConfig(
        seed=args.seed,
        n_pretrain=args.n_pretrain,
        n_coco=args.n_coco,
        n_vqa_images=args.n_vqa_images,
        n_retrieval=args.n_retrieval,
        n_teacher=args.n_teacher,
        image_size=args.image_size,
    )
    info = synthesize(args.out, cfg)
    print(f"synthetic corpus at {info.root}")
    for name, n in info.image_sets.items():
        print(f"  {name:<16} {n:>6} images")
    print(f"serve it with: python -m data_catalog.corpus_server {info.root}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo
    from flows.pipeline import PipelineParams

    fields = {
        k: getattr(args, k)
        for k in ("seed", "n_pretrain", "n_teacher", "home", "threads")
        if getattr(args, k, None) is not None
    }
    if getattr(args, "only", None):
        fields["stages"] = tuple(args.only)
    for item in getattr(args, "use", None) or ():
        stage, _, run_id = item.partition("=")
        fields.setdefault("use", {})[stage] = run_id
    for item in getattr(args, "set", None) or ():
        stage, value = _stage_override(item)
        fields.setdefault("overrides", {}).setdefault(stage, {}).update(value)
    return run_demo(PipelineParams(**fields))


def _stage_override(item: str) -> tuple[str, dict]:
    """'stage1.steps=600' -> ("stage1", {"steps": 600}); the value is JSON when it parses, else a string."""
    import json

    key, sep, raw = item.partition("=")
    stage, dot, field = key.partition(".")
    if not sep or not dot or not field:
        raise ValueError(f"--set {item!r}: expected STAGE.FIELD=VALUE, e.g. stage1.steps=600")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return stage, {field: value}


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from blip2_core import hf_interop

    if args.checkpoint_command == "import-hf":
        hf_interop.import_hf(args.src, args.dst)
        print(f"imported {args.src} -> {args.dst}")
    else:
        hf_interop.export_hf(args.src, args.dst)
        print(f"exported {args.src} -> {args.dst} (loadable with transformers' from_pretrained)")
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from flows import catalog_views

    return catalog_views.run(args)


def _named_values(entries: Sequence[str] | None, option: str, convert: Callable[[str], object]) -> dict:
    """NAME=VALUE entries of a repeatable option, VALUE converted; a bad entry names the option."""
    out = {}
    for entry in entries or ():
        name, sep, value = entry.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{option} {entry!r}: expected NAME=VALUE")
        out[name] = convert(value)
    return out


def _json_or_file(value: str) -> object:
    import json

    return json.loads(Path(value[1:]).read_text() if value.startswith("@") else value)


def cmd_report(args: argparse.Namespace) -> int:
    from flows.reports import ReportParams, report_flow

    params = ReportParams(
        run_ids=tuple(args.run) if args.run else None,
        report_id=args.report_id,
        baselines_file=args.baselines,
        figure5=tuple(args.figure5) if args.figure5 else None,
        capfilt=tuple(args.capfilt) if args.capfilt else None,
        home=args.home,
        **({"title": args.title} if args.title else {}),
        **({"bins": args.bins} if args.bins else {}),
    )
    path = report_flow(params)
    print(f"report {path}")
    print(f"open it: {path.resolve().as_uri()}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import api_url

    os.environ["PREFECT_API_URL"] = args.api_url or os.environ.get("PREFECT_API_URL") or api_url()
    from flows.serve import build_deployments, serve_deployments

    deployments = build_deployments(
        args.only,
        gpu_limit=args.gpu_limit,
        cron=_named_values(args.cron, "--cron", str),
        interval=_named_values(args.interval, "--interval", float),
        parameters=_named_values(args.parameters, "--parameters", _json_or_file),
        paused=args.paused,
    )
    print(f"serving {len(deployments)} deployment(s) to {os.environ['PREFECT_API_URL']}:")
    for d in deployments:
        limit = d.concurrency_limit
        print(f"  {d.flow_name}/{d.name}" + (f"  (at most {limit} at once)" if limit else ""))
    serve_deployments(deployments, limit=args.limit)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from flows.serve import start_ui

    start_ui(args.home, args.port)  # replaces this process with the server; returns only on error
    return 1


def _add_service_parsers(sub) -> None:
    p = sub.add_parser("report", help="HTML report: loss curves, CapFilt histograms, evaluation vs baselines")
    p.add_argument("--run", action="append", help="a run to report (repeatable; default: every run)")
    p.add_argument("--report-id", help="folder name under reports/ (default: the one run's id, or new)")
    p.add_argument("--title")
    p.add_argument("--baselines", type=Path, help="JSON {name: {'task/dataset/metric': value}}")
    p.add_argument(
        "--figure5", nargs=2, metavar=("WITH_STAGE1", "WITHOUT"), help="two stage-2 runs on one loss chart"
    )
    p.add_argument("--capfilt", action="append", help="CapFilt config hash to plot (repeatable)")
    p.add_argument("--bins", type=int, help="CapFilt histogram bins (default 30)")
    _add_home(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="serve the stage flows as deployments to a Prefect server")
    p.add_argument("--only", nargs="+", metavar="FLOW", help="serve only these flows (default: all present)")
    p.add_argument("--gpu-limit", type=int, default=1, help="concurrent runs per GPU stage (0: no limit)")
    p.add_argument("--limit", type=int, help="flow runs this process runs at once, all deployments")
    p.add_argument("--cron", action="append", metavar="FLOW=EXPR", help="a cron schedule (UTC)")
    p.add_argument("--interval", action="append", metavar="FLOW=SECONDS", help="an interval schedule")
    p.add_argument(
        "--parameters", action="append", metavar="FLOW=JSON|@FILE", help="default parameters of a deployment"
    )
    p.add_argument("--paused", action="store_true", help="register the schedules paused")
    p.add_argument(
        "--api-url", help="the Prefect API (default $PREFECT_API_URL or http://127.0.0.1:4200/api)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="start a Prefect server with its UI on 127.0.0.1 (the project's database)")
    p.add_argument("--port", type=int, default=4200)
    _add_home(p)
    p.set_defaults(func=cmd_ui)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="download a source's URL manifest into WebDataset shards")
    p.add_argument("--source", required=True, help="source name (lowercase), e.g. cc3m")
    p.add_argument("--input", type=Path, nargs="+", help="the source's files (default: reuse its manifest)")
    p.add_argument(
        "--format",
        default="parquet",
        help="format of the inputs: coco, karpathy, vg, cc3m, cc12m, "
        "sbu, sbu_parquet, laion, csv, parquet, jsonl (default parquet)",
    )
    p.add_argument("--allow-local", action="store_true", help="admit file:// URLs")
    p.add_argument(
        "--allow-loopback",
        action="store_true",
        help="admit hosts on 127.0.0.0/8 and ::1 (a local corpus server); refused by default, as are "
        "link-local, private, multicast and reserved addresses",
    )
    p.add_argument("--base-url", help="coco/karpathy formats: URL prefix of the image files")
    p.add_argument("--splits", nargs="+", help="karpathy format: keep only these splits")
    p.add_argument(
        "--retry-failed", action="store_true", help="retry transient failures inside finished shards"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-check registered shards against their catalog checksums; changed ones are downloaded again",
    )
    _add_download_options(p)
    _add_home(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("capfilt", help="caption, rank and filter web captions of ingested shards (CapFilt)")
    p.add_argument("--source", action="append", required=True, help="catalog source (repeatable)")
    p.add_argument("--captioner", type=Path, required=True, help="BLIP captioner, save_pretrained directory")
    p.add_argument("--ranker-model", default="ViT-L-14", help="open_clip model name (default ViT-L-14)")
    p.add_argument("--ranker-weights", type=Path, required=True, help="ranker weights file")
    p.add_argument("--ranker-config", type=Path, help="open_clip model-config JSON of a custom ranker")
    p.add_argument("--shards", nargs="+", help="recompute only these shards (00003 or source/00003)")
    p.add_argument("--force", action="store_true", help="recompute shards that are already done")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--ray-address", help="Ray cluster to join (default: start a local instance)")
    p.add_argument("--num-workers", type=int, help="ray: CPU actors when there is no GPU")
    p.add_argument("--num-gpus", type=int, help="ray: GPUs to use, one actor each (default all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, help="images per model batch (default 16)")
    p.add_argument("--shards-per-task", type=int, help="shards per Prefect task run (default 8)")
    g = p.add_argument_group("sampling (defaults: the paper's)")
    g.add_argument("--num-captions", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-length", type=int)
    g.add_argument("--max-length", type=int)
    g.add_argument("--seed", type=int)
    _add_home(p)
    p.set_defaults(func=cmd_capfilt)

    _add_train_parser(sub)
    add_downstream_parsers(sub)  # finetune, evaluate, generate

    for name, text in (
        ("demo", "the miniature replication, end to end, on the embedded default"),
        ("pipeline", "every stage in order (re-run chosen ones with --only; the rest come from the catalog)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--seed", type=int)
        p.add_argument("--n-pretrain", type=int, help="pretraining images of the synthetic corpus")
        p.add_argument(
            "--n-teacher", type=int, help="clean images for the teachers only (capfilt profile: 4000)"
        )
        p.add_argument("--threads", type=int, help="torch CPU threads")
        p.add_argument(
            "--only",
            nargs="+",
            metavar="STAGE",
            help="run only these stages: ingest teachers capfilt stage1 "
            "stage2 figure5 finetune evaluate report (the others' outputs come from the catalog)",
        )
        p.add_argument("--use", action="append", metavar="STAGE=RUN", help="reuse this run of a stage")
        p.add_argument(
            "--set",
            action="append",
            metavar="STAGE.FIELD=VALUE",
            help="a stage parameter, e.g. stage1.steps=600",
        )
        _add_home(p)
        p.set_defaults(func=cmd_demo)

    p = sub.add_parser("corpus", help="the synthetic corpus")
    csub = p.add_subparsers(dest="corpus_command", required=True, metavar="WHAT")
    c = csub.add_parser(
        "synth", help="render the synthetic corpus (manifests, COCO/VQA-format splits, images)"
    )
    c.add_argument("--out", type=Path, required=True, help="corpus folder")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--n-pretrain", type=int, default=5000)
    c.add_argument("--n-coco", type=int, default=1000)
    c.add_argument("--n-vqa-images", type=int, default=1000)
    c.add_argument("--n-retrieval", type=int, default=1000)
    c.add_argument("--n-teacher", type=int, default=0, help="clean captioned images for the teachers only")
    c.add_argument("--image-size", type=int, default=128)
    c.set_defaults(func=cmd_corpus_synth)

    p = sub.add_parser("checkpoint", help="Hugging Face BLIP-2 format interop")
    csub = p.add_subparsers(dest="checkpoint_command", required=True, metavar="WHAT")
    for name, text in (
        ("import-hf", "HF Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval -> ours"),
        ("export-hf", "ours (imported) -> a folder transformers loads"),
    ):
        c = csub.add_parser(name, help=text)
        c.add_argument("src", type=Path)
        c.add_argument("dst", type=Path)
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("catalog", help="what the catalog knows: sources, shards, runs, metrics")
    csub = p.add_subparsers(dest="catalog_command", required=True, metavar="WHAT")
    c = csub.add_parser("status", help="sources, shards, per-stage progress, failures by reason")
    _add_home(c)
    c = csub.add_parser("runs", help="stage runs, newest last")
    c.add_argument("--stage", help="only this stage")
    _add_home(c)
    c = csub.add_parser("metrics", help="training metrics and evaluation results of one run")
    c.add_argument("run_id")
    _add_home(c)
    p.set_defaults(func=cmd_catalog)

    _add_service_parsers(sub)
    return parser


def _field_errors(err) -> str:
    """One line per problem of a pydantic ValidationError: `  field.path: problem (got value)`."""
    lines = []
    for e in err.errors():
        where = ".".join(str(part) for part in e["loc"]) or "(parameters)"
        quiet = e["type"] in ("missing", "url_credentials")  # never echo a credential
        got = "" if quiet else f" (got {repr(e.get('input'))[:80]})"
        lines.append(f"  {where}: {e['msg']}{got}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a clear one-line message; the flow run keeps the traceback
        from pydantic import ValidationError

        from flows.common import ParameterError

        if isinstance(err, ValidationError):
            print(f"blip2 {args.command}: invalid parameters:\n{_field_errors(err)}", file=sys.stderr)
            return 2
        if isinstance(err, ParameterError):
            print(f"blip2 {args.command}: {err}", file=sys.stderr)
            return 2
        if os.environ.get("BLIP2_TRACEBACK"):
            raise
        print(f"blip2 {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
