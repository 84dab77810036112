"""Scenes of 1-3 coloured shapes: the ground truth of the synthetic corpus, and their rendering.

A scene is data (`Scene`), sampled from a seeded `random.Random`; the image is drawn from it with PIL.
Shapes in one scene sit at different positions so that "on the left" names exactly one of them.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "rectangle", "star")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

# Centre of each position as a fraction of the image side, and shape radius per size. Large shapes
# at neighbouring positions (0.25 apart) just fit: 2 * 0.115 < 0.25.
_CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
            "center": (0.5, 0.5)}  # fmt: skip
_RADIUS = {"small": 0.065, "large": 0.115}
_JITTER = 0.015


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    position: str  # one of POSITIONS


@dataclass(frozen=True)
class Scene:
    background: str  # a colour no shape of the scene has
    shapes: tuple[Shape, ...]


def sample_scene(rng: random.Random, max_shapes: int = 3) -> Scene:
    """A random scene; identical shapes (kind, colour, size) are likelier than chance so counts vary."""
    n = rng.randint(1, max_shapes)
    positions = rng.sample(POSITIONS, n)
    first = Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), positions[0])
    shapes = [first]
    for position in positions[1:]:
        if rng.random() < 0.4:  # "two small red stars" needs repeats
            shapes.append(Shape(first.kind, first.colour, first.size, position))
        else:
            shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), position))
    used = {s.colour for s in shapes}
    background = rng.choice([c for c in COLOURS if c not in used])
    return Scene(background, tuple(shapes))


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        angles = [-90, 30, 150]
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]
    if kind == "star":  # five points, inner radius 0.45 r
        return [
            (cx + rr * math.cos(math.radians(-90 + 36 * i)), cy + rr * math.sin(math.radians(-90 + 36 * i)))
            for i, rr in enumerate([r, 0.45 * r] * 5)
        ]
    half_w, half_h = {"square": (0.85 * r, 0.85 * r), "rectangle": (r, 0.55 * r)}[kind]
    return [
        (cx - half_w, cy - half_h),
        (cx + half_w, cy - half_h),
        (cx + half_w, cy + half_h),
        (cx - half_w, cy + half_h),
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, side: int, rng: random.Random) -> None:
    fx, fy = _CENTRES[shape.position]
    cx = (fx + rng.uniform(-_JITTER, _JITTER)) * side
    cy = (fy + rng.uniform(-_JITTER, _JITTER)) * side
    r = _RADIUS[shape.size] * side * rng.uniform(0.9, 1.1)
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape.kind, cx, cy, r), fill=fill)


def render(scene: Scene, side: int, rng: random.Random, quality: int = 90) -> bytes:
    """The scene as JPEG bytes, `side` pixels square; `rng` jitters positions and sizes a little."""
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape, side, rng)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
