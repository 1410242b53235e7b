"""The toy "shapes" world: 16×16 RGB images of one coloured shape on black, captioned by a tiny grammar.

6 colours × 3 shapes × 5 positions × 2 sizes = 180 scenes. Captions read "a large red circle on the left",
"a small blue square in the center". The 180 scenes are split once, deterministically, into 126 train /
18 val / 36 test combinations, each split covering every colour, shape, position and size; test captions are
never seen in pretraining or preference training, val captions only select checkpoints.

The pretraining data (``pretraining_captions``) gives a fixed share of images a caption naming the WRONG
colour: the base model inherits that mistake, and preferences can later remove it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from mmalign.errors import UserError

SIZE = 16  # canvas side in pixels

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
SHAPES = ("circle", "square", "triangle")
# shape centre (x, y) in pixel coordinates, the canvas spanning [0, 16] on both axes
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (4.5, 8.0),
    "right": (11.5, 8.0),
    "top": (8.0, 4.5),
    "bottom": (8.0, 11.5),
    "center": (8.0, 8.0),
}
# half the side of the shape's bounding box
SIZES: dict[str, float] = {"small": 2.0, "large": 3.5}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
JITTER = 1.0  # ± pixels of uniform position jitter per render
SUPERSAMPLE = 4  # antialiasing: sub-pixel samples per pixel side


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    size: str


def all_scenes() -> list[Scene]:
    """The 180 scenes in a fixed order (colour, shape, position, size)."""
    return [Scene(*combo) for combo in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES)]


# ------------------------------------------------------------------------------------------------- grammar


def caption(scene: Scene) -> str:
    return f"a {scene.size} {scene.colour} {scene.shape} {POSITION_PHRASES[scene.position]}"


_PARSE = {caption(scene): scene for scene in all_scenes()}


def parse_caption(text: str) -> Scene:
    """Inverse of ``caption``; case and surrounding/multiple spaces are ignored."""
    key = " ".join(text.lower().split())
    if key not in _PARSE:
        raise UserError(
            f"caption {text!r} is outside the shapes grammar "
            f"(expected 'a <small|large> <{'|'.join(COLOURS)}> <{'|'.join(SHAPES)}> "
            f"<{'|'.join(POSITION_PHRASES.values())}>')"
        )
    return _PARSE[key]


def vocabulary() -> list[str]:
    """Every word of the grammar, in a fixed order."""
    words: list[str] = []
    for phrase in ["a", *SIZES, *COLOURS, *SHAPES, *POSITION_PHRASES.values()]:
        for word in phrase.split():
            if word not in words:
                words.append(word)
    return words


# -------------------------------------------------------------------------------------------------- splits


def _make_splits(seed: int = 0) -> dict[str, tuple[Scene, ...]]:
    """Seeded shuffle of the 180 scenes, re-drawn until val and test each cover every attribute value."""
    scenes = all_scenes()
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(scenes))
        test = tuple(scenes[i] for i in sorted(order[:36]))
        val = tuple(scenes[i] for i in sorted(order[36:54]))
        train = tuple(scenes[i] for i in sorted(order[54:]))
        if all(_covers(split) for split in (train, val, test)):
            return {"train": train, "val": val, "test": test}


def _covers(scenes: tuple[Scene, ...]) -> bool:
    return (
        {s.colour for s in scenes} == set(COLOURS)
        and {s.shape for s in scenes} == set(SHAPES)
        and {s.position for s in scenes} == set(POSITIONS)
        and {s.size for s in scenes} == set(SIZES)
    )


SPLITS: dict[str, tuple[Scene, ...]] = _make_splits()


def prompts(split: str) -> list[str]:
    """Captions of one split ("train", "val" or "test"), in a fixed order."""
    if split not in SPLITS:
        raise UserError(f"split {split!r} is unknown (accepted: {', '.join(SPLITS)})")
    return [caption(scene) for scene in SPLITS[split]]


# -------------------------------------------------------------------------------------------------- render

_SUB = (np.arange(SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sub-pixel centre coordinates
_X, _Y = np.meshgrid(_SUB, _SUB)  # (64, 64) each; y grows downwards


def _coverage(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    """Share of each pixel covered by the shape, (16, 16) in [0, 1]."""
    dx, dy = _X - cx, _Y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # upright isosceles triangle filling half of its 2·half × 2·half bounding box
        inside = (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    blocks = inside.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE)
    return blocks.mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One antialiased image of the scene, uint8 (16, 16, 3), its centre jittered by up to ±1 px."""
    cx, cy = POSITIONS[scene.position]
    jx, jy = rng.uniform(-JITTER, JITTER, size=2)
    cover = _coverage(scene.shape, cx + jx, cy + jy, SIZES[scene.size])  # (16, 16)
    image = cover[:, :, None] * np.asarray(COLOURS[scene.colour])[None, None, :]  # (16, 16, 3)
    return np.round(image * 255).astype(np.uint8)


def pretraining_captions(
    n: int,
    rng: np.random.Generator,
    *,
    wrong_colour_share: float = 0.3,
    splits: tuple[str, ...] = ("train", "val"),
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The base model's training data: ``n`` renders of scenes from ``splits`` and their captions.

    Exactly ``round(wrong_colour_share · n)`` of the captions name a colour other than the rendered one (drawn
    uniformly among the colours whose caption also belongs to ``splits``, so no test caption is ever seen): the
    known, dispreferred mode the base model inherits.

    Returns images uint8 (n, 16, 16, 3), captions, and a bool (n,) marking the wrong-colour captions.
    """
    if not 0.0 <= wrong_colour_share <= 1.0:
        raise UserError(f"wrong_colour_share must be in [0, 1], got {wrong_colour_share}")
    pool = [scene for split in splits for scene in SPLITS[split]]
    allowed = set(pool)
    picks = rng.integers(len(pool), size=n)
    wrong = np.zeros(n, dtype=bool)
    wrong[rng.permutation(n)[: round(wrong_colour_share * n)]] = True
    names = list(COLOURS)
    images, captions = [], []
    for i, pick in enumerate(picks):
        scene = pool[pick]
        images.append(render(scene, rng))
        named = scene
        if wrong[i]:
            others = [
                c
                for c in names
                if c != scene.colour and Scene(c, scene.shape, scene.position, scene.size) in allowed
            ]
            named = Scene(others[rng.integers(len(others))], scene.shape, scene.position, scene.size)
        captions.append(caption(named))
    return np.stack(images), captions, wrong
