"""The synthetic corpus: deterministic, disjoint splits, configured caption shares, standard formats."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from itertools import product
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_catalog.adapters import ManifestOptions, build_manifest
from data_catalog.synth import FaultSpec, SynthConfig, load_corpus, synthesize, url_manifest
from data_catalog.synth.captions import COLOURS, POSITIONS, WHERE, Detail, describe, groups, wrong_caption
from data_catalog.synth.scenes import sample_scene

SMALL = SynthConfig(seed=3, n_pretrain=40, n_coco=20, n_vqa_images=20, n_retrieval=10, n_teacher=6,
                    image_size=48, caption_shares=(0.5, 0.3, 0.2))  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("synth") / "corpus", SMALL)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def manifest(corpus, name: str) -> list[dict]:
    return pq.read_table(corpus.files[f"manifest_{name}"]).to_pylist()


def test_same_seed_same_files_other_seed_other_files(corpus, tmp_path):
    again = synthesize(tmp_path / "again", SMALL)
    assert digests(again.root) == digests(corpus.root)
    other = synthesize(tmp_path / "other", SynthConfig(**{**SMALL.__dict__, "seed": 4}))
    theirs, ours = digests(other.root), digests(corpus.root)
    assert theirs.keys() == ours.keys()
    assert theirs["manifests/pretrain.parquet"] != ours["manifests/pretrain.parquet"]
    images = [k for k in ours if k.endswith(".jpg")]
    assert sum(theirs[k] != ours[k] for k in images) > 0.9 * len(images)


def test_counts_images_and_sizes(corpus):
    assert corpus.image_sets == {"pretrain": 40, "coco_train": 16, "coco_val": 2, "coco_test": 2,
                                 "vqa_train": 16, "vqa_val": 4, "retrieval_test": 10,
                                 "teacher_train": 6}  # fmt: skip
    for name, n in corpus.image_sets.items():
        rows = manifest(corpus, name)
        assert len(rows) == n
        assert len(list((corpus.root / "images" / name).glob("*.jpg"))) == n
    image = Image.open(corpus.root / manifest(corpus, "coco_val")[0]["path"])
    assert (image.format, image.size) == ("JPEG", (48, 48))
    assert load_corpus(corpus.root) == corpus


def test_image_sets_are_disjoint(corpus):
    ids = [r["image_id"] for name in corpus.image_sets for r in manifest(corpus, name)]
    paths = [r["path"] for name in corpus.image_sets for r in manifest(corpus, name)]
    assert len(set(ids)) == len(ids) == sum(corpus.image_sets.values())
    assert len(set(paths)) == len(paths)
    karpathy = json.loads(corpus.files["coco_karpathy"].read_text())["images"]
    by_split = {s: {im["cocoid"] for im in karpathy if im["split"] == s} for s in ("train", "val", "test")}
    for split, members in by_split.items():
        captions = json.loads(corpus.files[f"coco_captions_{split}"].read_text())
        assert {im["id"] for im in captions["images"]} == members
    assert not (by_split["train"] & by_split["test"]) and not (by_split["val"] & by_split["test"])


def test_web_caption_kinds_follow_the_configured_shares(corpus):
    rows = manifest(corpus, "pretrain")
    kinds = Counter(r["web_caption_kind"] for r in rows)
    shares = dict(zip(("correct", "partly_wrong", "unrelated"), SMALL.caption_shares, strict=True))
    assert kinds == {k: round(share * len(rows)) for k, share in shares.items()}
    for r in rows:
        assert (r["wrong_attribute"] is not None) == (r["web_caption_kind"] == "partly_wrong")
        if r["web_caption_kind"] != "correct":
            assert r["caption"] != r["gt_caption"]
    assert len({r["caption"] for r in rows}) > len(rows) // 2  # templates vary


def true_captions(scene) -> set[str]:
    return {describe(groups(scene), scene.background, t, Detail(*flags))
            for t in range(6) for flags in product((True, False), repeat=3)}  # fmt: skip


@pytest.mark.parametrize("attribute", ["colour", "shape", "count", "position"])
def test_a_partly_wrong_caption_is_never_a_true_one(attribute):
    rng = random.Random(attribute)
    checked = 0
    for _ in range(200):
        scene = sample_scene(rng)
        if attribute == "position" and all(g.position is None for g in groups(scene)):
            continue
        caption = wrong_caption(scene, attribute, rng)
        assert caption not in true_captions(scene)
        if attribute == "colour":
            named = {c for c in COLOURS if re.search(rf"\b{c}\b", caption)} - {scene.background}
            assert named - {s.colour for s in scene.shapes}
        if attribute == "position":
            named = {p for p in POSITIONS if WHERE[p] in caption}
            assert named - {s.position for s in scene.shapes}
        checked += 1
    assert checked > 100


def test_coco_files_have_five_references_per_image(corpus):
    for key in ("coco_captions_train", "retrieval_test", "teacher_captions"):
        data = json.loads(corpus.files[key].read_text())
        per_image = Counter(a["image_id"] for a in data["annotations"])
        assert set(per_image) == {im["id"] for im in data["images"]}
        assert set(per_image.values()) == {5}
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    karpathy = json.loads(corpus.files["coco_karpathy"].read_text())["images"]
    assert all(len(im["sentences"]) == 5 and (corpus.root / im["filepath"] / im["filename"]).is_file()
               for im in karpathy)  # fmt: skip


def test_vqa_files_follow_vqav2_and_agree_with_the_scene(corpus):
    questions = json.loads(corpus.files["vqa_questions_train"].read_text())["questions"]
    annotations = json.loads(corpus.files["vqa_annotations_train"].read_text())["annotations"]
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in annotations]
    gt = {r["image_id"]: r["gt_caption"] for r in manifest(corpus, "vqa_train")}
    for q, a in zip(questions, annotations, strict=True):
        assert set(a) == {"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
                          "answers"}  # fmt: skip
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert Counter(x["answer"] for x in a["answers"])[a["multiple_choice_answer"]] >= 5
        if q["question"] == "what color is the background?":
            assert gt[q["image_id"]].endswith(f"on a {a['multiple_choice_answer']} background")
        if q["question"] == "how many shapes are there?":
            assert a["answer_type"] == "number" and a["multiple_choice_answer"] in "123"
    assert {a["answer_type"] for a in annotations} == {"yes/no", "number", "other"}
    assert {a["question_type"] for a in annotations} >= {"what color is the", "how many", "is there a"}
    assert {a["multiple_choice_answer"] for a in annotations if a["answer_type"] == "yes/no"} == {"yes", "no"}


def test_answer_noise_is_a_little_human_disagreement(tmp_path):
    cfg = SynthConfig(seed=1, n_pretrain=2, n_coco=0, n_vqa_images=60, n_retrieval=0, image_size=32)
    info = synthesize(tmp_path / "c", cfg)
    annotations = json.loads(info.files["vqa_annotations_train"].read_text())["annotations"]
    answers = [(x["answer"], a["multiple_choice_answer"]) for a in annotations for x in a["answers"]]
    disagree = sum(x != m for x, m in answers) / len(answers)
    assert 0.03 < disagree < 0.2  # configured 0.1
    quiet = synthesize(tmp_path / "q", SynthConfig(**{**cfg.__dict__, "answer_noise": 0.0}))
    annotations = json.loads(quiet.files["vqa_annotations_train"].read_text())["annotations"]
    assert all(len({x["answer"] for x in a["answers"]}) == 1 for a in annotations)


def test_url_manifest_with_faults_reads_as_a_parquet_source(corpus, tmp_path):
    spec = FaultSpec(http_404=2, http_500=1, timeout=1, connection_refused=1, not_an_image=1,
                     truncated_image=1, image_too_large=1, duplicate_url=3, slow_seconds=5)  # fmt: skip
    urls = url_manifest(corpus.root, "http://127.0.0.1:8123", out=tmp_path / "urls.parquet", faults=spec)
    rows = pq.read_table(urls.path).to_pylist()
    assert urls.n_rows == len(rows) == 40 + sum(spec.counts().values())
    normal = [r for r in rows if r["fault"] is None]
    assert all(r["url"] == "http://127.0.0.1:8123/" + r["path"] for r in normal)
    listed = json.loads(urls.faults_path.read_text())["faults"]
    assert Counter(f["fault"] for f in listed) == {k: n for k, n in spec.counts().items() if n}
    slow = next(f["url"] for f in listed if f["fault"] == "timeout")
    assert slow.startswith("http://127.0.0.1:8123/fault/slow/5/images/pretrain/")
    order = [r["url"] for r in rows]
    for r in (r for r in rows if r["fault"] == "duplicate_url"):
        assert order.index(r["url"]) < len(order) - 1 - order[::-1].index(r["url"])  # original comes first
    report = build_manifest(
        "parquet", [urls.path], tmp_path / "m", options=ManifestOptions(allow_loopback=True)
    )
    assert report.dropped == {"duplicate_url": 3}
    assert set(pq.read_schema(report.parts[0]).names) >= {"url", "caption", "gt_caption", "web_caption_kind"}


def test_bad_configs_are_refused_by_field():
    with pytest.raises(ValueError, match="caption_shares"):
        SynthConfig(caption_shares=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="image_size"):
        SynthConfig(image_size=4)
    with pytest.raises(ValueError, match="wrong_attributes"):
        SynthConfig(wrong_attributes=("size",))
