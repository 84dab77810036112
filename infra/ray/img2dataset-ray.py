"""Download one source across the nodes of a Ray cluster with img2dataset's Ray distributor.

The ingest flow downloads on one machine (img2dataset's multiprocessing distributor). For a source too
large for one node (LAION-115M: ~1 day on one 16-core node), this launcher runs the same img2dataset job
(same manifest, same options, same probing resizer, same shard folder under the shared BLIP2_HOME) with
`distributor="ray"`: every shard becomes one Ray task (one CPU, `--threads` download threads), on any
node of the cluster. It never opens the catalog; afterwards the ingest flow registers the shards:

    # on a node of the Ray cluster (the image has the project installed), BLIP2_HOME on shared storage:
    python infra/ray/img2dataset-ray.py --source laion --format laion --input /data/blip2/raw/laion/*.parquet
    # wherever the flows run (the one catalog writer), with the same download options:
    blip2 ingest --source laion

The second step finds every shard finished (img2dataset's incremental mode skips them), registers each
one with its checks, and downloads whatever the Ray run left unfinished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def manifest_dir(home: Path, source: str) -> Path:
    from data_catalog.layout import Layout

    return Layout(home).manifests(source)


def build_manifest_once(home: Path, source: str, fmt: str, inputs: list[Path], allow_local: bool) -> Path:
    """Validate raw inputs into BLIP2_HOME/manifests/<source>, as the ingest flow does; never replace one."""
    from data_catalog.adapters import ManifestOptions, build_manifest

    out = manifest_dir(home, source)
    if out.exists():
        raise SystemExit(
            f"{out} exists: drop --input to download that manifest (shard ids are its row positions)"
        )
    report = build_manifest(fmt, inputs, out, options=ManifestOptions(allow_local=allow_local))
    print(f"manifest {source}: {report.n_out} of {report.n_in} rows kept, dropped {report.dropped or 'none'}")
    return out


def ray_job(home: Path, source: str, opts) -> dict:
    """The img2dataset job of the ingest flow for this source, with the Ray distributor."""
    from data_catalog.layout import Layout
    from flows.download import img2dataset_kwargs
    from flows.ingest import files_fingerprint, ingest_config_hash, manifest_info, manifest_parts

    layout = Layout(home)
    parts = manifest_parts(layout.manifests(source))
    _, extra = manifest_info(parts)
    manifest_arg = parts[0] if len(parts) == 1 else parts[0].parent
    kwargs = img2dataset_kwargs(manifest_arg, layout.shards(source), opts, extra)
    kwargs["distributor"] = "ray"  # one Ray task per shard; `processes_count` is not used by it
    config = ingest_config_hash(files_fingerprint(parts), opts)
    return {"kwargs": kwargs, "max_pixels": opts.max_image_pixels, "ingest_config": config}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="source name (the catalog's)")
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("BLIP2_HOME", "var")), help="BLIP2_HOME")
    ap.add_argument("--input", type=Path, nargs="+", help="raw source files: build the manifest first")
    ap.add_argument("--format", default="parquet", help="format of --input (data_catalog.adapters)")
    ap.add_argument("--allow-local", action="store_true", help="admit file:// URLs")
    ap.add_argument(
        "--address", default="auto", help="Ray cluster address (default: the one this node joined)"
    )
    ap.add_argument("--dry-run", action="store_true", help="print the img2dataset job and stop")
    g = ap.add_argument_group("download options: give the same to `blip2 ingest` afterwards")
    g.add_argument("--image-size", type=int)
    g.add_argument("--resize-mode")
    g.add_argument("--samples-per-shard", type=int)
    g.add_argument("--threads", type=int, help="download threads per shard task")
    g.add_argument("--timeout", type=float, dest="timeout_s")
    g.add_argument("--retries", type=int)
    g.add_argument("--max-image-pixels", type=int)
    g.add_argument("--encode-quality", type=int)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from flows.download import DownloadOptions

    names = ("image_size", "resize_mode", "samples_per_shard", "threads", "timeout_s", "retries")
    names += ("max_image_pixels", "encode_quality")
    opts = DownloadOptions(
        processes=1, **{n: getattr(args, n) for n in names if getattr(args, n) is not None}
    )
    if args.input:
        build_manifest_once(args.home, args.source, args.format, args.input, args.allow_local)
    job = ray_job(args.home, args.source, opts)
    print(json.dumps(job, indent=1, sort_keys=True))
    if args.dry_run:
        return 0
    import ray

    from flows.img2dataset_worker import main as run_img2dataset

    ray.init(address=args.address)
    print(f"Ray cluster: {ray.cluster_resources().get('CPU', 0):.0f} CPUs; one task per shard")
    run_img2dataset(json.dumps({"kwargs": job["kwargs"], "max_pixels": job["max_pixels"]}))
    config = job["ingest_config"]
    print(f"done; register the shards (ingest config {config}): blip2 ingest --source {args.source}")
    return 0


if __name__ == "__main__":  # img2dataset spawns processes: this guard is required
    sys.exit(main())
