"""Scenes drawn by code: figures of two classes on named backgrounds, with their ground truth.

A *man* is a round head over a rectangular body on two legs; a *woman* a round head over
a dress that widens downwards. The base model sees figures only in plain colours. An
*identity* is a figure class with a look the base model never saw (stripes, a checker,
two-tone halves, a hat): what an identity LoRA teaches. Two figures often overlap, the
one drawn last in front ("a woman in front of a man").

Every scene comes with per-pixel labels: the figure class (background / man / woman) and
the look (plain / identity k), which the scorer learns and the measures use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIZE = 24
"""Images are SIZE × SIZE RGB; the toy model works on them directly (no VAE)."""

CLASSES = ("man", "woman")

BACKGROUNDS = {
    "on grass": (0.20, 0.55, 0.20),
    "at the beach": (0.85, 0.75, 0.50),
    "in snow": (0.88, 0.90, 0.95),
    "at night": (0.08, 0.08, 0.25),
}

PLAIN_COLOURS = (
    (0.80, 0.15, 0.15), (0.15, 0.30, 0.85), (0.95, 0.85, 0.15), (0.55, 0.20, 0.70),
    (0.95, 0.55, 0.10), (0.10, 0.70, 0.70), (0.45, 0.30, 0.15), (0.60, 0.60, 0.60),
)
SKIN = (0.95, 0.75, 0.60)


@dataclass(frozen=True)
class Identity:
    """A figure with a look of its own, learnt by one LoRA with a trigger word."""

    trigger: str
    figure: str
    pattern: str
    colours: tuple[tuple[float, float, float], tuple[float, float, float]]


IDENTITIES = (
    Identity("zorb", "man", "stripes", ((0.90, 0.10, 0.10), (1.0, 1.0, 1.0))),
    Identity("quix", "woman", "halves", ((0.10, 0.20, 0.90), (1.0, 0.90, 0.10))),
    Identity("plok", "man", "checker", ((1.0, 0.90, 0.10), (0.05, 0.05, 0.05))),
    Identity("vann", "woman", "hat", ((0.10, 0.75, 0.25), (0.90, 0.10, 0.10))),
)
LOOKS = ("plain",) + tuple(i.trigger for i in IDENTITIES)
"""Look labels: 0 plain, k the k-th identity."""

WORDS = ("a", "and", "in", "front", "of", "two", "men", "women") + CLASSES + tuple(
    w for bg in BACKGROUNDS for w in bg.split()) + tuple(i.trigger for i in IDENTITIES)


@dataclass
class Figure:
    kind: str
    x: float
    """Centre, in pixels."""
    y: float
    """Top of the head, in pixels."""
    height: float
    look: int = 0
    """0: plain, k: ``IDENTITIES[k - 1]``."""
    colour: tuple[float, float, float] = PLAIN_COLOURS[0]


@dataclass
class Scene:
    background: str
    figures: list[Figure] = field(default_factory=list)
    """Back to front: the last one is drawn in front."""
    in_front: bool = False
    """The prompt says which figure stands in front."""

    def prompt(self, triggers: bool = True) -> str:
        return scene_prompt(self, triggers)


def _word(figure: Figure, triggers: bool) -> str:
    if triggers and figure.look:
        return f"a {IDENTITIES[figure.look - 1].trigger} {figure.kind}"
    return f"a {figure.kind}"


def scene_prompt(scene: Scene, triggers: bool = True) -> str:
    """The prompt a person would write for the scene: "a woman in front of a man on grass"."""
    words = [_word(f, triggers) for f in scene.figures]
    if len(words) == 1:
        subject = words[0]
    elif scene.in_front:
        subject = f"{words[1]} in front of {words[0]}"
    else:
        subject = f"{words[0]} and {words[1]}"
    return f"{subject} {scene.background}"


def figure_masks(figure: Figure, size: int = SIZE) -> dict[str, np.ndarray]:
    """Boolean masks of the figure's parts: head, body, legs (man), hat (identity with one)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    h = figure.height
    r = 0.14 * h
    cx, top = figure.x, figure.y
    head = (xx - cx) ** 2 + (yy - (top + r)) ** 2 <= r ** 2
    body_top, body_bottom = top + 2 * r, top + h
    parts = {"head": head}
    if figure.kind == "man":
        half = 0.20 * h
        torso_bottom = top + 0.68 * h
        parts["body"] = (abs(xx - cx) <= half) & (yy >= body_top) & (yy < torso_bottom)
        legs = (yy >= torso_bottom) & (yy < body_bottom)
        parts["legs"] = legs & (abs(xx - cx) <= half) & (abs(xx - cx) >= 0.05 * h)
    else:
        frac = np.clip((yy - body_top) / max(body_bottom - body_top, 1e-3), 0, 1)
        half = 0.08 * h + 0.22 * h * frac
        parts["body"] = (abs(xx - cx) <= half) & (yy >= body_top) & (yy < body_bottom)
    if figure.look and IDENTITIES[figure.look - 1].pattern == "hat":
        parts["hat"] = (abs(xx - cx) <= 1.4 * r) & (yy >= top - 0.5 * r) & (yy < top + 0.6 * r)
    return parts


def _body_colours(figure: Figure, mask: np.ndarray, size: int) -> np.ndarray:
    """[size, size, 3] colours of the figure's body in its look."""
    yy, xx = np.mgrid[0:size, 0:size]
    colour = np.broadcast_to(np.array(figure.colour, np.float32), (size, size, 3)).copy()
    if not figure.look:
        return colour
    identity = IDENTITIES[figure.look - 1]
    a, b = (np.array(c, np.float32) for c in identity.colours)
    if identity.pattern == "stripes":
        second = (yy // 2) % 2 == 1
    elif identity.pattern == "checker":
        second = ((yy // 2) + (xx // 2)) % 2 == 1
    elif identity.pattern == "halves":
        second = xx + 0.5 >= figure.x
    else:  # hat: a plain body in the identity's first colour, the hat in its second
        second = np.zeros((size, size), bool)
    colour[:] = a
    colour[second] = b
    return colour


def render(scene: Scene, size: int = SIZE, rng: np.random.Generator | None = None):
    """The image [size, size, 3] in [0, 1], figure-class labels and look labels [size, size].

    Class labels: 0 background, 1 man, 2 woman. Look labels: 0 plain (and background),
    k identity k. ``rng`` adds a little background texture and pixel noise.
    """
    image = np.broadcast_to(np.array(BACKGROUNDS[scene.background], np.float32), (size, size, 3)).copy()
    if rng is not None:
        image += rng.normal(0, 0.03, (size, size, 1)).astype(np.float32)
    kinds = np.zeros((size, size), np.int64)
    looks = np.zeros((size, size), np.int64)
    for figure in scene.figures:
        parts = figure_masks(figure, size)
        body = parts["body"] | parts.get("legs", False)
        colours = _body_colours(figure, body, size)
        image[body] = colours[body]
        image[parts["head"]] = SKIN
        whole = body | parts["head"]
        if "hat" in parts:
            image[parts["hat"]] = IDENTITIES[figure.look - 1].colours[1]
            whole |= parts["hat"]
        kinds[whole] = CLASSES.index(figure.kind) + 1
        looks[whole] = figure.look
    if rng is not None:
        image += rng.normal(0, 0.01, image.shape).astype(np.float32)
    return np.clip(image, 0, 1), kinds, looks


def random_figure(rng: np.random.Generator, kind: str, look: int = 0, size: int = SIZE) -> Figure:
    height = rng.uniform(0.45, 0.8) * size
    x = rng.uniform(0.2, 0.8) * size
    y = rng.uniform(0.02, 0.98 * size - height)
    return Figure(kind, x, y, height, look, PLAIN_COLOURS[rng.integers(len(PLAIN_COLOURS))])


def random_scene(rng: np.random.Generator, *, looks: tuple[int, ...] = (), size: int = SIZE) -> Scene:
    """A base-model scene (plain figures) or, with ``looks``, one figure per given identity.

    Base scenes: one figure (a third of them) or two, which overlap about half the time.
    """
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    if looks:
        figures = [random_figure(rng, IDENTITIES[k - 1].figure, k, size) for k in looks]
        return Scene(background, figures)
    count = 1 if rng.random() < 1 / 3 else 2
    figures = [random_figure(rng, CLASSES[rng.integers(2)], 0, size) for _ in range(count)]
    scene = Scene(background, figures)
    if count == 2:
        if rng.random() < 0.5:  # overlap: the second figure stands close to the first
            figures[1].x = float(np.clip(figures[0].x + rng.uniform(-0.25, 0.25) * size, 0.15 * size, 0.85 * size))
        scene.in_front = rng.random() < 0.5
    return scene
