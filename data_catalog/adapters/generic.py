"""Any CSV, Parquet or JSON-lines file with a URL and a caption column, named by the options.

`url_column` and `caption_column` become `url` and `caption`; `keep_columns` chooses the other columns
carried into the manifest (None: all of them). The synthetic corpus's URL manifest reads as `parquet`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from data_catalog.adapters.manifest import ManifestError, ManifestOptions, batched, check_columns
from data_catalog.adapters.web import parquet_batches, parquet_columns


def _selected(names: list[str], path: Path, options: ManifestOptions) -> list[str]:
    """The input columns to read: url and caption first, then the kept ones (checked to exist)."""
    required = [options.url_column, options.caption_column]
    if options.keep_columns is None:
        # A column already called url/caption but not mapped to them would collide with the renamed ones.
        extra = [n for n in names if n not in required and n not in ("url", "caption")]
    else:
        extra = list(options.keep_columns)
    check_columns(names, required + extra, path)
    return required + extra


def _standardise(table: pa.Table) -> pa.Table:
    """Rename the first two columns (url and caption, by `_selected`'s order)."""
    return table.rename_columns(["url", "caption", *table.column_names[2:]])


def read_parquet(inputs: list[Path], options: ManifestOptions) -> Iterator[pa.Table]:
    for path in inputs:
        columns = _selected(parquet_columns(path), path, options)
        for table in parquet_batches(path, columns, options):
            yield _standardise(table)


def read_csv(inputs: list[Path], options: ManifestOptions) -> Iterator[pa.Table]:
    """CSV with a header line. url and caption are read as text; other columns' types are inferred."""
    text = {options.url_column: pa.string(), options.caption_column: pa.string()}
    for path in inputs:
        try:
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                convert_options=pacsv.ConvertOptions(column_types=text, strings_can_be_null=True),
            )
        except pa.ArrowInvalid as err:
            raise ManifestError(f"{path}: not a readable CSV file ({err})") from err
        columns = _selected(reader.schema.names, path, options)
        for batch in reader:
            yield _standardise(pa.Table.from_batches([batch]).select(columns))


def _json_records(path: Path, lines: tuple[str, ...], first_line: int) -> list[dict]:
    records = []
    for n, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}:{n}: not a JSON object ({err})") from err
    return records


def read_jsonl(inputs: list[Path], options: ManifestOptions) -> Iterator[pa.Table]:
    """One JSON object per line. Keys absent from a record read as null."""
    for path in inputs:
        columns: list[str] | None = None
        with open(path, encoding="utf-8") as fh:
            for i, lines in enumerate(batched(fh, options.batch_rows)):
                records = _json_records(path, lines, 1 + i * options.batch_rows)
                if not records:
                    continue
                if columns is None:
                    names = list(dict.fromkeys(k for record in records for k in record))
                    columns = _selected(names, path, options)
                yield _standardise(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in records]))
