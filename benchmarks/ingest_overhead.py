"""The ingest flow's overhead against plain img2dataset, on the same manifest over loopback HTTP.

    .venv/bin/python benchmarks/ingest_overhead.py --images 8000 --repeats 2

Both sides download the same synthetic corpus from the same local server with the same img2dataset
parameters (processes, threads, image size, shard size, the manifest's extra columns kept). "plain"
calls `img2dataset.download` directly on the URL manifest; "flow" runs `ingest_flow`: manifest
validation, img2dataset in a child process with the probing resizer, per-shard registration in the
catalog (with tar checksums), artifacts.
The Prefect API is started once before timing (a deployment talks to a running server). Runs
alternate plain/flow so that drift on a shared machine hits both. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import pyarrow.parquet as pq  # noqa: E402

from data_catalog.corpus_server import CorpusServer  # noqa: E402
from data_catalog.synth import SynthConfig, synthesize, url_manifest  # noqa: E402
from flows.download import DownloadOptions, img2dataset_kwargs  # noqa: E402

PLAIN = """
import json, sys
import img2dataset
if __name__ == "__main__":
    img2dataset.download(**json.loads(sys.argv[1]))
"""


def time_plain(manifest: Path, out: Path, opts: DownloadOptions) -> float:
    # The flow carries the manifest's extra columns (ids, ground truth) into every sample: so does plain.
    extra = [c for c in pq.read_schema(manifest).names if c not in ("url", "caption")]
    kwargs = img2dataset_kwargs(manifest, out, opts, extra)
    out.parent.mkdir(parents=True, exist_ok=True)
    script = out.parent / "plain_img2dataset.py"
    script.write_text(PLAIN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(script), json.dumps(kwargs)], check=True, capture_output=True)
    return time.perf_counter() - t0


def time_flow(manifest: Path, home: Path, opts: DownloadOptions) -> float:
    from flows.ingest import IngestParams, ingest_flow

    t0 = time.perf_counter()
    params = IngestParams(source="bench", inputs=(manifest,), download=opts, allow_loopback=True, home=home)
    summary = ingest_flow(params)
    elapsed = time.perf_counter() - t0
    assert summary.samples_failed == 0, summary
    return elapsed


def warm_prefect() -> None:
    from prefect import flow

    @flow
    def warm() -> int:
        return 1

    warm()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    args = ap.parse_args()
    opts = DownloadOptions(
        image_size=96,
        samples_per_shard=args.samples_per_shard,
        processes=args.processes,
        threads=args.threads,
        timeout_s=10,
    )
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        tmp = Path(tmp)
        synthesize(
            tmp / "corpus",
            SynthConfig(seed=1, n_pretrain=args.images, n_coco=10, n_vqa_images=10, n_retrieval=10),
        )
        warm_prefect()
        plain, flow = [], []
        with CorpusServer(tmp / "corpus") as srv:
            manifest = url_manifest(tmp / "corpus", srv.base_url, "pretrain", out=tmp / "urls.parquet").path
            for i in range(args.repeats):
                plain.append(time_plain(manifest, tmp / f"plain{i}" / "shards", opts))
                flow.append(time_flow(manifest, tmp / f"flow{i}", opts))
    result = {
        "benchmark": "ingest_overhead",
        "images": args.images,
        "processes": args.processes,
        "threads": args.threads,
        "plain_s": [round(t, 2) for t in plain],
        "flow_s": [round(t, 2) for t in flow],
        "plain_images_per_s": round(args.images / statistics.median(plain), 1),
        "flow_images_per_s": round(args.images / statistics.median(flow), 1),
        "overhead": round(statistics.median(flow) / statistics.median(plain) - 1, 4),
        "cpu": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
