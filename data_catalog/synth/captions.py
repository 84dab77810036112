"""Captions of scenes: true ones in varied templates, and the noisy web captions of pretraining.

Identical shapes (same kind, colour and size) are described together ("two small red stars"); a lone
shape also gets its position ("a large blue circle on the left"). A partly wrong caption describes
the scene with exactly one attribute changed (colour, shape, count or position); an unrelated caption
describes another scene.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from data_catalog.synth.scenes import COLOURS, POSITIONS, SHAPES, Scene, Shape

WRONG_ATTRIBUTES = ("colour", "shape", "count", "position")
_COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "center": "in the center"}  # fmt: skip
_TEMPLATES = (
    "{objects} on a {bg} background",
    "a {bg} background with {objects}",
    "a picture of {objects}",
    "{objects} against a {bg} backdrop",
    "an image showing {objects}",
    "a drawing of {objects} over a {bg} background",
)


@dataclass(frozen=True)
class Group:
    """Identical shapes of one scene, described together."""

    kind: str
    colour: str
    size: str
    count: int
    position: str | None  # only for a lone shape


@dataclass(frozen=True)
class Detail:
    """Which optional words a caption uses."""

    size: bool = True
    position: bool = True
    background: bool = True


FULL = Detail()


def groups(scene: Scene) -> list[Group]:
    """The scene's shapes grouped by (kind, colour, size), in order of first appearance."""
    found: dict[tuple[str, str, str], list[Shape]] = {}
    for s in scene.shapes:
        found.setdefault((s.kind, s.colour, s.size), []).append(s)
    return [
        Group(kind, colour, size, len(members), members[0].position if len(members) == 1 else None)
        for (kind, colour, size), members in found.items()
    ]


def _article(count: int, next_word: str) -> str:
    if count == 1:
        return "an" if next_word[0] in "aeiou" else "a"
    return _COUNT_WORDS[count]


def group_phrase(g: Group, detail: Detail) -> str:
    words = ([g.size] if detail.size else []) + [g.colour, g.kind + ("s" if g.count > 1 else "")]
    phrase = f"{_article(g.count, words[0])} {' '.join(words)}"
    if detail.position and g.position is not None:
        phrase += " " + WHERE[g.position]
    return phrase


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(scene_groups: list[Group], background: str, template: int, detail: Detail) -> str:
    text = _TEMPLATES[template % len(_TEMPLATES)]
    if "{bg}" in text and not detail.background:
        text = _TEMPLATES[2]  # the one template without a background
    return text.format(objects=_join([group_phrase(g, detail) for g in scene_groups]), bg=background)


def gt_caption(scene: Scene) -> str:
    """The canonical caption: every attribute, the first template."""
    return describe(groups(scene), scene.background, 0, FULL)


def reference_captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """`n` true captions in different templates and levels of detail, like COCO's five references."""
    templates = rng.sample(range(len(_TEMPLATES)), min(n, len(_TEMPLATES)))
    templates += [rng.randrange(len(_TEMPLATES)) for _ in range(n - len(templates))]
    details = [Detail(rng.random() < 0.7, rng.random() < 0.7, True) for _ in range(n)]
    return [describe(groups(scene), scene.background, t, d) for t, d in zip(templates, details, strict=True)]


def correct_caption(scene: Scene, rng: random.Random) -> str:
    return reference_captions(scene, rng, n=1)[0]


def applicable(scene: Scene, attribute: str) -> bool:
    """Whether `attribute` can be changed in a caption of `scene` so that the change shows."""
    if attribute == "position":
        return any(g.position is not None for g in groups(scene)) and len(scene.shapes) < len(POSITIONS)
    return True


def _other(options: list[str] | tuple[str, ...], exclude: set[str], rng: random.Random) -> str:
    return rng.choice([o for o in options if o not in exclude])


def wrong_caption(scene: Scene, attribute: str, rng: random.Random) -> str:
    """A caption of `scene` with one `attribute` of one group changed; every attribute is spelled out."""
    gs = groups(scene)
    i = rng.choice([k for k, g in enumerate(gs) if attribute != "position" or g.position is not None])
    g = gs[i]
    if attribute == "colour":
        g = replace(
            g, colour=_other(list(COLOURS), {s.colour for s in scene.shapes} | {scene.background}, rng)
        )
    elif attribute == "shape":
        g = replace(g, kind=_other(SHAPES, {g.kind}, rng))
    elif attribute == "count":
        g = replace(
            g, count=g.count + 1 if g.count == 1 or rng.random() < 0.5 else g.count - 1, position=None
        )
    elif attribute == "position":
        g = replace(g, position=_other(POSITIONS, {s.position for s in scene.shapes}, rng))
    else:
        raise ValueError(
            f"wrong_caption: unknown attribute {attribute!r}; expected one of {WRONG_ATTRIBUTES}"
        )
    gs[i] = g
    return describe(gs, scene.background, rng.randrange(len(_TEMPLATES)), FULL)
