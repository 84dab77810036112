"""Captioning metrics through pycocoevalcap: BLEU@1-4, METEOR, ROUGE-L, CIDEr(-D) and SPICE.

Scores are on pycocoevalcap's scale (fractions: a CIDEr of 1.216 is the paper's 121.6). Captions are
PTB-tokenised by pycocoevalcap's Stanford PTBTokenizer (Java) exactly as the COCO caption evaluation
does; without Java a pure-Python approximation of it is used instead (`simple_ptb_tokenize`: same
lower-casing, punctuation removal, clitic splits and bracket escapes; it may differ on rare cases such
as abbreviations, "mr.") and `CaptionScores.tokenizer` says which one ran.

A metric that cannot run here is reported in `CaptionScores.unavailable` with the reason, never as 0:
METEOR needs Java; SPICE needs Java and the Stanford CoreNLP 3.6.0 jars in pycocoevalcap's
`spice/lib`, which pycocoevalcap would otherwise try to download (we check first, so no network call).
CIDEr's IDF comes from the references of the images scored together, so it is 0 for a single image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
_SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

ImageId = int | str


@dataclass(frozen=True)
class CaptionScores:
    """Metric values and the metrics that could not run.

    `values` keys: bleu_1..bleu_4, meteor, rouge_l, cider, spice (those that ran); `unavailable` maps a
    requested metric to the reason it did not run; `tokenizer` is "ptb" (Java) or "python-fallback".
    """

    values: dict[str, float]
    unavailable: dict[str, str]
    n: int = 0
    tokenizer: str = "ptb"


@dataclass(frozen=True)
class NoCapsScores:
    """Scores of each NoCaps domain (in-domain, near-domain, out-domain) and of all images together."""

    per_domain: dict[str, CaptionScores]
    overall: CaptionScores


class MetricUnavailable(RuntimeError):
    """A metric cannot run on this machine; the message says why."""


# ---------------------------------------------------------------------------------------------------
# Tokenisation.
# ---------------------------------------------------------------------------------------------------


def find_java() -> str | None:
    return shutil.which("java")


# PTB splits these clitics off the word before them ("isn't" -> "is n't", "dog's" -> "dog 's").
_NEGATION = re.compile(r"(\w)(n't)\b")
_CLITIC = re.compile(r"(\w)('s|'re|'ve|'ll|'d|'m)\b")
# A word may hold digit groups ("3.5", "1,000") and inner hyphens/apostrophes ("black-and-white", "o'clock").
_WORD = r"\w+(?:[.,]\d+)*"
_TOKEN = re.compile(rf"n't|'(?:s|re|ve|ll|d|m)\b|{_WORD}(?:[-']{_WORD})*|\.\.\.|--|[^\w\s]")
# PTB escapes brackets as -LRB- etc.; lower-cased, the COCO evaluation's punctuation filter misses them.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# PTB turns quotes into `` and '', which the COCO evaluation drops with the other punctuation.
_DROPPED = frozenset(PUNCTUATIONS) | {'"'}
_CURLY_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def simple_ptb_tokenize(caption: str) -> str:
    """Lower-case, split off punctuation and clitics, drop punctuation: a Java-free PTB approximation."""
    text = caption.replace("\n", " ").lower().translate(_CURLY_QUOTES)
    text = _CLITIC.sub(r"\1 \2", _NEGATION.sub(r"\1 \2", text))
    tokens = (_BRACKETS.get(tok, tok) for tok in _TOKEN.findall(text))
    return " ".join(tok for tok in tokens if tok not in _DROPPED)


def tokenize(captions: Mapping[Hashable, Sequence[str]]) -> tuple[dict[Hashable, list[str]], str]:
    """PTB-tokenise every caption (one Java launch for all); returns (tokenised, tokenizer name)."""
    if find_java() is None:
        return {k: [simple_ptb_tokenize(c) for c in caps] for k, caps in captions.items()}, "python-fallback"
    wrapped = {k: [{"caption": c} for c in caps] for k, caps in captions.items()}
    return PTBTokenizer().tokenize(wrapped), "ptb"


# ---------------------------------------------------------------------------------------------------
# Scorers: each takes tokenised (references, predictions) with identical keys, returns named values.
# ---------------------------------------------------------------------------------------------------

Refs = dict[Hashable, list[str]]
Scorer = Callable[[Refs, Refs], dict[str, float]]


def _bleu(gts: Refs, res: Refs) -> dict[str, float]:
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {f"bleu_{n}": float(s) for n, s in enumerate(score, start=1)}


def _meteor(gts: Refs, res: Refs) -> dict[str, float]:
    if find_java() is None:
        raise MetricUnavailable("METEOR needs Java (meteor-1.5.jar) and `java` is not on PATH")
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
    finally:
        del meteor  # its __del__ stops the Java process now rather than at interpreter exit
    return {"meteor": float(score)}


def _rouge(gts: Refs, res: Refs) -> dict[str, float]:
    score, _ = Rouge().compute_score(gts, res)
    return {"rouge_l": float(score)}


def _cider(gts: Refs, res: Refs) -> dict[str, float]:
    score, _ = Cider().compute_score(gts, res)  # pycocoevalcap's Cider is CIDEr-D (clipping, sigma 6)
    return {"cider": float(score)}


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None. Checked before touching pycocoevalcap's downloading code."""
    if find_java() is None:
        return "SPICE needs Java and `java` is not on PATH"
    import pycocoevalcap.spice as spice_pkg

    lib = Path(spice_pkg.__file__).parent / "lib"
    missing = [jar for jar in _SPICE_CORENLP_JARS if not (lib / jar).is_file()]
    if missing:
        return (
            f"SPICE needs the Stanford CoreNLP 3.6.0 jars, missing from {lib}: {', '.join(missing)} "
            "(pycocoevalcap would download them from nlp.stanford.edu; place them there to enable SPICE)"
        )
    return None


def _spice(gts: Refs, res: Refs) -> dict[str, float]:
    reason = spice_unavailable_reason()
    if reason is not None:
        raise MetricUnavailable(reason)
    from pycocoevalcap.spice.spice import Spice

    score, _ = Spice().compute_score(gts, res)
    return {"spice": float(score)}


_SCORERS: dict[str, Scorer] = {
    "bleu": _bleu,
    "meteor": _meteor,
    "rouge": _rouge,
    "cider": _cider,
    "spice": _spice,
}


def _check_metrics(metrics: Sequence[str]) -> None:
    unknown = [m for m in metrics if m not in _SCORERS]
    if unknown:
        raise ValueError(f"unknown caption metric {unknown[0]!r}; known: {', '.join(METRICS)}")


def score_tokenized(
    gts: Refs, res: Refs, metrics: Sequence[str] = METRICS, tokenizer: str = "ptb"
) -> CaptionScores:
    """Run the chosen scorers on already tokenised references/predictions (same keys, one prediction each)."""
    _check_metrics(metrics)
    values: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    for name in metrics:
        try:
            values.update(_SCORERS[name](gts, res))
        except MetricUnavailable as why:
            unavailable[name] = str(why)
    return CaptionScores(values=values, unavailable=unavailable, n=len(res), tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------------


def check_image_ids(
    predicted: Sequence[ImageId], expected: Sequence[ImageId], source: str = "predictions"
) -> None:
    """Raise unless the predictions cover the reference images exactly (naming the first offender)."""
    predicted_set, expected_set = set(predicted), set(expected)
    missing = sorted(expected_set - predicted_set, key=str)
    if missing:
        raise ValueError(f"{source}: no caption for image_id {missing[0]!r} ({len(missing)} missing)")
    unknown = sorted(predicted_set - expected_set, key=str)
    if unknown:
        raise ValueError(f"{source}: unknown image_id {unknown[0]!r} ({len(unknown)} without references)")


def _tokenize_pairs(
    predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]], source: str
) -> tuple[Refs, Refs, str]:
    """Check ids, tokenise references and predictions in one call; returns (gts, res, tokenizer)."""
    check_image_ids(list(predictions), list(references), source)
    empty = [i for i, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"{source}: image_id {empty[0]!r} has no reference captions")
    ids = list(references)
    merged = {("ref", i): list(references[i]) for i in ids} | {("pred", i): [predictions[i]] for i in ids}
    tokens, tokenizer = tokenize(merged)
    return {i: tokens[("ref", i)] for i in ids}, {i: tokens[("pred", i)] for i in ids}, tokenizer


def caption_scores(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    metrics: Sequence[str] = METRICS,
    source: str = "predictions",
) -> CaptionScores:
    """Score one caption per image against its reference captions (the COCO caption evaluation)."""
    _check_metrics(metrics)
    gts, res, tokenizer = _tokenize_pairs(predictions, references, source)
    return score_tokenized(gts, res, metrics, tokenizer)


def nocaps_scores(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    domains: Mapping[ImageId, str],
    metrics: Sequence[str] = ("cider", "spice"),
    source: str = "predictions",
) -> NoCapsScores:
    """NoCaps: each domain scored on its own images (its own CIDEr IDF), plus all images together."""
    _check_metrics(metrics)
    no_domain = [i for i in references if i not in domains]
    if no_domain:
        raise ValueError(f"{source}: image_id {no_domain[0]!r} has no NoCaps domain")
    gts, res, tokenizer = _tokenize_pairs(predictions, references, source)
    per_domain: dict[str, CaptionScores] = {}
    for domain in sorted(set(domains[i] for i in gts)):
        ids = [i for i in gts if domains[i] == domain]
        per_domain[domain] = score_tokenized(
            {i: gts[i] for i in ids}, {i: res[i] for i in ids}, metrics, tokenizer
        )
    return NoCapsScores(per_domain=per_domain, overall=score_tokenized(gts, res, metrics, tokenizer))


# ---------------------------------------------------------------------------------------------------
# Readers.
# ---------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _field(record: object, name: str, path: Path, where: str) -> object:
    if not isinstance(record, Mapping) or name not in record:
        raise ValueError(f"{path}: {where} has no field {name!r}")
    return record[name]


def _coco_images(data: Mapping, path: Path) -> list[Mapping]:
    images = data.get("images")
    if images is None:
        return []
    if not isinstance(images, list):
        raise ValueError(f"{path}: 'images' must be a list")
    return images


def load_coco_captions(path: str | os.PathLike[str]) -> dict[ImageId, list[str]]:
    """Read COCO captions annotations (`{"images": [...], "annotations": [{"image_id", "caption"}]}`).

    When `images` is present, every listed image needs a caption and every caption a listed image.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, Mapping) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: expected a COCO captions object with an 'annotations' list")
    listed = [_field(img, "id", path, f"image #{i}") for i, img in enumerate(_coco_images(data, path))]
    refs: dict[ImageId, list[str]] = {image_id: [] for image_id in listed}
    for i, ann in enumerate(data["annotations"]):
        image_id = _field(ann, "image_id", path, f"annotation #{i}")
        caption = _field(ann, "caption", path, f"annotation #{i}")
        if listed and image_id not in refs:
            raise ValueError(f"{path}: annotation #{i} refers to image_id {image_id!r}, not in 'images'")
        refs.setdefault(image_id, []).append(str(caption))
    for image_id, caps in refs.items():
        if not caps:
            raise ValueError(f"{path}: image_id {image_id!r} has no captions")
    return refs


def load_coco_results(path: str | os.PathLike[str]) -> dict[ImageId, str]:
    """Read COCO caption results `[{"image_id": ..., "caption": str}]`; a repeated image id is an error."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'image_id', 'caption'}} records")
    out: dict[ImageId, str] = {}
    for i, rec in enumerate(data):
        image_id = _field(rec, "image_id", path, f"result #{i}")
        caption = _field(rec, "caption", path, f"result for image_id {image_id!r}")
        if image_id in out:
            raise ValueError(f"{path}: duplicate image_id {image_id!r}")
        out[image_id] = str(caption)
    return out


def load_nocaps(path: str | os.PathLike[str]) -> tuple[dict[ImageId, list[str]], dict[ImageId, str]]:
    """Read NoCaps annotations (COCO captions format whose images carry `domain`): (references, domains)."""
    path = Path(path)
    refs = load_coco_captions(path)
    data = _read_json(path)
    domains: dict[ImageId, str] = {}
    for i, img in enumerate(_coco_images(data, path)):
        domain = str(_field(img, "domain", path, f"image #{i}"))
        if domain not in NOCAPS_DOMAINS:
            raise ValueError(
                f"{path}: image_id {img['id']!r} has domain {domain!r}, not one of {NOCAPS_DOMAINS}"
            )
        domains[img["id"]] = domain
    if not domains:
        raise ValueError(f"{path}: NoCaps annotations need an 'images' list with a 'domain' per image")
    return refs, domains


def evaluate_caption_files(
    results_path: str | os.PathLike[str],
    annotations_path: str | os.PathLike[str],
    metrics: Sequence[str] = METRICS,
) -> CaptionScores:
    """Score a COCO results file against COCO captions annotations (e.g. the Karpathy test split)."""
    references = load_coco_captions(annotations_path)
    predictions = load_coco_results(results_path)
    return caption_scores(
        predictions, references, metrics, source=f"{results_path} (against {annotations_path})"
    )


def evaluate_nocaps_files(
    results_path: str | os.PathLike[str],
    annotations_path: str | os.PathLike[str],
    metrics: Sequence[str] = ("cider", "spice"),
) -> NoCapsScores:
    """Score a COCO-format results file against NoCaps annotations, per domain and overall."""
    references, domains = load_nocaps(annotations_path)
    predictions = load_coco_results(results_path)
    source = f"{results_path} (against {annotations_path})"
    return nocaps_scores(predictions, references, domains, metrics, source=source)
