"""VQAv2-style questions about a scene, with ten human-like answers each.

Question kinds: colour, shape, count, position and yes/no. Only unambiguous questions are asked (the
colour of "the star" only when the scene has one star). Each of the ten answers agrees with the truth
except, with probability `noise`, a plausible wrong answer of the same kind, as annotators sometimes do.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from data_catalog.synth.captions import WHERE
from data_catalog.synth.scenes import COLOURS, POSITIONS, SHAPES, Scene

_NUMBER_WORDS = ["0", "1", "2", "3", "4"]


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    question_type: str  # the VQAv2 question prefix, e.g. "what color is the"
    answer_type: str  # "yes/no", "number" or "other"
    choices: tuple[str, ...]  # where a noisy annotator's answer comes from


def _unique(scene: Scene, key: str) -> list:
    counts = Counter(getattr(s, key) for s in scene.shapes)
    return [s for s in scene.shapes if counts[getattr(s, key)] == 1]


def _candidates(scene: Scene, rng: random.Random) -> list[Question]:
    qs = [
        Question(
            "what color is the background?", scene.background, "what color is the", "other", tuple(COLOURS)
        )
    ]
    for s in _unique(scene, "kind"):
        qs.append(
            Question(f"what color is the {s.kind}?", s.colour, "what color is the", "other", tuple(COLOURS))
        )
        qs.append(Question(f"where is the {s.kind}?", s.position, "where is the", "other", POSITIONS))
    for s in scene.shapes:
        where = WHERE[s.position]
        qs.append(Question(f"what shape is {where}?", s.kind, "what shape is", "other", SHAPES))
    n = len(scene.shapes)
    qs.append(Question("how many shapes are there?", str(n), "how many", "number", tuple(_NUMBER_WORDS)))
    colour = rng.choice(scene.shapes).colour
    n_colour = sum(s.colour == colour for s in scene.shapes)
    qs.append(Question(f"how many {colour} shapes are there?", str(n_colour), "how many", "number",
                       tuple(_NUMBER_WORDS)))  # fmt: skip
    kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    present = any(s.kind == kind and s.colour == colour for s in scene.shapes)
    qs.append(Question(f"is there a {colour} {kind}?", "yes" if present else "no", "is there a", "yes/no",
                       ("yes", "no")))  # fmt: skip
    s = rng.choice(scene.shapes)
    qs.append(Question(f"is there a {s.kind} in the image?", "yes", "is there a", "yes/no", ("yes", "no")))
    return qs


def questions(scene: Scene, rng: random.Random, n: int) -> list[Question]:
    """Up to `n` distinct questions about `scene`, of as many kinds as it allows."""
    pool = _candidates(scene, rng)
    rng.shuffle(pool)
    seen: set[str] = set()
    picked = []
    for q in pool:
        if q.question not in seen:
            seen.add(q.question)
            picked.append(q)
    return picked[:n]


def human_answers(q: Question, rng: random.Random, noise: float) -> list[str]:
    """Ten annotators' answers: the truth, each replaced by another choice with probability `noise`."""
    wrong = [c for c in q.choices if c != q.answer]
    return [rng.choice(wrong) if rng.random() < noise else q.answer for _ in range(10)]


def majority(answers: list[str], truth: str) -> str:
    """VQAv2's multiple_choice_answer: the most frequent answer (ties go to the truth)."""
    counts = Counter(answers)
    best = max(counts.values())
    return truth if counts[truth] == best else counts.most_common(1)[0][0]
