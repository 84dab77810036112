"""The demo's data and `blip2 demo`: the miniature replication on the embedded default, on one CPU machine.

`corpus_ingest_flow` renders the synthetic corpus, serves it over loopback HTTP and ingests every image
set with img2dataset for real, exactly as a public source would be (the pipeline's first stage).
`run_demo` runs the whole pipeline (flows/pipeline.py) with its defaults and prints the metric table.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from pydantic import BaseModel, ConfigDict, Field, field_validator

from data_catalog.corpus_server import CorpusServer
from data_catalog.synth import SynthConfig, load_corpus, synthesize, url_manifest
from flows.common import layout_for
from flows.download import DownloadOptions
from flows.ingest import IngestParams, IngestSummary, ingest_flow
from flows.pipeline import PipelineParams, PipelineSummary, pipeline_flow

DEMO_PORT = 18765
# Image set of the corpus -> catalog source name. Every set is ingested as its own source.
DEMO_SOURCES = {
    "pretrain": "synth-pretrain",
    "coco_train": "synth-coco-train",
    "coco_val": "synth-coco-val",
    "coco_test": "synth-coco-test",
    "vqa_train": "synth-vqa-train",
    "vqa_val": "synth-vqa-val",
    "retrieval_test": "synth-retrieval-test",
}


class CorpusIngestParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    n_pretrain: int = Field(4000, ge=10)
    n_coco: int = Field(600, ge=10)
    n_vqa_images: int = Field(400, ge=10)
    n_retrieval: int = Field(500, ge=10)
    n_teacher: int = Field(
        0, ge=0, description="clean captioned images the teachers (stand-in pretrained models) learn from"
    )
    image_size: int = Field(96, ge=16, description="stored image side; the tiny preset crops 64 px from it")
    samples_per_shard: int = Field(1000, ge=10)
    image_sets: tuple[str, ...] | None = Field(
        None, description=f"image sets to ingest (default all): {', '.join(DEMO_SOURCES)}"
    )
    home: Path | None = None

    @field_validator("image_sets")
    @classmethod
    def _known_sets(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        unknown = sorted(set(value or ()) - set(DEMO_SOURCES))
        if unknown:
            raise ValueError(f"unknown image set(s) {unknown}; the corpus has {list(DEMO_SOURCES)}")
        return value


@task(name="synthesize-corpus")
def synthesize_corpus(params: CorpusIngestParams, corpus_dir: str) -> dict[str, int]:
    """Render the corpus once; an existing corpus with the same configuration is reused."""
    cfg = SynthConfig(
        seed=params.seed,
        n_pretrain=params.n_pretrain,
        n_coco=params.n_coco,
        n_vqa_images=params.n_vqa_images,
        n_retrieval=params.n_retrieval,
        n_teacher=params.n_teacher,
    )
    root = Path(corpus_dir)
    if (root / "corpus.json").exists():
        info = load_corpus(root)
        if info.config == cfg:
            get_run_logger().info("corpus at %s is up to date: reused", root)
            return info.image_sets
    return synthesize(root, cfg).image_sets


@flow(name="corpus-ingest", log_prints=True)
def corpus_ingest_flow(params: CorpusIngestParams) -> dict[str, IngestSummary]:
    """Synthetic corpus -> loopback HTTP -> ingest of every image set."""
    layout = layout_for(params.home)
    corpus_dir = layout.home / "corpus"
    sets = synthesize_corpus(params, str(corpus_dir))
    download = DownloadOptions(
        image_size=params.image_size,
        resize_mode="keep_ratio",
        samples_per_shard=params.samples_per_shard,
        # One download thread per process: img2dataset writes a shard's samples as their downloads finish,
        # so with one thread each shard holds its samples in manifest order and every fresh home gets the
        # same shards (the loaders and CapFilt then see the same batches). The corpus is on loopback, so
        # threads buy nothing here.
        threads=1,
        timeout_s=10,
    )
    summaries: dict[str, IngestSummary] = {}
    server = _start_server(corpus_dir)
    try:
        for image_set, source in DEMO_SOURCES.items():
            if not sets.get(image_set) or (params.image_sets and image_set not in params.image_sets):
                continue
            urls = url_manifest(corpus_dir, server.base_url, image_set)
            summaries[source] = ingest_flow(
                IngestParams(
                    source=source,
                    inputs=(urls.path,),
                    download=download,
                    allow_loopback=True,  # the corpus server is ours, on 127.0.0.1
                    home=layout.home,
                )
            )
    finally:
        server.stop()
    return summaries


def _start_server(corpus_dir: Path) -> CorpusServer:
    """The corpus server on a stable loopback port, so that a re-run produces the same URL manifests
    (and finds its shards up to date); any free port when that one is taken."""
    port = int(os.environ.get("BLIP2_DEMO_PORT", DEMO_PORT))
    try:
        return CorpusServer(corpus_dir, port=port).start()
    except OSError:
        get_run_logger().warning(
            "port %d is busy: serving the corpus on a random port (a re-run re-downloads)", port
        )
        return CorpusServer(corpus_dir).start()


def run_demo(params: PipelineParams) -> int:
    """The pipeline with the demo's defaults; prints the metrics beside their baselines, and the paths."""
    start = time.perf_counter()
    summary = pipeline_flow(params)
    minutes = (time.perf_counter() - start) / 60
    print()
    print(metric_table(summary))
    print()
    for stage, seconds in summary.seconds.items():
        print(f"  {stage:<22}{seconds:>8.0f} s")
    print(f"demo finished in {minutes:.1f} min")
    print(f"report:  {summary.report or '-'}")
    print(f"catalog: {summary.catalog}")
    print("next:    blip2 catalog status | blip2 catalog runs | blip2 ui")
    return 0


def metric_table(summary: PipelineSummary) -> str:
    """The pipeline's metrics beside their baselines, as a fixed-width table."""
    lines = [f"{'result':<48}{'value':>9}  {'baseline':<18}{'value':>9}"]
    for m in summary.metrics:
        base = "-" if m.baseline_value is None else f"{m.baseline_value:.2f}"
        lines.append(f"{m.what:<48}{m.value:>9.2f}  {m.baseline:<18}{base:>9}")
    return "\n".join(lines)
