"""Visual Genome region descriptions, joined with `image_data.json` for the image URLs.

`region_descriptions.json` is a list of `{id, regions: [{region_id, image_id, phrase, x, y, width,
height}]}` (one entry per image); `image_data.json` lists `{image_id (v1.2: id), url, width, height,
coco_id, flickr_id}`. Both are single JSON documents (about 700 MB for the regions), so they are read
whole: the stdlib has no streaming JSON parser and the sizes fit in memory.

A row is one image: `caption` is its first region phrase, `captions` every phrase and `regions` every
region with its box (JSON), `region_id` the id of the region that gave `caption`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from data_catalog.adapters.coco import caption_columns, load_json, require
from data_catalog.adapters.manifest import DROP_COLUMN, ManifestError, ManifestOptions

_REGION_FIELDS = ("region_id", "phrase", "x", "y", "width", "height")
_SCHEMA = pa.schema(
    [("url", pa.string()), ("caption", pa.string()), ("captions", pa.string()), ("regions", pa.string()),
     ("vg_image_id", pa.int64()), ("region_id", pa.int64()), ("coco_id", pa.int64()),
     ("width", pa.int64()), ("height", pa.int64()), (DROP_COLUMN, pa.string())]
)  # fmt: skip


def _split_inputs(inputs: list[Path]) -> tuple[list[Path], Path]:
    image_data = [p for p in inputs if "image_data" in p.name]
    regions = [p for p in inputs if "image_data" not in p.name]
    if len(image_data) != 1 or not regions:
        raise ManifestError(
            f"{[str(p) for p in inputs]}: Visual Genome needs region description file(s) and exactly one "
            f"image_data.json (found {len(image_data)} image_data file(s), {len(regions)} region file(s))"
        )
    return regions, image_data[0]


def _load_images(path: Path) -> dict[int, dict]:
    data = load_json(path)
    if not isinstance(data, list):
        raise ManifestError(f"{path}: expected a JSON list of images, got {type(data).__name__}")
    images = {}
    for i, image in enumerate(data):
        key = "image_id" if "image_id" in image else "id"
        require(image, (key, "url"), f"[{i}]", path)
        images[image[key]] = image
    return images


def _image_row(entry: dict, where: str, path: Path, images: dict[int, dict]) -> dict:
    key = "id" if "id" in entry else "image_id"
    require(entry, (key, "regions"), where, path)
    for j, region in enumerate(entry["regions"]):
        require(region, _REGION_FIELDS, f"{where}.regions[{j}]", path)
    phrases = [r["phrase"] for r in entry["regions"]]
    first, every = caption_columns(phrases)
    first_region = next((r["region_id"] for r in entry["regions"] if (r["phrase"] or "").strip()), None)
    image = images.get(entry[key])
    return {
        "url": image["url"] if image else None,
        "caption": first,
        "captions": every,
        "regions": json.dumps([{f: r[f] for f in _REGION_FIELDS} for r in entry["regions"]]),
        "vg_image_id": entry[key],
        "region_id": first_region,
        "coco_id": image.get("coco_id") if image else None,
        "width": image.get("width") if image else None,
        "height": image.get("height") if image else None,
        # Without an image_data entry there is no URL to fetch: a data error worth counting apart.
        DROP_COLUMN: None if image else "no_image_data",
    }


def read_visual_genome(inputs: list[Path], options: ManifestOptions) -> Iterator[pa.Table]:
    """Region description file(s) + one `image_data.json` (recognised by its name)."""
    region_files, image_file = _split_inputs(inputs)
    images = _load_images(image_file)
    for path in region_files:
        data = load_json(path)
        if not isinstance(data, list):
            kind = type(data).__name__
            raise ManifestError(f"{path}: expected a JSON list of images with regions, got {kind}")
        rows = [_image_row(entry, f"[{i}]", path, images) for i, entry in enumerate(data)]
        yield pa.Table.from_pylist(rows, schema=_SCHEMA)
