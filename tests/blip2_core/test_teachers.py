"""Teachers of the miniature replication: each trains with a falling loss on a ~40-image corpus, saves in
the format its real loader reads, and is deterministic under a seed; plus the CapFilt-quality judge."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip2_core import teachers as T
from blip2_core.capfilt import CapFiltConfig, RankerConfig, load_capfilt_models, run_capfilt
from blip2_core.config import load_preset
from blip2_core.fileio import UnsafeKeyError
from blip2_core.llm_bridge import LLMBridge, load_llm
from data_catalog.synth import SynthConfig, synthesize

ROOT = Path(__file__).resolve().parents[2]

TINY = T.TeacherConfig(
    seed=0,
    log_every=5,
    clip=T.ClipTeacherConfig(steps=30, batch_size=16, lr=2e-3, warmup_steps=5),
    captioner=T.CaptionerTeacherConfig(
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        text_width=32,
        text_layers=1,
        text_heads=2,
        steps=30,
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
    ),  # fmt: skip
    opt=T.LMTeacherConfig(hidden_size=32, ffn_dim=64, d_kv=8, steps=30, batch_size=16, warmup_steps=5),
    t5=T.LMTeacherConfig(hidden_size=32, ffn_dim=64, d_kv=8, steps=30, batch_size=16, warmup_steps=5),
)


@functools.cache
def _load_benchmark():
    """benchmarks/capfilt_quality.py, which holds the judge (it reads data_catalog's word lists)."""
    path = ROOT / "benchmarks" / "capfilt_quality.py"
    spec = importlib.util.spec_from_file_location("capfilt_quality", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    cfg = SynthConfig(
        seed=3, n_pretrain=4, n_coco=50, n_vqa_images=10, n_retrieval=2, n_teacher=8, image_size=64
    )
    return synthesize(tmp_path_factory.mktemp("corpus") / "corpus", cfg).root


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[T.TeacherPaths, list[tuple[str, int, float]]]:
    logged: list[tuple[str, int, float]] = []
    out = tmp_path_factory.mktemp("teachers")
    paths = T.train_teachers(corpus, out, TINY, progress=lambda *entry: logged.append(entry))
    return paths, logged


def test_teacher_data_reads_only_clean_splits(corpus):
    data = T.load_teacher_data(corpus)
    coco = json.loads((corpus / "coco" / "annotations" / "captions_train.json").read_text())
    own = json.loads((corpus / "teacher" / "captions_train.json").read_text())
    assert len(data.images) == len(coco["images"]) + len(own["images"]) == 40 + 8
    assert sorted(data.captions) == sorted(a["caption"] for a in coco["annotations"] + own["annotations"])
    assert all(len(refs) == 5 for refs in data.references)
    vqa = json.loads((corpus / "vqa" / "v2_OpenEnded_synth_train_questions.json").read_text())["questions"]
    assert len(data.qa) == len(vqa) and all(" Answer: " in t for t in data.qa_texts)
    assert data.qa_texts[0] == f"Question: {data.qa[0][0]} Answer: {data.qa[0][1]}"


def test_teacher_data_reads_a_corpus_made_before_the_teacher_set(corpus, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(corpus, old)
    meta = json.loads((old / "corpus.json").read_text())
    del meta["files"]["teacher_captions"]
    (old / "corpus.json").write_text(json.dumps(meta))
    assert len(T.load_teacher_data(old).images) == 40


def test_teacher_data_refuses_an_image_path_outside_the_corpus(corpus, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    own = json.loads((bad / "teacher" / "captions_train.json").read_text())
    own["images"][2]["file_name"] = "../../etc/passwd"
    (bad / "teacher" / "captions_train.json").write_text(json.dumps(own))
    where = r"teacher/captions_train.json: image \d+.*outside the image folder"
    with pytest.raises(UnsafeKeyError, match=where):
        T.load_teacher_data(bad)


@pytest.mark.parametrize("name", ["clip", "captioner", "opt", "t5"])
def test_each_teacher_loss_falls(trained, name):
    paths, logged = trained
    losses = [loss for teacher, _, loss in logged if teacher == name]
    assert len(losses) == 6  # 30 steps, logged every 5
    print(name, [round(x, 3) for x in losses])
    assert losses[-1] < 0.8 * losses[0]
    folder = {
        "clip": paths.clip_config.parent,
        "captioner": paths.captioner,
        "opt": paths.opt,
        "t5": paths.t5,
    }
    assert json.loads((folder[name] / "teacher.json").read_text())["losses"] == losses


def test_tokenizers_have_the_model_layouts(trained):
    from transformers import AutoTokenizer

    paths, _ = trained
    wordpiece = AutoTokenizer.from_pretrained(paths.tokenizers / "wordpiece")
    assert wordpiece.tokenize("a picture of two large circles") == [
        "a", "picture", "of", "two", "large", "circle", "##s",
    ] or "circles" in wordpiece.get_vocab()  # fmt: skip
    assert wordpiece.bos_token == "[DEC]" and wordpiece.pad_token_id == 0
    opt = AutoTokenizer.from_pretrained(paths.tokenizers / "opt")
    assert (opt.pad_token_id, opt.bos_token_id, opt.eos_token_id) == (1, 2, 2)
    assert opt("red").input_ids[0] == 2 and len(opt("\n", add_special_tokens=False).input_ids) == 1
    t5 = AutoTokenizer.from_pretrained(paths.tokenizers / "t5")
    assert (t5.pad_token_id, t5.eos_token_id) == (0, 1) and t5("red").input_ids[-1] == 1
    assert len(opt) <= TINY.bpe_vocab_size and len(wordpiece) <= TINY.wordpiece_vocab_size


def test_wordpiece_vocab_merges_the_most_frequent_pair_and_breaks_ties_by_text():
    from collections import Counter

    vocab = T.wordpiece_vocab(Counter({"abab": 3, "ba": 1, "cd": 1}), 12, ("[PAD]", "[UNK]"))
    tokens = sorted(vocab, key=vocab.get)
    # specials, the alphabet ("x" first in a word, "##x" after), then the merges. "abab" = a ##b ##a ##b:
    # three pairs count 3 each, and the text decides ("##a" "##b" first); then "##b" "##ab" before "a" "##b";
    # then "a" "##bab"; of the pairs that count 1, "b" "##a" before "c" "##d" (the vocabulary is full).
    assert tokens == [
        "[PAD]", "[UNK]", "##a", "##b", "##d", "a", "b", "c", "##ab", "##bab", "abab", "ba",
    ]  # fmt: skip
    assert list(vocab.values()) == list(range(len(vocab)))
    assert len(T.wordpiece_vocab(Counter({"abab": 3}), 100, ())) == 6  # stops when every word is one piece


def test_wordpiece_tokenizer_is_the_same_in_every_process(corpus, tmp_path):
    """The `tokenizers` trainer broke ties in per-process hash order: fresh homes got other vocabularies."""
    import subprocess

    texts = T.load_teacher_data(corpus).texts
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    script = (
        "import json, sys; from blip2_core.teachers import train_wordpiece; "
        "texts = json.load(open(sys.argv[1])); train_wordpiece(texts, 300).save_pretrained(sys.argv[2])"
    )
    for i in range(2):
        command = [sys.executable, "-c", script, tmp_path / "texts.json", tmp_path / str(i)]
        subprocess.run(command, check=True, cwd=ROOT)
    saved = [(tmp_path / str(i) / "tokenizer.json").read_bytes() for i in range(2)]
    assert saved[0] == saved[1]
    tokenizer = T.train_wordpiece(texts, 300)
    assert json.loads(saved[0])["model"]["vocab"] == tokenizer.get_vocab()
    ids = tokenizer(texts[0]).input_ids
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == texts[0].lower()
    assert tokenizer.unk_token_id not in ids


def test_clip_loads_as_ranker_and_as_tiny_image_encoder(trained):
    from blip2_core.vision import VisionEncoder

    paths, _ = trained
    assert paths.clip_model_name == "blip2-tiny-clip"
    saved = load_file(str(paths.clip_weights))
    vision_cfg = dataclasses.replace(load_preset("tiny").vision, pretrained=str(paths.clip_weights))
    encoder = VisionEncoder(vision_cfg)  # strict load of the `visual.` part, then cut before the last block
    for name, value in encoder.visual.state_dict().items():
        assert torch.equal(value, saved[f"visual.{name}"]), name
    assert encoder(torch.zeros(2, 3, 64, 64)).shape == (2, 65, 64)


def test_captioner_and_ranker_run_in_capfilt(trained, corpus):
    paths, _ = trained
    cfg = CapFiltConfig(
        captioner=str(paths.captioner),
        ranker=RankerConfig(paths.clip_model_name, str(paths.clip_weights), str(paths.clip_config)),
        num_captions=3,
        batch_size=2,
    )
    models = load_capfilt_models(cfg)
    # The ranker is the trained CLIP, not a fresh one: its logit scale moved off log(1 / 0.07).
    saved_scale = load_file(str(paths.clip_weights))["logit_scale"]
    assert torch.equal(models.ranker.model.logit_scale, saved_scale)
    assert not torch.isclose(saved_scale, torch.tensor(1 / 0.07).log())
    images = sorted((corpus / "images" / "pretrain").glob("*.jpg"))[:2]
    records = list(run_capfilt([(p.stem, p.read_bytes(), "a red circle") for p in images], cfg, models))
    assert [r.error for r in records] == [None, None]
    assert all(len(r.candidates) == 3 and len(r.scores) == 4 and r.top for r in records)


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_language_models_load_through_load_llm(trained, name):
    paths, _ = trained
    llm, tokenizer = load_llm(getattr(paths, name))
    assert llm.config.model_type == name and llm.config.vocab_size == len(tokenizer)
    assert not any(p.requires_grad for p in llm.parameters())
    bridge = LLMBridge(llm, tokenizer, qformer_hidden=16)  # OPT: "\n" must be one token
    out = bridge(torch.zeros(2, 4, 16), ["a red circle on a blue background", "two small stars"])
    assert torch.isfinite(out.loss)


def test_training_is_deterministic_under_a_seed(corpus, tmp_path):
    data = T.load_teacher_data(corpus)
    cfg = dataclasses.replace(TINY, opt=dataclasses.replace(TINY.opt, steps=6))
    runs = [T.train_opt(data, tmp_path / str(i), cfg) for i in range(2)]
    other = T.train_opt(data, tmp_path / "other", dataclasses.replace(cfg, seed=1))
    weights = [load_file(str(r.path / "model.safetensors")) for r in (*runs, other)]
    assert runs[0].losses == runs[1].losses
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_atomic_dir_leaves_nothing_when_training_fails(tmp_path):
    with pytest.raises(RuntimeError), T.atomic_dir(tmp_path / "clip") as tmp:
        (tmp / "half.safetensors").write_bytes(b"x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "old").write_text("old")
    with T.atomic_dir(tmp_path / "clip") as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["clip"]
    assert [p.name for p in (tmp_path / "clip").iterdir()] == ["new"]


# ----------------------------------------------------------------------------------------------- judge

GT = (
    "a small red star on the left, two large blue circles and a small green square at the top"
    " on a white background"
)


@pytest.mark.parametrize(
    ("caption", "correct"),
    [
        (GT, True),
        ("a picture of a red star, two blue circles and a green square", True),  # less detail, still true
        ("a white background with two large blue circles, a green square and a small red star", True),
        ("a red star, two blue circles and a small green square at the top", True),  # bare objects (CapFilt)
        ("a small red star on the left, two large blue circles and a green square", True),
        (
            "a small red star on the left, two large blue circles and a purple square at the top",
            False,
        ),  # colour
        (
            "a small red star on the left, two large blue circles and a green triangle at the top",
            False,
        ),  # shape
        ("a small red star on the left, three large blue circles and a green square", False),  # count
        ("a small red star on the right, two large blue circles and a green square", False),  # position
        ("a large red star, two large blue circles and a green square", False),  # size
        ("two large blue circles on the left, a red star and a green square", False),  # a group has no place
        ("a red star, two blue circles and a green square on a black background", False),  # background
        (
            "a small red star on the left and two large blue circles on a white background",
            False,
        ),  # missing group
        ("a red star, a red star, two blue circles and a green square", False),  # a group twice
        ("a red star two blue circles and", False),  # not a caption of the grammar
        ("", False),
    ],
)
def test_judge_on_hand_written_captions(caption, correct):
    judge = _load_benchmark()
    assert judge.is_correct(caption, GT) is correct


def test_judge_agrees_with_the_corpus_caption_kinds(corpus):
    import pyarrow.parquet as pq

    judge = _load_benchmark()
    rows = pq.read_table(corpus / "manifests" / "coco_train.parquet").to_pylist()
    assert all(judge.parse_caption(r["gt_caption"]) is not None for r in rows)
    data = T.load_teacher_data(corpus)  # the COCO train split, then the teacher set
    truths = [
        truth
        for name in ("coco_train", "teacher_train")
        for truth in pq.read_table(corpus / "manifests" / f"{name}.parquet").column("gt_caption").to_pylist()
    ]
    # Every reference caption (any template, any level of detail) is judged correct for its own image ...
    assert all(
        judge.is_correct(c, gt) for refs, gt in zip(data.references, truths, strict=True) for c in refs
    )
    # ... and the reference of a different scene is not.
    assert not judge.is_correct(data.references[1][0], truths[0]) or truths[0] == truths[1]


@pytest.mark.parametrize(
    ("caption", "errors"),
    [
        (GT, "ok"),
        ("a small red star on the left, two large blue circles and a purple square at the top", "colour"),
        ("a small red star on the right, two large blue circles and a green triangle", "position+shape"),
        ("a small red star on the left, three large blue circles and a green square", "count"),
        ("a red star and two blue circles on a white background", "groups"),
        ("a red star, two blue circles and a green square on a black background", "background"),
        ("a red star two blue circles and", "unparsed"),
    ],
)
def test_judge_names_what_a_caption_gets_wrong(caption, errors):
    judge = _load_benchmark()
    assert judge.caption_errors(caption, GT) == errors
    assert (errors == "ok") is judge.is_correct(caption, GT)


def test_clip_starts_from_the_position_init_std(corpus, tmp_path):
    data = T.load_teacher_data(corpus)
    for std, low, high in ((None, 0.08, 0.2), (2.0, 1.7, 2.3)):  # open_clip's own: width ** -0.5 = 0.125
        cfg = dataclasses.replace(TINY, clip=dataclasses.replace(TINY.clip, steps=1, position_init_std=std))
        run = T.train_clip(data, tmp_path / str(std), cfg)
        weights = load_file(str(run.path / f"{T.CLIP_MODEL_NAME}.safetensors"))
        assert low < weights["visual.positional_embedding"].std().item() < high
    bad = dataclasses.replace(TINY, clip=dataclasses.replace(TINY.clip, steps=1, position_init_std=-1.0))
    with pytest.raises(ValueError, match=r"ClipTeacherConfig.position_init_std must be > 0, got -1.0"):
        T.train_clip(data, tmp_path / "bad", bad)


# ------------------------------------------------------------------------------------------ hard negatives


def test_attribute_words_are_the_corpus_vocabulary():
    from data_catalog.synth.scenes import COLOURS, POSITIONS, SHAPES, SIZES

    colours, shapes, sizes, positions, counts = T.ATTRIBUTE_WORDS
    assert (set(colours), shapes, sizes, positions) == (set(COLOURS), SHAPES, SIZES, POSITIONS)
    assert counts == ("two", "three", "four")


@pytest.mark.parametrize(
    ("caption", "changed_kind"),
    [
        ("two large blue circles on a white background", None),  # any one of five words
        ("a picture of stars", "shape"),
        ("an image showing three things", "count"),
    ],
)
def test_hard_negative_swaps_one_attribute_word_for_another_of_its_kind(caption, changed_kind):
    import random

    kinds = dict(zip(("colour", "shape", "size", "position", "count"), T.ATTRIBUTE_WORDS, strict=True))
    seen = set()
    for seed in range(40):
        negative = T.hard_negative(caption, random.Random(seed))
        diff = [(a, b) for a, b in zip(caption.split(), negative.split(), strict=True) if a != b]
        assert len(diff) == 1, (caption, negative)
        old, new = diff[0]
        assert old.endswith("s") == new.endswith("s")  # a plural stays plural
        kind = next(k for k, words in kinds.items() if old.removesuffix("s") in words or old in words)
        assert new.removesuffix("s") in kinds[kind] or new in kinds[kind]
        assert changed_kind in (None, kind)
        seen.add(old)
    if changed_kind is None:
        assert seen == {"two", "large", "blue", "circles", "white"}
    assert T.hard_negative("a picture of things", random.Random(0)) is None
    assert T.hard_negative(caption, random.Random(3)) == T.hard_negative(caption, random.Random(3))


def test_every_hard_negative_of_a_reference_is_a_wrong_caption(corpus):
    import random

    import pyarrow.parquet as pq

    judge = _load_benchmark()
    data = T.load_teacher_data(corpus)
    truths = [
        truth
        for name in ("coco_train", "teacher_train")
        for truth in pq.read_table(corpus / "manifests" / f"{name}.parquet").column("gt_caption").to_pylist()
    ]
    rng = random.Random(0)
    pairs = [
        (T.hard_negative(c, rng), gt) for refs, gt in zip(data.references, truths, strict=True) for c in refs
    ]
    assert len(pairs) > 200 and all(negative is not None for negative, _ in pairs)
    assert not any(judge.is_correct(negative, gt) for negative, gt in pairs)


def test_contrastive_loss_is_clip_loss_and_hard_negatives_raise_it():
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    plain = T.contrastive_loss(image, text, scale)
    torch.testing.assert_close(plain, ClipLoss()(image, text, scale))
    # A negative close to image 0 competes with its true text; one far from every image barely counts.
    near, far = image[:1] + 0.01 * torch.randn(1, 8), -image.sum(0, keepdim=True)
    assert T.contrastive_loss(image, text, scale, near) > plain + 0.05
    assert T.contrastive_loss(image, text, scale, far) < plain + 0.01
    assert T.contrastive_loss(image, 3 * text, scale) == pytest.approx(plain.item())  # normalised inside


def test_clip_trains_with_hard_negatives(corpus, tmp_path):
    data = T.load_teacher_data(corpus)
    plain = T.train_clip(data, tmp_path / "plain", TINY)
    hard_cfg = dataclasses.replace(TINY, clip=dataclasses.replace(TINY.clip, hard_negatives=1))
    hard = T.train_clip(data, tmp_path / "hard", hard_cfg)
    # With B more texts to tell apart, the image->text half starts higher; both fall.
    assert hard.losses[0] > plain.losses[0]
    assert hard.losses[-1] < hard.losses[0]
    again = T.train_clip(data, tmp_path / "again", hard_cfg)
    assert again.losses == hard.losses  # the negatives are drawn from the seed
    bad = dataclasses.replace(TINY, clip=dataclasses.replace(TINY.clip, hard_negatives=0))
    with pytest.raises(ValueError, match=r"ClipTeacherConfig.hard_negatives must be >= 1 or None, got 0"):
        T.train_clip(data, tmp_path / "bad", bad)
