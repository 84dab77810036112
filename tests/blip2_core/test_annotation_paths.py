"""Image paths read from annotation files (COCO, VQA, Visual Genome) cannot name a file outside the image
folder: an absolute path or a `..` that climbs out is refused, naming the file, the entry and the path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip2_core.fileio import UnsafeKeyError, path_under
from blip2_core.finetune import coco_caption_records, visual_genome_qa_records, vqa_records


@pytest.fixture()
def images(tmp_path) -> Path:
    """An image folder with one image, and a secret file beside it (outside the folder)."""
    folder = tmp_path / "data" / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "1.jpg").write_bytes(b"jpg")
    (folder / "sub" / "2.jpg").write_bytes(b"jpg")
    (tmp_path / "data" / "secret.jpg").write_bytes(b"not an image of this dataset")
    return folder


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../secret.jpg", "resolves outside the image folder"),
        ("sub/../../secret.jpg", "resolves outside the image folder"),
        ("..", "resolves outside the image folder"),
        ("/etc/passwd", "is absolute"),
        ("1.jpg\x00.png", "NUL byte"),
    ],
)
def test_path_under_refuses_names_that_leave_the_folder(images, name, problem):
    with pytest.raises(UnsafeKeyError, match=problem) as err:
        path_under(images, name, "ann.json: images[3]")
    assert str(err.value).startswith("ann.json: images[3]: image path ")
    assert repr(name) in str(err.value)


def test_path_under_keeps_names_inside_the_folder(images):
    assert path_under(images, "sub/2.jpg", "x") == images / "sub" / "2.jpg"
    assert path_under(images, "sub/../1.jpg", "x") == images / "sub/../1.jpg"  # stays inside
    assert path_under(images, 7, "x") == images / "7"  # ids are numbers


def _coco(tmp_path, file_name: str) -> Path:
    return _write(
        tmp_path / "captions.json",
        {
            "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": file_name}],
            "annotations": [{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}],
        },
    )


@pytest.mark.parametrize("file_name", ["../secret.jpg", "__ABS__"])
def test_coco_captions_refuse_file_names_outside_the_image_folder(tmp_path, images, file_name):
    if file_name == "__ABS__":
        file_name = str(images.parent / "secret.jpg")  # exists: only the check stops it
    ann = _coco(tmp_path, file_name)
    with pytest.raises(UnsafeKeyError) as err:
        coco_caption_records(ann, images)
    assert f"{ann}: images[1] (id 2): image path {file_name!r}" in str(err.value)
    assert [r.image for r in coco_caption_records(_coco(tmp_path, "sub/2.jpg"), images)][1].endswith("2.jpg")


def test_vqa_refuses_an_image_id_that_names_a_path_outside(tmp_path, images):
    questions = _write(
        tmp_path / "q.json",
        {"questions": [{"question_id": 10, "image_id": "../secret", "question": "what?"}]},
    )
    answers = _write(
        tmp_path / "a.json",
        {"annotations": [{"question_id": 10, "multiple_choice_answer": "x", "answers": []}]},
    )
    with pytest.raises(UnsafeKeyError) as err:
        vqa_records(questions, answers, images, "{image_id}.jpg")
    assert f"{questions}: image_id '../secret': image path '../secret.jpg' resolves outside" in str(err.value)


def test_visual_genome_refuses_an_image_id_that_names_a_path_outside(tmp_path, images):
    ok = {"id": 1, "qas": [{"question": "what?", "answer": "Red."}]}
    bad = {"id": str(images.parent / "secret"), "qas": [{"question": "what?", "answer": "x"}]}
    ann = _write(tmp_path / "question_answers.json", [ok, bad])
    with pytest.raises(UnsafeKeyError, match="is absolute") as err:
        visual_genome_qa_records(ann, images)
    assert f"{ann}: image_id {bad['id']!r}: image path" in str(err.value)
    assert visual_genome_qa_records(_write(tmp_path / "ok.json", [ok]), images)[0].text == "red"
