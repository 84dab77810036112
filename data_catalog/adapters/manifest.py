"""URL manifests: the validation every source shares and the part writer.

An adapter turns one public format into Arrow tables with at least `url` and `caption` (plus its
source-id columns). It may mark rows it refuses itself (a LAION filter, a region without an image URL)
in a `_drop` column holding the reason. Everything else is decided here, the same way for every
source: missing URLs, URL schemes img2dataset cannot fetch, hosts that are IP literals in a refused range
(loopback, link-local, private, multicast, reserved: `blocked_<range>`, see data_catalog/url_safety.py),
unsafe sample keys, empty captions and duplicate URLs are dropped and counted by reason, then the
surviving rows are written as Parquet parts of bounded size.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from blip2_core.fileio import UnsafeKeyError, atomic_path, atomic_write_text, check_sample_key
from data_catalog.url_safety import literal_host_refusal

DROP_COLUMN = "_drop"
REPORT_NAME = "manifest.json"
T = TypeVar("T")


class ManifestError(ValueError):
    """A source file cannot become a manifest; the message names the file and the problem."""


@dataclass(frozen=True)
class LaionFilter:
    """Which LAION rows to keep. `None` disables a criterion.

    The BLIP/BLIP-2 papers do not publish the rule behind their 115M subset of LAION-400M; these are
    the knobs such a rule is made of (LAION's own metadata columns).
    """

    min_similarity: float | None = None
    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    min_side: int | None = None
    max_aspect_ratio: float | None = None


@dataclass(frozen=True)
class ManifestOptions:
    """Options of `build_manifest`; each adapter reads only the fields that concern its format."""

    allow_local: bool = False  # admit file:// URLs (img2dataset reads them; bare paths it does not)
    allow_loopback: bool = False  # admit 127.0.0.0/8 and ::1 hosts (the demo's and the tests' corpus server)
    part_rows: int = 1_000_000
    batch_rows: int = 65_536  # rows read at a time from streamed inputs
    base_url: str | None = None  # COCO / Karpathy: url = base_url + file path
    splits: tuple[str, ...] | None = None  # Karpathy: keep these splits (None: all)
    laion_filter: LaionFilter = field(default_factory=LaionFilter)
    url_column: str = "url"  # generic formats
    caption_column: str = "caption"
    keep_columns: tuple[str, ...] | None = None  # generic formats: None keeps every other column


@dataclass(frozen=True)
class ManifestReport:
    """What `build_manifest` read, kept and dropped (by reason), and the parts it wrote."""

    n_in: int
    n_out: int
    dropped: dict[str, int]
    parts: list[Path]


def batched(items: Iterable[T], n: int) -> Iterator[tuple[T, ...]]:
    """itertools.batched, which Python 3.11 lacks."""
    it = iter(items)
    while chunk := tuple(itertools.islice(it, n)):
        yield chunk


def join_url(base_url: str, relative: str) -> str:
    """`base_url` + a relative file path, percent-encoding what a URL path cannot hold."""
    from urllib.parse import quote

    return base_url.rstrip("/") + "/" + quote(relative.lstrip("/"), safe="/")


def url_hash(url: str) -> int:
    # 8 bytes per URL instead of the URL itself keeps the seen-set of a 100M-row source in a few GB;
    # a false duplicate needs a 64-bit collision (about 1 in 3,000 over 1e8 URLs).
    return int.from_bytes(hashlib.blake2b(url.encode("utf-8"), digest_size=8).digest(), "little")


def _mark(reasons: pa.Array, mask: pa.Array, reason: str) -> pa.Array:
    """Give `reason` to the rows in `mask` that have no reason yet (first reason wins)."""
    fresh = pc.and_(pc.is_null(reasons), pc.fill_null(mask, True))
    return pc.if_else(fresh, pa.scalar(reason, pa.string()), reasons)


def _scheme_ok(url: pa.Array, allow_local: bool) -> pa.Array:
    lower = pc.utf8_lower(url)
    ok = pc.or_(pc.starts_with(lower, "http://"), pc.starts_with(lower, "https://"))
    if allow_local:
        ok = pc.or_(ok, pc.starts_with(lower, "file://"))
    return ok


# Hosts that may be IP literals (dotted digits or a bracketed IPv6), so only those rows reach Python.
_IP_LITERAL_HOST = r"^[a-z][a-z0-9+.-]*://([^/@?#]*@)?(\[|[0-9.]+(:|/|\?|#|$))"


def _mark_blocked_hosts(url: pa.Array, reasons: pa.Array, allow_loopback: bool) -> pa.Array:
    """`blocked_<range>` for URLs whose host is an IP literal in a refused range (first reason wins)."""
    candidates = pc.match_substring_regex(pc.utf8_lower(url), _IP_LITERAL_HOST)
    if not pc.any(candidates).as_py():
        return reasons
    marked = reasons.to_pylist()
    for i, (u, hit) in enumerate(zip(url.to_pylist(), candidates.to_pylist(), strict=True)):
        if hit and marked[i] is None:
            marked[i] = literal_host_refusal(u, allow_loopback)
    return pa.array(marked, pa.string())


def _unsafe_key(key: object) -> bool:
    try:
        check_sample_key(str(key))
    except UnsafeKeyError:
        return True
    return False


def _mark_unsafe_keys(table: pa.Table, reasons: pa.Array) -> pa.Array:
    """A source's own `key` column travels into the shards beside img2dataset's keys: refuse any that
    would name a path outside a folder (`../x`, `/etc/x`)."""
    if "key" not in table.column_names:
        return reasons
    keys = table["key"].combine_chunks()
    if not pa.types.is_string(keys.type) and not pa.types.is_large_string(keys.type):
        return reasons  # numbers cannot escape a folder
    unsafe = pa.array([k is not None and _unsafe_key(k) for k in keys.to_pylist()], pa.bool_())
    return _mark(reasons, unsafe, "unsafe_key")


def _mark_duplicates(url: pa.Array, reasons: pa.Array, seen: set[int]) -> pa.Array:
    marked = reasons.to_pylist()
    for i, (u, reason) in enumerate(zip(url.to_pylist(), marked, strict=True)):
        if reason is not None:
            continue
        h = url_hash(u)
        if h in seen:
            marked[i] = "duplicate_url"
        else:
            seen.add(h)
    return pa.array(marked, pa.string())


@dataclass
class Validator:
    """Drops bad rows batch by batch, keeping counts and the URLs seen so far (first occurrence wins)."""

    allow_local: bool
    allow_loopback: bool = False
    n_in: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    seen: set[int] = field(default_factory=set)

    def __call__(self, table: pa.Table) -> pa.Table:
        self.n_in += table.num_rows
        url = pc.utf8_trim_whitespace(table["url"].combine_chunks().cast(pa.string()))
        caption = pc.utf8_trim_whitespace(table["caption"].combine_chunks().cast(pa.string()))
        if DROP_COLUMN in table.column_names:
            reasons = table[DROP_COLUMN].combine_chunks().cast(pa.string())
            table = table.drop_columns([DROP_COLUMN])
        else:
            reasons = pa.nulls(table.num_rows, pa.string())
        reasons = _mark(reasons, pc.equal(url, ""), "missing_url")
        reasons = _mark(reasons, pc.invert(_scheme_ok(url, self.allow_local)), "bad_scheme")
        reasons = _mark_blocked_hosts(url, reasons, self.allow_loopback)
        reasons = _mark_unsafe_keys(table, reasons)
        reasons = _mark(reasons, pc.equal(caption, ""), "empty_caption")
        reasons = _mark_duplicates(url, reasons, self.seen)
        counts = pc.value_counts(reasons.drop_null())
        self.dropped.update({c["values"].as_py(): c["counts"].as_py() for c in counts})
        table = table.set_column(table.column_names.index("url"), "url", url)
        table = table.set_column(table.column_names.index("caption"), "caption", caption)
        return table.filter(pc.is_null(reasons))


def check_columns(available: Iterable[str], required: Iterable[str], path: Path) -> None:
    """Raise ManifestError naming `path` and every required column it lacks."""
    have = set(available)
    missing = [c for c in required if c not in have]
    if missing:
        raise ManifestError(f"{path}: missing required column(s) {missing}; found {sorted(have)}")


class PartWriter:
    """Writes tables as `part-00000.parquet`, ... of at most `part_rows` rows each into `folder`."""

    def __init__(self, folder: Path, part_rows: int) -> None:
        if part_rows < 1:
            raise ManifestError(f"part_rows must be >= 1, got {part_rows}")
        self.folder = folder
        self.part_rows = part_rows
        self.pending: list[pa.Table] = []
        self.n_pending = 0
        self.names: list[str] = []

    def add(self, table: pa.Table) -> None:
        while table.num_rows:
            take = min(table.num_rows, self.part_rows - self.n_pending)
            self.pending.append(table.slice(0, take))
            self.n_pending += take
            table = table.slice(take)
            if self.n_pending == self.part_rows:
                self.flush()

    def flush(self) -> None:
        if not self.n_pending:
            return
        # Sources differ in their optional columns batch to batch (a column null in one file, present in
        # the next): promote to one schema per part.
        part = pa.concat_tables(self.pending, promote_options="default")
        name = f"part-{len(self.names):05d}.parquet"
        with atomic_path(self.folder / name) as tmp:
            pq.write_table(part, tmp)
        self.names.append(name)
        self.pending, self.n_pending = [], 0


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the finished `staging` folder; the old manifest goes only after that."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{out_dir.name}.", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old)


def _check_out_dir(inputs: list[Path], out_dir: Path) -> None:
    # The out folder is replaced as a whole: an input inside it would be deleted with the old manifest.
    out = out_dir.resolve()
    for path in inputs:
        if not path.exists():
            raise ManifestError(f"{path}: input file does not exist")
        if out == path.resolve() or out in path.resolve().parents:
            raise ManifestError(f"{path}: input lies inside the manifest folder {out_dir}, which is replaced")


def write_manifest(
    tables: Iterator[pa.Table],
    inputs: list[Path],
    out_dir: Path,
    options: ManifestOptions,
    source_format: str,
) -> ManifestReport:
    """Validate `tables` and write them as the manifest in `out_dir`, replacing any previous one whole."""
    _check_out_dir(inputs, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}.", dir=out_dir.parent))
    try:
        validate = Validator(options.allow_local, options.allow_loopback)
        writer = PartWriter(staging, options.part_rows)
        n_out = 0
        for table in tables:
            kept = validate(table)
            n_out += kept.num_rows
            writer.add(kept)
        writer.flush()
        dropped = dict(sorted(validate.dropped.items()))
        if n_out == 0:
            raise ManifestError(
                f"{[str(p) for p in inputs]}: no row survived validation "
                f"(read {validate.n_in}, dropped {dropped}); the manifest would be empty"
            )
        summary = {
            "format": source_format,
            "inputs": [str(p) for p in inputs],
            "n_in": validate.n_in,
            "n_out": n_out,
            "dropped": dropped,
            "parts": writer.names,
        }
        atomic_write_text(staging / REPORT_NAME, json.dumps(summary, indent=2) + "\n")
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ManifestReport(validate.n_in, n_out, dropped, [out_dir / name for name in writer.names])
