"""The URL manifest of a served corpus, with a known number of injected faults.

The server's port is only known once it runs, so the corpus stores relative paths and this writes
`url = base_url + path` on demand. A FaultSpec adds extra rows whose URLs fail in a known way (see
`data_catalog.corpus_server` for the fault routes); `<manifest>.faults.json` lists each one so an
ingest test can check that every failure was recorded with the right reason.
"""

from __future__ import annotations

import json
import os
import random
import socket
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from blip2_core.fileio import atomic_path, atomic_write_text
from data_catalog.synth.corpus import load_corpus

# Fault kind -> route prefix on the corpus server ("{slow}" is FaultSpec.slow_seconds).
_ROUTES = {
    "http_404": "fault/404/",
    "http_500": "fault/500/",
    "timeout": "fault/slow/{slow}/",
    "not_an_image": "fault/notimage/",
    "truncated_image": "fault/truncated/",
    "image_too_large": "fault/huge/",
}


@dataclass(frozen=True)
class FaultSpec:
    """How many rows of each fault to add. `timeout` rows wait `slow_seconds` (above the client timeout)."""

    http_404: int = 0
    http_500: int = 0
    timeout: int = 0
    connection_refused: int = 0
    not_an_image: int = 0
    truncated_image: int = 0
    image_too_large: int = 0
    duplicate_url: int = 0
    slow_seconds: float = 30.0

    def counts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "slow_seconds"}


@dataclass(frozen=True)
class UrlManifest:
    path: Path
    faults_path: Path
    n_rows: int
    faults: dict[str, int]


def closed_loopback_port() -> int:
    """A loopback port nothing listens on (bound, then released), for connection_refused faults."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fault_url(kind: str, path: str, base_url: str, spec: FaultSpec, closed_port: int) -> str:
    if kind == "connection_refused":
        return f"http://127.0.0.1:{closed_port}/{path}"
    return base_url + _ROUTES[kind].format(slow=f"{spec.slow_seconds:g}") + path


def _with_faults(rows: list[dict], base_url: str, spec: FaultSpec, rng: random.Random) -> list[dict]:
    """`rows` plus the fault rows, each at a random place (a duplicate always after its original)."""
    keyed = [(float(i), row) for i, row in enumerate(rows)]
    closed_port = closed_loopback_port()
    for kind, n in spec.counts().items():
        if n > len(rows):
            raise ValueError(f"FaultSpec.{kind}={n}: more faults than the {len(rows)} images of the split")
        # Distinct images per kind: two faults of one kind on one image would share a URL, and the
        # second would be dropped as a duplicate instead of failing as intended.
        for i in rng.sample(range(len(rows)), n):
            row = dict(rows[i], fault=kind)
            if kind == "duplicate_url":
                keyed.append((rng.uniform(i + 0.1, len(rows)), row))
            else:
                row["url"] = _fault_url(kind, row["path"], base_url, spec, closed_port)
                keyed.append((rng.uniform(-0.5, len(rows)), row))
    return [row for _, row in sorted(keyed, key=lambda kr: kr[0])]


def url_manifest(
    corpus_dir: str | os.PathLike[str],
    base_url: str,
    split: str = "pretrain",
    out: str | os.PathLike[str] | None = None,
    faults: FaultSpec | None = None,
) -> UrlManifest:
    """Write the URL manifest of image set `split` (url = base_url + path) to `out`.

    Default `out`: `<corpus>/urls/<split>.parquet`. Columns: url, caption, gt_caption,
    web_caption_kind, wrong_attribute, image_id, path, fault (null on normal rows). It reads as the
    `parquet` source format and as img2dataset input (url_col="url", caption_col="caption").
    """
    info = load_corpus(corpus_dir)
    if split not in info.image_sets:
        raise ValueError(f"url_manifest: unknown split {split!r}; the corpus has {sorted(info.image_sets)}")
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    spec = faults or FaultSpec()
    rows = pq.read_table(info.files[f"manifest_{split}"]).to_pylist()
    if not rows:
        raise ValueError(f"url_manifest: image set {split!r} is empty")
    for row in rows:
        row["url"], row["fault"] = base_url + row["path"], None
    rows = _with_faults(rows, base_url, spec, random.Random(f"{info.config.seed}:faults:{split}"))
    out = Path(out) if out is not None else info.root / "urls" / f"{split}.parquet"
    columns = [
        "url",
        "caption",
        "gt_caption",
        "web_caption_kind",
        "wrong_attribute",
        "image_id",
        "path",
        "fault",
    ]
    with atomic_path(out) as tmp:
        pq.write_table(pa.Table.from_pylist([{c: r[c] for c in columns} for r in rows]), tmp)
    faults_path = out.with_name(f"{out.stem}.faults.json")
    listed = [{"url": r["url"], "fault": r["fault"], "image_id": r["image_id"]} for r in rows if r["fault"]]
    record = {
        "base_url": base_url,
        "split": split,
        "manifest": out.name,
        "spec": asdict(spec),
        "faults": listed,
    }
    atomic_write_text(faults_path, json.dumps(record, indent=1) + "\n")
    return UrlManifest(out, faults_path, len(rows), spec.counts())
