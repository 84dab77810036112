"""img2dataset, driven as the ingest engine: options, a safer resizer and the worker process.

The flow never calls img2dataset in its own process: it launches `python -m flows.img2dataset_worker`
as a child process (img2dataset spawns its own pool, prints progress bars and installs signal
handlers), watches the shard files it writes, and registers each finished shard in the catalog as it
appears.

Three things img2dataset does not do that a data engineer needs, added here without forking it:
- refuse decompression bombs before decoding them (img2dataset decodes first, then checks the area), and
  report truncated JPEGs that OpenCV would silently half-decode;
- refuse hosts that resolve to loopback, link-local, private, multicast or reserved addresses, checked
  on the address each connection uses (flows.address_guard; loopback only with `allow_loopback`);
- name the failure reasons in words the catalog classifier understands.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")


class DownloadOptions(BaseModel):
    """How img2dataset downloads and resizes. Defaults suit one machine; scale `processes` per node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # 224 for pretraining, 364 / 490 for the fine-tuning sets
    image_size: int = Field(224, ge=8, le=4096)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio"
    samples_per_shard: int = Field(10_000, ge=1)
    processes: int = Field(default_factory=lambda: max(1, os.cpu_count() or 1), ge=1)
    # Download threads per process. img2dataset writes each sample when its download finishes: with one
    # thread a shard holds its samples in manifest order, with more in whatever order they arrived.
    threads: int = Field(64, ge=1, le=2048)
    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(0, ge=0, le=10)
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="images with more pixels are refused before decoding (bombs)"
    )
    encode_quality: int = Field(95, ge=1, le=100)
    # Who runs the shard downloads: a process pool on this machine, or the tasks of a Spark session or
    # Ray cluster (one per shard, on any node; Ray joins RAY_ADDRESS, else starts a local instance;
    # pyspark is not in the lock: install it where Spark runs). The shards come out the same, so it is
    # not part of the ingest config hash.
    distributor: Literal["multiprocessing", "pyspark", "ray"] = "multiprocessing"


def img2dataset_kwargs(
    url_list: Path, output_folder: Path, opts: DownloadOptions, extra_columns: list[str]
) -> dict:
    """The keyword arguments of `img2dataset.download` for one ingest run."""
    return dict(
        url_list=str(url_list),
        output_folder=str(output_folder),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=extra_columns or None,
        output_format="webdataset",
        image_size=opts.image_size,
        resize_mode=opts.resize_mode,
        number_sample_per_shard=opts.samples_per_shard,
        processes_count=opts.processes,
        thread_count=opts.threads,
        timeout=opts.timeout_s,
        retries=opts.retries,
        encode_quality=opts.encode_quality,
        incremental_mode="incremental",
        enable_wandb=False,
        distributor=opts.distributor,
        compute_hash="sha256",
        oom_shard_count=5,
    )


def worker_command(kwargs: dict, max_pixels: int, allow_loopback: bool = False) -> list[str]:
    """The child-process command line that runs one img2dataset job."""
    job = json.dumps({"kwargs": kwargs, "max_pixels": max_pixels, "allow_loopback": allow_loopback})
    return [sys.executable, "-m", "flows.img2dataset_worker", job]
