"""COCO captions (`captions_train2014.json`) and the Karpathy split file (`dataset_coco.json`).

Both hold several captions per image. A manifest row is one image (img2dataset downloads each URL
once): `caption` is its first non-empty caption and `captions` all of them as a JSON list, which
img2dataset carries into each sample's metadata as a plain string.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_catalog.adapters.manifest import ManifestError, ManifestOptions, join_url

_COCO_SCHEMA = pa.schema(
    [("url", pa.string()), ("caption", pa.string()), ("captions", pa.string()), ("coco_id", pa.int64()),
     ("width", pa.int64()), ("height", pa.int64())]
)  # fmt: skip
_KARPATHY_SCHEMA = pa.schema(
    [("url", pa.string()), ("caption", pa.string()), ("captions", pa.string()), ("coco_id", pa.int64()),
     ("karpathy_imgid", pa.int64()), ("split", pa.string())]
)  # fmt: skip


def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from err


def require(record: dict, keys: tuple[str, ...], where: str, path: Path) -> None:
    """Raise ManifestError naming the file, the record and the missing field."""
    if not isinstance(record, dict):
        raise ManifestError(f"{path}: {where} is a {type(record).__name__}, expected an object")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ManifestError(f"{path}: {where} is missing required field(s) {missing}")


def caption_columns(captions: list[str | None]) -> tuple[str, str]:
    """(first non-empty caption, JSON list of the non-empty captions)."""
    kept = [c.strip() for c in captions if c and c.strip()]
    return (kept[0] if kept else ""), json.dumps(kept, ensure_ascii=False)


def _coco_url(image: dict, options: ManifestOptions) -> str | None:
    if options.base_url is not None:
        return join_url(options.base_url, image.get("file_name") or "")
    return image.get("coco_url") or image.get("flickr_url")


def _coco_rows(path: Path, options: ManifestOptions) -> dict[str, list]:
    data = load_json(path)
    require(data, ("images", "annotations"), "the top-level object", path)
    captions: dict[Any, list[str]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        require(ann, ("image_id", "caption"), f"annotations[{i}]", path)
        captions[ann["image_id"]].append(ann["caption"])
    rows: dict[str, list] = {name: [] for name in _COCO_SCHEMA.names}
    for i, image in enumerate(data["images"]):
        require(image, ("id",), f"images[{i}]", path)
        if options.base_url is not None:
            require(image, ("file_name",), f"images[{i}] (base_url builds URLs from file_name)", path)
        first, every = caption_columns(captions.get(image["id"], []))
        rows["url"].append(_coco_url(image, options))
        rows["caption"].append(first)
        rows["captions"].append(every)
        rows["coco_id"].append(image["id"])
        rows["width"].append(image.get("width"))
        rows["height"].append(image.get("height"))
    return rows


def read_coco_captions(inputs: list[Path], options: ManifestOptions) -> Iterator[pa.Table]:
    """COCO caption annotation files: `images` (id, coco_url / flickr_url / file_name) + `annotations`."""
    for path in inputs:
        yield pa.table(_coco_rows(path, options), schema=_COCO_SCHEMA)


def _karpathy_rows(path: Path, options: ManifestOptions) -> dict[str, list]:
    data = load_json(path)
    require(data, ("images",), "the top-level object", path)
    rows: dict[str, list] = {
        "url": [], "caption": [], "captions": [], "coco_id": [], "karpathy_imgid": [], "split": []
    }  # fmt: skip
    for i, image in enumerate(data["images"]):
        require(image, ("filename", "split", "sentences"), f"images[{i}]", path)
        if options.splits is not None and image["split"] not in options.splits:
            continue
        # Flickr30k's file has no filepath; COCO's says train2014 / val2014.
        relative = f"{image['filepath']}/{image['filename']}" if image.get("filepath") else image["filename"]
        for j, sentence in enumerate(image["sentences"]):
            require(sentence, ("raw",), f"images[{i}].sentences[{j}]", path)
        first, every = caption_columns([s["raw"] for s in image["sentences"]])
        rows["url"].append(join_url(options.base_url, relative))
        rows["caption"].append(first)
        rows["captions"].append(every)
        rows["coco_id"].append(image.get("cocoid"))
        rows["karpathy_imgid"].append(image.get("imgid"))
        rows["split"].append(image["split"])
    return rows


def read_karpathy(inputs: list[Path], options: ManifestOptions) -> Iterator[pa.Table]:
    """Karpathy split files (`dataset_coco.json`, `dataset_flickr30k.json`); URLs need `base_url`."""
    if options.base_url is None:
        raise ManifestError(
            f"{[str(p) for p in inputs]}: the Karpathy format holds file paths, not URLs; set base_url"
        )
    for path in inputs:
        yield pa.table(_karpathy_rows(path, options), schema=_KARPATHY_SCHEMA)
