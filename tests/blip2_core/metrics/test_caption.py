"""Caption metrics: hand-computed BLEU/ROUGE-L/CIDEr-D, METEOR iff Java, SPICE unavailable, NoCaps, readers.

Each Java launch costs about a second (METEOR about 20 s on a loaded 2-core box), so the full pipeline
runs once per module; the hand-computed checks call `score_tokenized` on already tokenised text.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from blip2_core.metrics import caption
from blip2_core.metrics.caption import (
    caption_scores,
    evaluate_caption_files,
    evaluate_nocaps_files,
    load_coco_captions,
    load_coco_results,
    load_nocaps,
    score_tokenized,
    simple_ptb_tokenize,
    spice_unavailable_reason,
    tokenize,
)

HAVE_JAVA = shutil.which("java") is not None
BETA2 = 1.2**2  # pycocoevalcap's ROUGE-L beta

# "red car" against "red car parked outside", all n-grams with the same IDF weight w (vocabularies of
# the images are disjoint, so every reference n-gram has document frequency 1):
#   unigrams: hyp {red, car}, ref 4 unigrams: cos = 2w^2 / (sqrt(2) w * 2 w) = 1/sqrt(2)
#   bigrams:  hyp {red car},  ref 3 bigrams:  cos = w^2 / (w * sqrt(3) w)   = 1/sqrt(3)
#   3-, 4-grams: the hypothesis has none: 0
#   length penalty: exp(-(1 - 3)^2 / (2 * 6^2)) (pycocoevalcap's "length" counts bigrams)
#   CIDEr-D = 10 * mean of the four n-gram scores * penalty
CIDER_RED_CAR = 10 * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4 * math.exp(-4 / 72)
# An exact copy of a reference whose n-grams no other image shares: every cosine is 1 -> 10.
CIDER_EXACT = 10.0


# ---------------------------------------------------------------------------------------------------
# Scores on tokenised text, checked against hand computation.
# ---------------------------------------------------------------------------------------------------


def test_bleu_modified_precisions_and_brevity_penalty():
    # cand "a cat on the mat" (5 tokens) vs ref "the cat sat on the mat" (6 tokens):
    #   p1 = |cat on the mat| / 5 = 4/5; p2 = |on the, the mat| / 4 = 2/4; p3 = |on the mat| / 3 = 1/3;
    #   p4 = 0/2; BP = exp(1 - 6/5).
    scores = score_tokenized({1: ["the cat sat on the mat"]}, {1: ["a cat on the mat"]}, ("bleu",))
    bp = math.exp(1 - 6 / 5)
    assert scores.values["bleu_1"] == pytest.approx(0.8 * bp)
    assert scores.values["bleu_2"] == pytest.approx((0.8 * 0.5) ** (1 / 2) * bp)
    assert scores.values["bleu_3"] == pytest.approx((0.8 * 0.5 / 3) ** (1 / 3) * bp)
    # No matching 4-gram: only pycocoevalcap's 1e-15 smoothing keeps it above zero.
    assert 0.0 < scores.values["bleu_4"] < 1e-3


def test_bleu_clips_repeated_words():
    # cand "the the the cat" vs ref "the cat is here": "the" counts once -> p1 = 2/4;
    # bigrams "the the", "the the", "the cat": p2 = 1/3; equal lengths -> no brevity penalty.
    scores = score_tokenized({1: ["the cat is here"]}, {1: ["the the the cat"]}, ("bleu",))
    assert scores.values["bleu_1"] == pytest.approx(0.5)
    assert scores.values["bleu_2"] == pytest.approx((0.5 / 3) ** 0.5)


def test_identical_captions_score_one():
    refs = {1: ["a dog runs on grass"], 2: ["two birds sit in tree"]}
    scores = score_tokenized(refs, {i: list(c) for i, c in refs.items()}, ("bleu", "rouge"))
    assert scores.values["bleu_4"] == pytest.approx(1.0)
    assert scores.values["rouge_l"] == pytest.approx(1.0)


def test_cider_d_and_rouge_l_by_hand():
    gts = {1: ["blue boat on lake"], 2: ["red car parked outside"]}
    res = {1: ["blue boat on lake"], 2: ["red car"]}
    scores = score_tokenized(gts, res, ("cider", "rouge"))
    assert scores.values["cider"] == pytest.approx((CIDER_EXACT + CIDER_RED_CAR) / 2)
    # ROUGE-L of "red car": LCS 2, P = 2/2, R = 2/4 -> (1 + b^2) P R / (R + b^2 P).
    rouge_red_car = (1 + BETA2) * 1.0 * 0.5 / (0.5 + BETA2 * 1.0)
    assert scores.values["rouge_l"] == pytest.approx((1.0 + rouge_red_car) / 2)


def test_cider_is_zero_for_a_single_image():
    # IDF is log(#images / df) = log(1 / 1) = 0 for every n-gram: documented, not a bug of ours.
    scores = score_tokenized({1: ["a cat"]}, {1: ["a cat"]}, ("cider",))
    assert scores.values["cider"] == 0.0


def test_spice_is_unavailable_and_never_downloads(monkeypatch):
    if spice_unavailable_reason() is None:
        pytest.skip("the Stanford CoreNLP jars are installed here: SPICE can run")
    import pycocoevalcap.spice.get_stanford_models as getter
    import pycocoevalcap.spice.spice as spice_module

    def refuse(*_args, **_kwargs):
        raise AssertionError("SPICE must not be started (it would download CoreNLP)")

    monkeypatch.setattr(spice_module.Spice, "__init__", refuse)
    monkeypatch.setattr(getter, "urlretrieve", refuse)
    scores = score_tokenized({1: ["a cat"]}, {1: ["a cat"]}, ("spice", "bleu"))
    assert "spice" not in scores.values
    assert "bleu_1" in scores.values
    assert "stanford-corenlp-3.6.0" in scores.unavailable["spice"]


def test_unknown_metric_is_rejected():
    with pytest.raises(ValueError, match="unknown caption metric 'bleurt'"):
        score_tokenized({1: ["a"]}, {1: ["a"]}, ("bleurt",))


# ---------------------------------------------------------------------------------------------------
# The full pipeline: tokenisation, then every metric (one PTB launch, one METEOR launch).
# ---------------------------------------------------------------------------------------------------

PREDICTIONS = {1: "Blue boat on lake.", 2: "Red car!"}
REFERENCES = {1: ["A blue boat on the lake.", "blue boat on lake"], 2: ["Red car, parked outside."]}


@pytest.fixture(scope="module")
def full_scores():
    return caption_scores(PREDICTIONS, REFERENCES)


def test_full_pipeline_values(full_scores):
    assert full_scores.n == 2
    assert full_scores.tokenizer == ("ptb" if HAVE_JAVA else "python-fallback")
    # Image 2 tokenises to "red car" vs "red car parked outside"; image 1 copies its second reference.
    # BLEU, corpus level: every hypothesis n-gram matches (p_n = 1); hypothesis length 4 + 2 = 6, closest
    # reference lengths 4 + 4 = 8 -> BLEU-n = exp(1 - 8/6) for every n.
    for n in (1, 2, 3, 4):
        assert full_scores.values[f"bleu_{n}"] == pytest.approx(math.exp(1 - 8 / 6))
    # CIDEr-D, image 1: "blue boat on lake" shares all n-grams with "a blue boat on the lake" too, and
    # those are the only references holding them, so both references have df-1 weights w = log 2:
    #   vs ref "blue boat on lake": cos 1 at every n -> 1 per n-gram order.
    #   vs ref "a blue boat on the lake" (6 unigrams, 5 bigrams, 4 trigrams, 3 4-grams):
    #     1-grams: 4 shared of 6 -> 4 / (2 * sqrt(6));
    #     2-grams: "blue boat", "boat on" of 5 -> 2 / (sqrt(3) * sqrt(5));
    #     3-grams: "blue boat on" of 4 -> 1 / (sqrt(2) * 2); 4-grams: none shared -> 0;
    #     length penalty exp(-(3 - 5)^2 / 72).
    other = (4 / (2 * math.sqrt(6)) + 2 / math.sqrt(15) + 1 / (2 * math.sqrt(2)) + 0) / 4 * math.exp(-4 / 72)
    cider_1 = 10 * (1.0 + other) / 2
    assert full_scores.values["cider"] == pytest.approx((cider_1 + CIDER_RED_CAR) / 2)


def test_meteor_present_iff_java(full_scores):
    if HAVE_JAVA:
        assert 0.0 < full_scores.values["meteor"] <= 1.0
        assert "meteor" not in full_scores.unavailable
    else:
        assert "meteor" not in full_scores.values
        assert "java" in full_scores.unavailable["meteor"]


def test_spice_reported_unavailable_not_zero(full_scores):
    if spice_unavailable_reason() is None:
        pytest.skip("the Stanford CoreNLP jars are installed here: SPICE can run")
    assert "spice" not in full_scores.values
    assert full_scores.unavailable["spice"] == spice_unavailable_reason()


def test_without_java_the_python_tokenizer_runs_and_java_metrics_are_unavailable(monkeypatch):
    monkeypatch.setattr(caption, "find_java", lambda: None)
    scores = caption_scores(PREDICTIONS, REFERENCES)
    assert scores.tokenizer == "python-fallback"
    assert set(scores.unavailable) == {"meteor", "spice"}
    assert "not on PATH" in scores.unavailable["meteor"]
    assert scores.values["bleu_4"] == pytest.approx(math.exp(1 - 8 / 6))


FALLBACK_CASES = {
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "Two dogs' toys, isn't it?": "two dogs toys is n't it",
    "A black-and-white photo of 3.5 cats (really)!": "a black-and-white photo of 3.5 cats -lrb- really -rrb-",
    "The dog's bowl; can't reach \"it\"...": "the dog 's bowl ca n't reach it",
    "A 1,000-piece puzzle -- on a table: done.": "a 1,000-piece puzzle on a table done",
    "There's a cat & a dog at 5 o'clock": "there 's a cat & a dog at 5 o'clock",
    "I'm sure they've left": "i 'm sure they 've left",
}


@pytest.mark.parametrize(("raw", "expected"), list(FALLBACK_CASES.items()))
def test_python_tokenizer_by_hand(raw, expected):
    assert simple_ptb_tokenize(raw) == expected


@pytest.mark.skipif(not HAVE_JAVA, reason="needs java for the Stanford PTB tokenizer")
def test_python_tokenizer_agrees_with_stanford_ptb():
    captions = {i: [raw] for i, raw in enumerate(FALLBACK_CASES)}
    tokens, name = tokenize(captions)
    assert name == "ptb"
    assert [tokens[i][0] for i in captions] == list(FALLBACK_CASES.values())


# ---------------------------------------------------------------------------------------------------
# NoCaps: per-domain scores with per-domain IDF.
# ---------------------------------------------------------------------------------------------------

NOCAPS = [  # (id, domain, reference, prediction); no two references share a word
    (1, "in-domain", "blue boat on lake", "blue boat on lake"),
    (2, "in-domain", "old man reading newspaper", "old man reading newspaper"),
    (3, "near-domain", "green tree in park", "green tree in park"),
    (4, "near-domain", "red car parked outside", "red car"),
    (5, "out-domain", "white horse running fast", "yellow bus"),
    (6, "out-domain", "small bird atop branch", "small bird atop branch"),
]


def _write_nocaps(tmp_path):
    annotations = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "domain": d} for i, d, _, _ in NOCAPS],
        "annotations": [{"id": 100 + i, "image_id": i, "caption": ref} for i, _, ref, _ in NOCAPS],
    }
    ann_path, res_path = tmp_path / "nocaps_val.json", tmp_path / "nocaps_results.json"
    ann_path.write_text(json.dumps(annotations))
    res_path.write_text(json.dumps([{"image_id": i, "caption": pred} for i, _, _, pred in NOCAPS]))
    return res_path, ann_path


def test_nocaps_per_domain_and_overall(tmp_path):
    res_path, ann_path = _write_nocaps(tmp_path)
    scores = evaluate_nocaps_files(res_path, ann_path)
    cider = {d: s.values["cider"] for d, s in scores.per_domain.items()}
    # "yellow bus" shares nothing with its reference: 0. The others as in the hand computation above
    # (disjoint vocabularies make every IDF weight equal, so the cosines do not depend on it).
    assert cider == pytest.approx(
        {
            "in-domain": CIDER_EXACT,
            "near-domain": (CIDER_EXACT + CIDER_RED_CAR) / 2,
            "out-domain": CIDER_EXACT / 2,
        }
    )
    assert scores.overall.values["cider"] == pytest.approx((4 * CIDER_EXACT + CIDER_RED_CAR + 0.0) / 6)
    assert [s.n for s in scores.per_domain.values()] == [2, 2, 2]
    if spice_unavailable_reason() is not None:
        assert all("spice" in s.unavailable for s in [*scores.per_domain.values(), scores.overall])


def test_nocaps_reader_checks_domains(tmp_path):
    _, ann_path = _write_nocaps(tmp_path)
    refs, domains = load_nocaps(ann_path)
    assert refs[4] == ["red car parked outside"]
    assert domains[5] == "out-domain"
    data = json.loads(ann_path.read_text())
    data["images"][0]["domain"] = "in domain"
    ann_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"nocaps_val\.json: image_id 1 has domain 'in domain'"):
        load_nocaps(ann_path)


# ---------------------------------------------------------------------------------------------------
# COCO readers and their errors.
# ---------------------------------------------------------------------------------------------------


def _write_coco(
    tmp_path, images=(1, 2), captions=((1, "blue boat on lake"), (2, "old man reading newspaper"))
):
    data = {
        "images": [{"id": i} for i in images],
        "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(captions)],
    }
    path = tmp_path / "coco_karpathy_test_gt.json"
    path.write_text(json.dumps(data))
    return path


def _write_results(tmp_path, records):
    path = tmp_path / "captions_results.json"
    path.write_text(json.dumps(records))
    return path


def test_evaluate_caption_files(tmp_path):
    ann_path = _write_coco(tmp_path)
    res_path = _write_results(
        tmp_path,
        [{"image_id": 1, "caption": "Blue boat on lake."}, {"image_id": 2, "caption": "old man reading"}],
    )
    assert load_coco_captions(ann_path) == {1: ["blue boat on lake"], 2: ["old man reading newspaper"]}
    scores = evaluate_caption_files(res_path, ann_path, metrics=("bleu",))
    # p_n = 1 for every n (all n-grams match); lengths 4 + 3 vs 4 + 4 -> BLEU-n = exp(1 - 8/7).
    assert scores.values["bleu_1"] == pytest.approx(math.exp(1 - 8 / 7))


def test_caption_file_errors_name_file_and_id(tmp_path):
    ann_path = _write_coco(tmp_path)
    res_path = _write_results(tmp_path, [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}])
    with pytest.raises(ValueError, match=r"captions_results\.json: duplicate image_id 1"):
        load_coco_results(res_path)

    res_path = _write_results(tmp_path, [{"image_id": 1, "caption": "a"}])
    with pytest.raises(ValueError, match=r"captions_results\.json.*no caption for image_id 2"):
        evaluate_caption_files(res_path, ann_path)

    res_path = _write_results(tmp_path, [{"image_id": i, "caption": "a"} for i in (1, 2, 3)])
    with pytest.raises(ValueError, match=r"captions_results\.json.*unknown image_id 3"):
        evaluate_caption_files(res_path, ann_path)

    res_path = _write_results(tmp_path, [{"image_id": 1, "text": "a"}])
    with pytest.raises(
        ValueError, match=r"captions_results\.json: result for image_id 1 has no field 'caption'"
    ):
        load_coco_results(res_path)

    no_caption = _write_coco(tmp_path, images=(1, 2), captions=((1, "a boat"),))
    with pytest.raises(ValueError, match=r"coco_karpathy_test_gt\.json: image_id 2 has no captions"):
        load_coco_captions(no_caption)

    stray = _write_coco(tmp_path, images=(1,), captions=((1, "a boat"), (5, "a car")))
    with pytest.raises(ValueError, match=r"coco_karpathy_test_gt\.json: annotation #1 refers to image_id 5"):
        load_coco_captions(stray)
