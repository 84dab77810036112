"""Evaluation finds images by the paths its annotation files give (COCO `file_name`, Karpathy
`filepath/filename`, LAVIS `image`); a path that leaves the image folder is refused, naming the file,
the entry and the path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip2_core.fileio import UnsafeKeyError
from blip2_core.metrics import load_retrieval_gt
from flows.evaluate import _images_of_coco, _retrieval_image_files


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "data" / "images"
    (folder / "val2014").mkdir(parents=True)
    (folder / "val2014" / "a.jpg").write_bytes(b"jpg")
    (tmp_path / "data" / "secret.jpg").write_bytes(b"outside")
    return folder


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_coco_captions_for_captioning(tmp_path, images):
    def coco(name: str) -> Path:
        data = {"images": [{"id": 5, "file_name": "val2014/a.jpg"}, {"id": 6, "file_name": name}]}
        return _write(tmp_path / "captions.json", {**data, "annotations": []})

    ann = coco("../secret.jpg")
    with pytest.raises(UnsafeKeyError) as err:
        _images_of_coco(ann, images)
    assert f"{ann}: images[1] (id 6): image path '../secret.jpg' resolves outside" in str(err.value)
    assert _images_of_coco(coco("val2014/a.jpg"), images)[6] == str(images / "val2014" / "a.jpg")


def _karpathy(tmp_path: Path, filepath: str, filename: str) -> Path:
    entry = {"split": "test", "sentences": [{"raw": "a cat"}]}
    return _write(
        tmp_path / "dataset_coco.json",
        {
            "images": [
                {**entry, "filepath": "val2014", "filename": "a.jpg"},
                {**entry, "filepath": filepath, "filename": filename},
            ]
        },
    )


@pytest.mark.parametrize(
    ("filepath", "filename", "problem"),
    [("..", "secret.jpg", "resolves outside"), ("val2014", "../../secret.jpg", "resolves outside")],
)
def test_karpathy_split_for_retrieval(tmp_path, images, filepath, filename, problem):
    ann = _karpathy(tmp_path, filepath, filename)
    with pytest.raises(UnsafeKeyError, match=problem) as err:
        _retrieval_image_files(ann, images, load_retrieval_gt(ann, "test").image_keys)
    assert f"{ann}: image #1: image path '{filepath}/{filename}'" in str(err.value)
    ok = _karpathy(tmp_path, "val2014", "a.jpg")
    files = _retrieval_image_files(ok, images, load_retrieval_gt(ok, "test").image_keys)
    assert files == [str(images / "val2014" / "a.jpg")] * 2


def test_lavis_and_coco_files_for_retrieval(tmp_path, images):
    secret = str(images.parent / "secret.jpg")  # an existing file: only the check stops it
    lavis = _write(
        tmp_path / "test.json",
        [{"image": "val2014/a.jpg", "caption": ["x"]}, {"image": secret, "caption": "y"}],
    )
    with pytest.raises(UnsafeKeyError, match="is absolute") as err:
        _retrieval_image_files(lavis, images, load_retrieval_gt(lavis).image_keys)
    assert f"{lavis}: image #1: image path {secret!r}" in str(err.value)
    coco = _write(
        tmp_path / "captions.json",
        {
            "images": [{"id": 1, "file_name": "../secret.jpg"}],
            "annotations": [{"image_id": 1, "caption": "x"}],
        },
    )
    with pytest.raises(UnsafeKeyError, match=r"image #0: image path '\.\./secret\.jpg' resolves outside"):
        _retrieval_image_files(coco, images, load_retrieval_gt(coco).image_keys)
