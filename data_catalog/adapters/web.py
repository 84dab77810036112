"""Web-scale sources: CC3M and CC12M TSVs, SBU captions, LAION parquet. All streamed.

These files run to many GB, so they are read in batches of `options.batch_rows` (lines, or Parquet
record batches) and never held whole. `sample_id` numbers the rows across the inputs in the order
given (LAION keeps its own SAMPLE_ID when the file has one).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_catalog.adapters.manifest import (
    DROP_COLUMN,
    LaionFilter,
    ManifestError,
    ManifestOptions,
    batched,
    check_columns,
)

# (url, caption) from one line, or None when the line does not split into both.
LineParser = Callable[[str], tuple[str, str] | None]

_PAIR_SCHEMA = pa.schema(
    [("url", pa.string()), ("caption", pa.string()), ("sample_id", pa.int64()), (DROP_COLUMN, pa.string())]
)


def _looks_like_url(text: str) -> bool:
    return text.strip().lower().startswith(("http://", "https://"))


def _cc3m_line(line: str) -> tuple[str, str] | None:
    caption, tab, url = line.rpartition("\t")  # CC3M: caption<TAB>url
    return (url, caption) if tab else None


def _cc12m_line(line: str) -> tuple[str, str] | None:
    url, tab, caption = line.partition("\t")  # CC12M: url<TAB>caption
    return (url, caption) if tab else None


_URL_FIRST, _CAPTION_FIRST = "url<TAB>caption", "caption<TAB>url"


def _check_column_order(path: Path, first_line: str, url_first: bool) -> None:
    # The two Conceptual Captions releases store the columns in opposite orders; reading one as the
    # other would drop every row as "bad_scheme", so say which file it looks like instead.
    fields = first_line.rstrip("\n").split("\t")
    if len(fields) < 2:
        return
    url_field, other = (fields[0], fields[-1]) if url_first else (fields[-1], fields[0])
    if not _looks_like_url(url_field) and _looks_like_url(other):
        want, got = (_URL_FIRST, _CAPTION_FIRST) if url_first else (_CAPTION_FIRST, _URL_FIRST)
        raise ManifestError(f"{path}: expected {want} lines but the first line looks like {got}")


def _ids(first: int, n: int) -> pa.Array:
    return pa.array(range(first, first + n), pa.int64())


def _pair_table(pairs: list[tuple[str, str] | None], first_id: int) -> pa.Table:
    return pa.table(
        {
            "url": [p[0] if p else None for p in pairs],
            "caption": [p[1] if p else None for p in pairs],
            "sample_id": _ids(first_id, len(pairs)),
            DROP_COLUMN: [None if p else "malformed_line" for p in pairs],
        },
        schema=_PAIR_SCHEMA,
    )


def _read_tsv(
    inputs: list[Path], options: ManifestOptions, parse: LineParser, url_first: bool
) -> Iterator[pa.Table]:
    next_id = 0
    for path in inputs:
        with open(path, encoding="utf-8", errors="replace", newline="\n") as fh:
            lines = (line.rstrip("\r\n") for line in fh)
            for i, batch in enumerate(batched(lines, options.batch_rows)):
                if i == 0:
                    _check_column_order(path, batch[0], url_first)
                yield _pair_table([parse(line) for line in batch], next_id)
                next_id += len(batch)


def read_cc3m(inputs: list[Path], options: ManifestOptions) -> Iterator[pa.Table]:
    """Conceptual Captions 3M: `caption<TAB>url` lines, no header."""
    return _read_tsv(inputs, options, _cc3m_line, url_first=False)


def read_cc12m(inputs: list[Path], options: ManifestOptions) -> Iterator[pa.Table]:
    """Conceptual 12M: `url<TAB>caption` lines, no header."""
    return _read_tsv(inputs, options, _cc12m_line, url_first=True)


def _sbu_pair(inputs: list[Path]) -> tuple[Path, Path]:
    urls = [p for p in inputs if p.name.endswith("_urls.txt")]
    captions = [p for p in inputs if p.name.endswith("_captions.txt")]
    if len(inputs) != 2 or len(urls) != 1 or len(captions) != 1:
        raise ManifestError(
            f"{[str(p) for p in inputs]}: SBU needs exactly two line-aligned files, "
            "SBU_captioned_photo_dataset_urls.txt and SBU_captioned_photo_dataset_captions.txt"
        )
    return urls[0], captions[0]


def read_sbu(inputs: list[Path], options: ManifestOptions) -> Iterator[pa.Table]:
    """SBU Captioned Photo Dataset as released: a URL file and a caption file, aligned line by line."""
    url_path, caption_path = _sbu_pair(inputs)
    next_id = 0
    with (
        open(url_path, encoding="utf-8", errors="replace") as urls,
        open(caption_path, encoding="utf-8", errors="replace") as captions,
    ):
        pairs = itertools.zip_longest(urls, captions)
        for batch in batched(pairs, options.batch_rows):
            if batch[-1][0] is None or batch[-1][1] is None:
                n_urls, n_caps = _count_lines(url_path), _count_lines(caption_path)
                raise ManifestError(
                    f"{url_path} has {n_urls} lines but {caption_path} has {n_caps}: "
                    "they must be line-aligned"
                )
            yield _pair_table([(u.rstrip("\r\n"), c.rstrip("\r\n")) for u, c in batch], next_id)
            next_id += len(batch)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def parquet_columns(path: Path) -> list[str]:
    try:
        return pq.read_schema(path).names
    except pa.ArrowInvalid as err:
        raise ManifestError(f"{path}: not a Parquet file ({err})") from err


def parquet_batches(path: Path, columns: list[str], options: ManifestOptions) -> Iterator[pa.Table]:
    """`columns` of `path` in tables of at most `options.batch_rows` rows; ManifestError if one is missing."""
    check_columns(parquet_columns(path), columns, path)
    reader = pq.ParquetFile(path)
    for batch in reader.iter_batches(batch_size=options.batch_rows, columns=columns):
        yield pa.Table.from_batches([batch])


def read_sbu_parquet(inputs: list[Path], options: ManifestOptions) -> Iterator[pa.Table]:
    """SBU as Parquet (the Hugging Face `sbu_captions` layout): `image_url`, `caption`[, `user_id`]."""
    next_id = 0
    for path in inputs:
        optional = [c for c in ("user_id",) if c in parquet_columns(path)]
        for table in parquet_batches(path, ["image_url", "caption", *optional], options):
            table = table.rename_columns(["url", "caption", *optional])
            yield table.append_column("sample_id", _ids(next_id, table.num_rows))
            next_id += table.num_rows


_LAION_NAMES = {"URL": "url", "TEXT": "caption"}  # the other columns are only lower-cased
_LAION_OPTIONAL = ("similarity", "punsafe", "pwatermark", "WIDTH", "HEIGHT", "SAMPLE_ID", "LICENSE", "NSFW")


def _filter_columns(f: LaionFilter) -> list[str]:
    needed = [("similarity", f.min_similarity), ("punsafe", f.max_punsafe), ("pwatermark", f.max_pwatermark)]
    columns = [name for name, limit in needed if limit is not None]
    if f.min_side is not None or f.max_aspect_ratio is not None:
        columns += ["WIDTH", "HEIGHT"]
    return columns


def _laion_reasons(table: pa.Table, f: LaionFilter) -> pa.Array:
    """The filter's drop reason per row; a missing (null) score fails its criterion."""
    checks: list[tuple[str, pa.Array]] = []
    if f.min_similarity is not None:
        checks.append(("low_similarity", pc.less(table["similarity"], f.min_similarity)))
    if f.max_punsafe is not None:
        checks.append(("unsafe", pc.greater(table["punsafe"], f.max_punsafe)))
    if f.max_pwatermark is not None:
        checks.append(("watermark", pc.greater(table["pwatermark"], f.max_pwatermark)))
    width, height = (table["WIDTH"], table["HEIGHT"]) if "WIDTH" in table.column_names else (None, None)
    if f.min_side is not None:
        checks.append(("too_small", pc.less(pc.min_element_wise(width, height), f.min_side)))
    if f.max_aspect_ratio is not None:
        longer = pc.cast(pc.max_element_wise(width, height), pa.float64())
        ratio = pc.divide(longer, pc.min_element_wise(width, height))
        checks.append(("bad_aspect_ratio", pc.greater(ratio, f.max_aspect_ratio)))
    reasons = pa.nulls(table.num_rows, pa.string())
    for reason, failed in checks:
        fresh = pc.and_(pc.is_null(reasons), pc.fill_null(failed.combine_chunks(), True))
        reasons = pc.if_else(fresh, pa.scalar(reason, pa.string()), reasons)
    return reasons


def _laion_table(table: pa.Table, f: LaionFilter, first_id: int) -> pa.Table:
    reasons = _laion_reasons(table, f)
    if "SAMPLE_ID" not in table.column_names:
        table = table.append_column("SAMPLE_ID", _ids(first_id, table.num_rows))
    table = table.rename_columns([_LAION_NAMES.get(n, n.lower()) for n in table.column_names])
    return table.append_column(DROP_COLUMN, reasons)


def read_laion(inputs: list[Path], options: ManifestOptions) -> Iterator[pa.Table]:
    """LAION-400M / LAION-5B metadata parquet (`URL`, `TEXT`, `similarity`, ...), through `laion_filter`."""
    f = options.laion_filter
    next_id = 0
    for path in inputs:
        names = parquet_columns(path)
        required = ["URL", "TEXT", *_filter_columns(f)]
        check_columns(names, required, path)
        columns = list(dict.fromkeys(required + [c for c in _LAION_OPTIONAL if c in names]))
        for table in parquet_batches(path, columns, options):
            yield _laion_table(table, f, next_id)
            next_id += table.num_rows
