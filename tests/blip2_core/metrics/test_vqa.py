"""VQA accuracy: official normalisation, leave-one-out scoring, breakdowns, GQA, file readers."""

from __future__ import annotations

import json

import pytest

from blip2_core.metrics.vqa import (
    VQAAnnotation,
    evaluate_gqa_files,
    evaluate_vqa_files,
    load_gqa,
    load_vqa_annotations,
    load_vqa_results,
    normalize_answer,
    paired_vqa_difference,
    question_accuracy,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("yes.", "yes"),  # sentence period stripped
        ("Yes", "yes"),  # lower-cased
        ("3.5", "3.5"),  # a period before a digit stays
        ("e.g.", "eg"),  # every period not before a digit goes
        ("1,000", "1000"),  # comma between digits: punctuation deleted, not spaced
        ("1,000-2,000", "10002000"),  # ...and in that mode every other mark is deleted too
        ("red,blue", "red blue"),  # a mark inside a word becomes a space
        ("hello, world", "hello world"),  # a mark next to a space is deleted
        ("x-ray!", "x ray"),
        ("Two dogs", "2 dogs"),  # number words zero..ten become digits
        ("ten", "10"),
        ("eleven", "eleven"),  # beyond ten: left alone
        ("none", "0"),  # the official map also sends "none" to "0"
        ("the cat on a mat", "cat on mat"),  # articles removed
        ("An apple", "apple"),
        ("dont know", "don't know"),  # contractions table
        ("whats that", "what's that"),
        ("  yes\n", "yes"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def _answers(matching: str, n_match: int, other: str = "blue") -> tuple[str, ...]:
    return (matching,) * n_match + (other,) * (10 - n_match)


@pytest.mark.parametrize(
    ("n_match", "expected"),
    [
        # Leaving out one of the m matching annotators leaves m-1 matches, else m; acc = min(1, . / 3).
        (0, 0.0),
        (1, 0.3),  # (1 * 0/3 + 9 * 1/3) / 10 = 3/10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10 = 18/30
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10 = 9/10: three matches are NOT full credit
        (4, 1.0),  # (4 * 3/3 + 6 * 1) / 10
        (10, 1.0),
    ],
)
def test_leave_one_out_accuracy(n_match, expected):
    assert question_accuracy("red", _answers("red", n_match)) == pytest.approx(expected)


def test_disagreeing_answers_are_normalised_with_the_prediction():
    # 9 humans said "2", one "3": both sides normalised, "Two." -> "2" matches 9 -> 1.0.
    assert question_accuracy("Two.", ("2",) * 9 + ("3",)) == 1.0
    # Human answers with stray punctuation are normalised too once they disagree.
    assert question_accuracy("dog", ("dog.",) * 2 + ("cat",) * 8) == pytest.approx(0.6)


def test_official_mode_skips_normalisation_when_all_humans_agree():
    # vqaEval.py only normalises when the 10 answers differ: "two" vs ten "2" scores 0 there.
    answers = ("2",) * 10
    assert question_accuracy("two", answers, normalize="official") == 0.0
    assert question_accuracy("two", answers, normalize="always") == 1.0
    # Whitespace is always cleaned.
    assert question_accuracy(" 2\n", answers) == 1.0


def _ann(qid, answers, answer_type, question_type):
    return VQAAnnotation(qid, tuple(answers), answer_type=answer_type, question_type=question_type)


def test_vqa_accuracy_breakdowns():
    annotations = {
        1: _ann(1, ["yes"] * 10, "yes/no", "is the"),
        2: _ann(2, _answers("3", 3, "4"), "number", "how many"),
        3: _ann(3, ["red"] * 10, "other", "what color"),
        4: _ann(4, _answers("2", 1, "5"), "number", "how many"),
    }
    predictions = {1: "yes", 2: "three", 3: "blue", 4: "2"}
    scores = vqa_accuracy(predictions, annotations)
    # Per question: 1.0, 0.9 ("three" -> "3", 3 matches), 0.0, 0.3 (1 match).
    assert scores.n == 4
    assert scores.overall == pytest.approx(100 * (1.0 + 0.9 + 0.0 + 0.3) / 4)
    assert scores.per_answer_type == pytest.approx({"yes/no": 100.0, "number": 60.0, "other": 0.0})
    assert scores.per_question_type == pytest.approx({"is the": 100.0, "how many": 60.0, "what color": 0.0})


def test_vqa_accuracy_requires_exact_coverage():
    annotations = {1: _ann(1, ["yes"] * 10, "yes/no", "is"), 2: _ann(2, ["no"] * 10, "yes/no", "is")}
    with pytest.raises(ValueError, match="no answer for question_id 2"):
        vqa_accuracy({1: "yes"}, annotations)
    with pytest.raises(ValueError, match="unknown question_id 7"):
        vqa_accuracy({1: "yes", 2: "no", 7: "no"}, annotations)


def test_paired_difference_is_the_mean_per_question_difference_with_its_standard_error():
    annotations = {
        1: _ann(1, ["yes"] * 10, "yes/no", "is the"),
        2: _ann(2, _answers("3", 3, "4"), "number", "how many"),
        3: _ann(3, ["red"] * 10, "other", "what color"),
        4: _ann(4, ["blue"] * 10, "other", "what color"),
    }
    a = {1: "yes", 2: "3", 3: "red", 4: "green"}  # per question 1.0, 0.9, 1.0, 0.0
    b = {1: "yes", 2: "4", 3: "blue", 4: "green"}  # per question 1.0, 1.0 ("4": 7 of 10), 0.0, 0.0
    diff = paired_vqa_difference(a, b, annotations)
    per_question = [0.0, -0.1, 1.0, 0.0]
    mean = sum(per_question) / 4
    sd = (sum((d - mean) ** 2 for d in per_question) / 3) ** 0.5
    assert diff.n == 4
    assert diff.difference == pytest.approx(100 * mean)  # = overall(a) - overall(b)
    assert diff.difference == pytest.approx(
        vqa_accuracy(a, annotations).overall - vqa_accuracy(b, annotations).overall
    )
    assert diff.se == pytest.approx(100 * sd / 2)
    assert paired_vqa_difference(b, a, annotations).difference == pytest.approx(-diff.difference)


def test_paired_difference_verdict_needs_the_gap_outside_the_noise():
    annotations = {q: _ann(q, ["yes"] * 10, "yes/no", "is") for q in range(100)}
    same = {q: "yes" if q % 2 else "no" for q in range(100)}
    level = paired_vqa_difference(same, same, annotations)
    assert (level.difference, level.se, level.verdict()) == (0.0, 0.0, "level")
    # a right on 30 more questions than b: far outside two standard errors
    better = {q: "yes" if q < 80 else "no" for q in range(100)}
    worse = {q: "yes" if q < 50 else "no" for q in range(100)}
    assert paired_vqa_difference(better, worse, annotations).verdict() == "a ahead"
    assert paired_vqa_difference(worse, better, annotations).verdict() == "b ahead"
    # one question apart out of 100: within the noise
    one = {q: "yes" if q < 51 else "no" for q in range(100)}
    close = paired_vqa_difference(one, worse, annotations)
    assert close.difference == pytest.approx(1.0)
    assert close.verdict() == "level"


def test_paired_difference_requires_both_to_cover_the_questions():
    annotations = {1: _ann(1, ["yes"] * 10, "yes/no", "is"), 2: _ann(2, ["no"] * 10, "yes/no", "is")}
    with pytest.raises(ValueError, match="predictions b: no answer for question_id 2"):
        paired_vqa_difference({1: "yes", 2: "no"}, {1: "yes"}, annotations)


def test_gqa_exact_match_after_normalisation(tmp_path):
    questions = {
        "201": {"question": "What is it?", "answer": "table", "imageId": "n1",
                "types": {"structural": "query", "semantic": "obj"}},
        "202": {"question": "Is it red?", "answer": "yes", "imageId": "n2",
                "types": {"structural": "verify", "semantic": "attr"}},
        "203": {"question": "What color?", "answer": "white", "imageId": "n3",
                "types": {"structural": "query", "semantic": "attr"}},
    }  # fmt: skip
    q_path = tmp_path / "testdev_balanced_questions.json"
    q_path.write_text(json.dumps(questions))
    results = [
        {"question_id": 201, "answer": "The Table."},  # int id in results, "table" after normalisation
        {"question_id": "202", "answer": "yes"},
        {"question_id": "203", "answer": "black"},
    ]
    r_path = tmp_path / "gqa_results.json"
    r_path.write_text(json.dumps(results))
    annotations = load_gqa(q_path)
    assert annotations["201"].answers == ("table",)
    scores = evaluate_gqa_files(r_path, q_path)
    assert scores.overall == pytest.approx(200 / 3)
    assert scores.per_answer_type == pytest.approx({"query": 50.0, "verify": 100.0})
    assert scores.per_question_type == pytest.approx({"attr": 50.0, "obj": 100.0})


def _write_vqa(tmp_path, qids=(1, 2)):
    questions = {"questions": [{"question_id": q, "image_id": 9, "question": f"q{q}?"} for q in qids]}
    annotations = {
        "annotations": [
            {
                "question_id": q,
                "image_id": 9,
                "answer_type": "yes/no",
                "question_type": "is there",
                "answers": [
                    {"answer": "yes", "answer_id": i + 1, "answer_confidence": "yes"} for i in range(10)
                ],
            }
            for q in qids
        ]
    }
    q_path, a_path = tmp_path / "questions.json", tmp_path / "annotations.json"
    q_path.write_text(json.dumps(questions))
    a_path.write_text(json.dumps(annotations))
    return q_path, a_path


def test_vqa_file_round_trip(tmp_path):
    q_path, a_path = _write_vqa(tmp_path)
    annotations = load_vqa_annotations(q_path, a_path)
    assert annotations[1].answers == ("yes",) * 10
    assert annotations[2].question == "q2?"
    r_path = tmp_path / "results.json"
    r_path.write_text(json.dumps([{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"}]))
    assert load_vqa_results(r_path) == {1: "yes", 2: "no"}
    scores = evaluate_vqa_files(r_path, q_path, a_path)
    assert scores.overall == pytest.approx(50.0)
    assert scores.per_answer_type == pytest.approx({"yes/no": 50.0})


def test_vqa_file_errors_name_file_and_id(tmp_path):
    q_path, a_path = _write_vqa(tmp_path)
    r_path = tmp_path / "results.json"

    r_path.write_text(json.dumps([{"question_id": 1, "answer": "yes"}, {"question_id": 1, "answer": "no"}]))
    with pytest.raises(ValueError, match=r"results\.json: duplicate question_id 1"):
        load_vqa_results(r_path)

    r_path.write_text(json.dumps([{"question_id": 1, "answer": "yes"}]))
    with pytest.raises(ValueError, match=r"results\.json.*no answer for question_id 2"):
        evaluate_vqa_files(r_path, q_path, a_path)

    r_path.write_text(json.dumps([{"question_id": q, "answer": "yes"} for q in (1, 2, 3)]))
    with pytest.raises(ValueError, match=r"results\.json.*unknown question_id 3"):
        evaluate_vqa_files(r_path, q_path, a_path)

    r_path.write_text(json.dumps([{"question_id": 1}]))
    with pytest.raises(ValueError, match=r"results\.json: result for question_id 1 has no field 'answer'"):
        load_vqa_results(r_path)

    (tmp_path / "one").mkdir()
    one_question, _ = _write_vqa(tmp_path / "one", qids=(1,))
    with pytest.raises(ValueError, match=r"one/questions\.json.*no question for question_id 2"):
        load_vqa_annotations(one_question, a_path)


def test_duplicate_annotation_is_an_error(tmp_path):
    q_path, a_path = _write_vqa(tmp_path)
    data = json.loads(a_path.read_text())
    data["annotations"].append(data["annotations"][0])
    a_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\.json: duplicate question_id 1"):
        load_vqa_annotations(q_path, a_path)
