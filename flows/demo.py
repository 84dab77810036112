"""`blip2 demo`: the miniature replication on the embedded default, end to end on one CPU machine.

The synthetic corpus is rendered, served over loopback HTTP, and ingested with img2dataset for real,
split by split, exactly as a public source would be. Later stages join the demo as they land.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from pydantic import BaseModel, ConfigDict, Field

from data_catalog.corpus_server import CorpusServer
from data_catalog.synth import SynthConfig, load_corpus, synthesize, url_manifest
from flows.common import layout_for
from flows.download import DownloadOptions
from flows.ingest import IngestParams, IngestSummary, ingest_flow

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


class DemoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    n_pretrain: int = Field(4000, ge=10)
    n_coco: int = Field(600, ge=10)
    n_vqa_images: int = Field(400, ge=10)
    n_retrieval: int = Field(500, ge=10)
    image_size: int = Field(96, ge=16, description="stored image side; the tiny preset crops 64 px from it")
    samples_per_shard: int = Field(1000, ge=10)
    home: Path | None = None


@task(name="synthesize-corpus")
def synthesize_corpus(params: DemoParams, corpus_dir: str) -> dict[str, int]:
    """Render the corpus once; an existing corpus with the same configuration is reused."""
    cfg = SynthConfig(
        seed=params.seed,
        n_pretrain=params.n_pretrain,
        n_coco=params.n_coco,
        n_vqa_images=params.n_vqa_images,
        n_retrieval=params.n_retrieval,
    )
    root = Path(corpus_dir)
    if (root / "corpus.json").exists():
        info = load_corpus(root)
        if info.config == cfg:
            get_run_logger().info("corpus at %s is up to date: reused", root)
            return info.image_sets
    return synthesize(root, cfg).image_sets


@flow(name="demo", log_prints=True)
def demo_flow(params: DemoParams) -> dict[str, IngestSummary]:
    """Synthetic corpus -> loopback HTTP -> ingest of every image set."""
    layout = layout_for(params.home)
    corpus_dir = layout.home / "corpus"
    sets = synthesize_corpus(params, str(corpus_dir))
    download = DownloadOptions(
        image_size=params.image_size,
        resize_mode="keep_ratio",
        samples_per_shard=params.samples_per_shard,
        threads=32,
        timeout_s=10,
    )
    summaries: dict[str, IngestSummary] = {}
    server = _start_server(corpus_dir)
    try:
        for image_set, source in DEMO_SOURCES.items():
            if not sets.get(image_set):
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


def run_demo(params: DemoParams) -> int:
    summaries = demo_flow(params)
    layout = layout_for(params.home)
    print()
    print(f"{'source':<24}{'images':>8}{'failed':>8}{'shards':>8}")
    for source, s in summaries.items():
        print(f"{source:<24}{s.samples_ok:>8}{s.samples_failed:>8}{s.shards:>8}")
    print()
    print(f"catalog: {layout.catalog}")
    print(f"shards:  {layout.home / 'shards'}")
    print("next:    blip2 catalog status")
    return 0
