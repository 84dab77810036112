"""VQA accuracy as the official VQA evaluation (`vqaEval.py` of the VQA API) computes it.

The score of one prediction against the human answers is `min(1, #matching humans / 3)`, averaged over
the 10 leave-one-annotator-out subsets; the overall score is the mean over questions, times 100.
Answers are compared after the official normalisation (`normalize_answer`). GQA has one answer per
question, so its accuracy is exact match after the same normalisation.

Formats read here: VQAv2 / OK-VQA questions + annotations JSON, GQA questions JSON, and the standard
results file `[{"question_id": ..., "answer": ...}]`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

QuestionId = int | str

# ---------------------------------------------------------------------------------------------------
# The official normalisation tables (vqaEval.py, VQA API).
# ---------------------------------------------------------------------------------------------------

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

# The official map also sends "none" to "0" (answers to "how many ..." questions).
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# `(?!<=\d)` is the official pattern verbatim: a typo for a look-behind that is really a look-ahead for
# the text "<=digit", which a "." never starts, so in effect: strip every "." not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official code calls `periodStrip.sub("", text, re.UNICODE)`: the flag lands in `count`, so at
# most 32 periods are stripped. Kept for exactness; no real answer has that many.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`: drop or space out punctuation, strip sentence periods.

    A mark next to a space (or any mark, once the text has a comma between digits, as in "1,000") is
    deleted; a mark inside a word is replaced by a space ("black/white" -> "black white").
    """
    out = text
    delete = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        if delete or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words -> digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(s: str) -> str:
    """The full official answer normalisation: whitespace, punctuation, then digits/articles/contractions."""
    return process_digit_article(process_punctuation(_clean_whitespace(s)))


# ---------------------------------------------------------------------------------------------------
# Annotations and scores.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQAAnnotation:
    """One question with its human answers (10 for VQAv2/OK-VQA, 1 for GQA)."""

    question_id: QuestionId
    answers: tuple[str, ...]
    answer_type: str = ""
    question_type: str = ""
    question: str = ""
    image_id: int | str | None = None


@dataclass(frozen=True)
class VQAScores:
    """Accuracies in percent (0-100), unrounded; `n` is the number of questions scored."""

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    n: int


NormalizeMode = Literal["official", "always"]


def leave_one_out_accuracy(prediction: str, answers: Iterable[str]) -> float:
    """Mean over the leave-one-annotator-out subsets of min(1, #matches among the others / 3).

    `prediction` and `answers` must already be normalised as the caller wants them compared.
    """
    answers = list(answers)
    matches = sum(answer == prediction for answer in answers)
    # Leaving out annotator i removes one match exactly when annotator i agreed with the prediction.
    accs = [min(1.0, (matches - (answer == prediction)) / 3.0) for answer in answers]
    return sum(accs) / len(accs)


def question_accuracy(
    prediction: str, answers: tuple[str, ...], normalize: NormalizeMode = "official"
) -> float:
    """Accuracy in [0, 1] of one prediction: leave-one-out for several answers, exact match for one.

    With `normalize="official"`, as in vqaEval.py, answers and prediction are only normalised when the
    humans disagree (the VQA annotation files hold answers that are already normalised); with
    `"always"` both are always normalised. One answer (GQA) is always compared after normalisation.
    """
    prediction = _clean_whitespace(prediction)
    answers = tuple(_clean_whitespace(a) for a in answers)
    if len(answers) == 1:
        return float(normalize_answer(prediction) == normalize_answer(answers[0]))
    if normalize == "always" or len(set(answers)) > 1:
        prediction = normalize_answer(prediction)
        answers = tuple(normalize_answer(a) for a in answers)
    return leave_one_out_accuracy(prediction, answers)


def check_question_ids(
    predicted: Iterable[QuestionId],
    expected: Iterable[QuestionId],
    source: str = "predictions",
    what: str = "answer",
) -> None:
    """Raise unless the predictions cover the annotated questions exactly (naming the first offender)."""
    predicted, expected = set(predicted), set(expected)
    missing = sorted(expected - predicted, key=str)
    if missing:
        raise ValueError(f"{source}: no {what} for question_id {missing[0]!r} ({len(missing)} missing)")
    unknown = sorted(predicted - expected, key=str)
    if unknown:
        raise ValueError(f"{source}: unknown question_id {unknown[0]!r} ({len(unknown)} not annotated)")


def _mean_percent(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values)


def vqa_accuracy(
    predictions: Mapping[QuestionId, str],
    annotations: Mapping[QuestionId, VQAAnnotation],
    normalize: NormalizeMode = "official",
    source: str = "predictions",
) -> VQAScores:
    """Overall, per-answer-type and per-question-type accuracy (percent) over all annotated questions."""
    if not annotations:
        raise ValueError("vqa_accuracy: no annotated questions")
    check_question_ids(predictions.keys(), annotations.keys(), source)
    per_question: list[float] = []
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for qid, ann in annotations.items():
        acc = question_accuracy(predictions[qid], ann.answers, normalize)
        per_question.append(acc)
        if ann.answer_type:
            by_answer_type[ann.answer_type].append(acc)
        if ann.question_type:
            by_question_type[ann.question_type].append(acc)
    return VQAScores(
        overall=_mean_percent(per_question),
        per_answer_type={k: _mean_percent(v) for k, v in sorted(by_answer_type.items())},
        per_question_type={k: _mean_percent(v) for k, v in sorted(by_question_type.items())},
        n=len(per_question),
    )


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of predictions `a` minus that of `b` on the same questions, in points (0-100).

    `se` is the standard error of that mean over questions (the sample standard deviation of the
    per-question differences over sqrt(n)). Pairing removes what both get right or wrong alike, so the
    interval is far tighter than two independent accuracies would allow."""

    difference: float
    se: float
    n: int

    def verdict(self, z: float = 2.0) -> str:
        """'level' when the difference is within `z` standard errors of 0, else 'a ahead' or 'b ahead'."""
        if abs(self.difference) <= z * self.se:
            return "level"
        return "a ahead" if self.difference > 0 else "b ahead"


def paired_vqa_difference(
    a: Mapping[QuestionId, str],
    b: Mapping[QuestionId, str],
    annotations: Mapping[QuestionId, VQAAnnotation],
    normalize: NormalizeMode = "official",
) -> PairedDifference:
    """How much more accurate predictions `a` are than `b`, question by question (Figure 5's two runs)."""
    if not annotations:
        raise ValueError("paired_vqa_difference: no annotated questions")
    check_question_ids(a.keys(), annotations.keys(), "predictions a")
    check_question_ids(b.keys(), annotations.keys(), "predictions b")
    diffs = [
        question_accuracy(a[q], ann.answers, normalize) - question_accuracy(b[q], ann.answers, normalize)
        for q, ann in annotations.items()
    ]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return PairedDifference(100.0 * mean, 100.0 * math.sqrt(var / n), n)


# ---------------------------------------------------------------------------------------------------
# Readers.
# ---------------------------------------------------------------------------------------------------


def _read_json(path: str | os.PathLike[str]) -> object:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _field(record: Mapping, name: str, path: Path, where: str) -> object:
    if not isinstance(record, Mapping) or name not in record:
        raise ValueError(f"{path}: {where} has no field {name!r}")
    return record[name]


def _records(data: object, key: str, path: Path) -> list:
    if not isinstance(data, Mapping) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected a JSON object with a {key!r} list")
    return data[key]


def _index_unique(records: list, path: Path, what: str) -> dict[QuestionId, Mapping]:
    out: dict[QuestionId, Mapping] = {}
    for i, rec in enumerate(records):
        qid = _field(rec, "question_id", path, f"{what} #{i}")
        if qid in out:
            raise ValueError(f"{path}: duplicate question_id {qid!r}")
        out[qid] = rec
    return out


def _annotation(qid: QuestionId, ann: Mapping, question: Mapping | None, path: Path) -> VQAAnnotation:
    answers = _field(ann, "answers", path, f"question_id {qid!r}")
    if not answers:
        raise ValueError(f"{path}: question_id {qid!r} has no answers")
    return VQAAnnotation(
        question_id=qid,
        answers=tuple(str(_field(a, "answer", path, f"an answer of question_id {qid!r}")) for a in answers),
        answer_type=str(ann.get("answer_type", "")),
        question_type=str(ann.get("question_type", "")),
        question=str((question or {}).get("question", "")),
        image_id=ann.get("image_id"),
    )


def load_vqa_annotations(
    questions_path: str | os.PathLike[str] | None, annotations_path: str | os.PathLike[str]
) -> dict[QuestionId, VQAAnnotation]:
    """Read VQAv2 / OK-VQA `{"annotations": [...]}` (+ optional `{"questions": [...]}`) keyed by question id.

    The questions file only contributes the question text; when given, it must hold exactly the
    annotated question ids.
    """
    ann_path = Path(annotations_path)
    annotations = _index_unique(
        _records(_read_json(ann_path), "annotations", ann_path), ann_path, "annotation"
    )
    questions: dict[QuestionId, Mapping] = {}
    if questions_path is not None:
        q_path = Path(questions_path)
        questions = _index_unique(_records(_read_json(q_path), "questions", q_path), q_path, "question")
        check_question_ids(questions.keys(), annotations.keys(), f"{q_path} (against {ann_path})", "question")
    return {qid: _annotation(qid, ann, questions.get(qid), ann_path) for qid, ann in annotations.items()}


def load_gqa(path: str | os.PathLike[str]) -> dict[QuestionId, VQAAnnotation]:
    """Read a GQA questions JSON (`{question_id: {"question", "answer", "types", "imageId"}}`).

    Question ids are the file's string keys. The answer type is GQA's structural type (verify, query,
    choose, logical, compare) and the question type its semantic type (rel, attr, obj, cat, global).
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a JSON object keyed by question id")
    out: dict[QuestionId, VQAAnnotation] = {}
    for qid, rec in data.items():
        types = rec.get("types", {}) if isinstance(rec, Mapping) else {}
        out[qid] = VQAAnnotation(
            question_id=qid,
            answers=(str(_field(rec, "answer", path, f"question_id {qid!r}")),),
            answer_type=str(types.get("structural", "")),
            question_type=str(types.get("semantic", "")),
            question=str(rec.get("question", "")),
            image_id=rec.get("imageId"),
        )
    return out


def load_vqa_results(path: str | os.PathLike[str]) -> dict[QuestionId, str]:
    """Read a results file `[{"question_id": ..., "answer": str}]`; a repeated question id is an error."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'question_id', 'answer'}} records")
    out: dict[QuestionId, str] = {}
    for i, rec in enumerate(data):
        qid = _field(rec, "question_id", path, f"result #{i}")
        answer = _field(rec, "answer", path, f"result for question_id {qid!r}")
        if qid in out:
            raise ValueError(f"{path}: duplicate question_id {qid!r}")
        out[qid] = str(answer)
    return out


def evaluate_vqa_files(
    results_path: str | os.PathLike[str],
    questions_path: str | os.PathLike[str] | None,
    annotations_path: str | os.PathLike[str],
    normalize: NormalizeMode = "official",
) -> VQAScores:
    """Score a VQAv2 / OK-VQA results file against its questions and annotations files."""
    annotations = load_vqa_annotations(questions_path, annotations_path)
    predictions = load_vqa_results(results_path)
    return vqa_accuracy(
        predictions, annotations, normalize, source=f"{results_path} (against {annotations_path})"
    )


def evaluate_gqa_files(
    results_path: str | os.PathLike[str], questions_path: str | os.PathLike[str]
) -> VQAScores:
    """Score a results file against a GQA questions file (ids compared as strings, as GQA keys them)."""
    annotations = load_gqa(questions_path)
    predictions: dict[QuestionId, str] = {}
    for qid, answer in load_vqa_results(results_path).items():
        if str(qid) in predictions:
            raise ValueError(f"{results_path}: duplicate question_id {qid!r}")
        predictions[str(qid)] = answer
    return vqa_accuracy(predictions, annotations, source=f"{results_path} (against {questions_path})")
