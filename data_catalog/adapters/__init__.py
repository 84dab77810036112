"""Source adapters: public dataset formats -> URL manifests (Parquet parts of `url`, `caption`, ids).

    report = build_manifest("cc3m", [Path("Train_GCC-training.tsv")], layout.manifests("cc3m"))

Each adapter reads its format and yields Arrow tables; `manifest.write_manifest` validates them the
same way for every source and writes the parts. `ADAPTERS` maps the format names to the readers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa

from data_catalog.adapters.coco import read_coco_captions, read_karpathy
from data_catalog.adapters.generic import read_csv, read_jsonl, read_parquet
from data_catalog.adapters.manifest import (
    LaionFilter,
    ManifestError,
    ManifestOptions,
    ManifestReport,
    write_manifest,
)
from data_catalog.adapters.visual_genome import read_visual_genome
from data_catalog.adapters.web import read_cc3m, read_cc12m, read_laion, read_sbu, read_sbu_parquet

Adapter = Callable[[list[Path], ManifestOptions], Iterator[pa.Table]]

ADAPTERS: dict[str, Adapter] = {
    "coco": read_coco_captions,
    "karpathy": read_karpathy,
    "vg": read_visual_genome,
    "cc3m": read_cc3m,
    "cc12m": read_cc12m,
    "sbu": read_sbu,
    "sbu_parquet": read_sbu_parquet,
    "laion": read_laion,
    "csv": read_csv,
    "parquet": read_parquet,
    "jsonl": read_jsonl,
}


def build_manifest(
    format: str, inputs: list[Path], out_dir: Path, *, options: ManifestOptions | None = None
) -> ManifestReport:
    """Read `inputs` in `format` and write the validated manifest parts into `out_dir`.

    A previous manifest in `out_dir` is replaced only once the new one is complete; a manifest that
    would be empty raises ManifestError and leaves the old one in place.
    """
    if format not in ADAPTERS:
        raise ManifestError(f"unknown source format {format!r}; known: {sorted(ADAPTERS)}")
    if not inputs:
        raise ManifestError(f"format {format!r}: no input files given")
    options = options or ManifestOptions()
    inputs = [Path(p) for p in inputs]
    return write_manifest(ADAPTERS[format](inputs, options), inputs, Path(out_dir), options, format)


__all__ = [
    "ADAPTERS",
    "Adapter",
    "LaionFilter",
    "ManifestError",
    "ManifestOptions",
    "ManifestReport",
    "build_manifest",
]
