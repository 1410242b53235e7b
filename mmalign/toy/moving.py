"""The toy "moving shapes" world: 4-frame 16×16 RGB clips of one coloured shape moving in a straight line.

6 colours × 3 shapes × 4 directions = 72 scenes, one size (half-side 3 px). Captions read "a red circle moving
right". The colours and shapes are those of the still-image world (``mmalign.toy.shapes``), so the two worlds
share a palette and a renderer. The 72 scenes are split once, deterministically, into 48 train / 8 val / 16 test
combinations, each split covering every colour, shape and direction; test captions are never seen in
pretraining or preference training, val captions only select checkpoints.

The pretraining data (``pretraining_clips``) gives a fixed share of captions a clip moving the OPPOSITE way: the
base model inherits that mistake, and preferences can later remove it. Only the motion is wrong, never the
words, so the caption vocabulary is that of the grammar.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import torch

from mmalign.errors import UserError
from mmalign.toy.shapes import COLOURS, SHAPES, SIZE, _coverage

FRAMES = 4  # frames per clip
STEP = 2.0  # pixels the shape moves per frame, so (FRAMES − 1) · STEP = 6 px from first to last frame
HALF = 3.0  # half the side of the shape's bounding box (one size only)
JITTER = 1.5  # ± pixels of uniform jitter of the whole path, on both axes, per render
CENTRE = (SIZE / 2, SIZE / 2)  # the path is centred here along the motion axis
# unit motion vector (x, y) per direction, in pixel coordinates with y growing downwards
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    direction: str


def all_scenes() -> list[Scene]:
    """The 72 scenes in a fixed order (colour, shape, direction)."""
    return [Scene(*combo) for combo in itertools.product(COLOURS, SHAPES, DIRECTIONS)]


# ------------------------------------------------------------------------------------------------- grammar


def caption(scene: Scene) -> str:
    return f"a {scene.colour} {scene.shape} moving {scene.direction}"


_PARSE = {caption(scene): scene for scene in all_scenes()}


def parse_caption(text: str) -> Scene:
    """Inverse of ``caption``; case and surrounding/multiple spaces are ignored."""
    key = " ".join(text.lower().split())
    if key not in _PARSE:
        raise UserError(
            f"caption {text!r} is outside the moving-shapes grammar "
            f"(expected 'a <{'|'.join(COLOURS)}> <{'|'.join(SHAPES)}> moving <{'|'.join(DIRECTIONS)}>')"
        )
    return _PARSE[key]


def vocabulary() -> list[str]:
    """Every word of the grammar, in a fixed order."""
    return ["a", *COLOURS, *SHAPES, "moving", *DIRECTIONS]


# -------------------------------------------------------------------------------------------------- splits


def _make_splits(seed: int = 0) -> dict[str, tuple[Scene, ...]]:
    """Seeded shuffle of the 72 scenes, re-drawn until every split covers every attribute value."""
    scenes = all_scenes()
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(scenes))
        test = tuple(scenes[i] for i in sorted(order[:16]))
        val = tuple(scenes[i] for i in sorted(order[16:24]))
        train = tuple(scenes[i] for i in sorted(order[24:]))
        if all(_covers(split) for split in (train, val, test)):
            return {"train": train, "val": val, "test": test}


def _covers(scenes: tuple[Scene, ...]) -> bool:
    return (
        {s.colour for s in scenes} == set(COLOURS)
        and {s.shape for s in scenes} == set(SHAPES)
        and {s.direction for s in scenes} == set(DIRECTIONS)
    )


SPLITS: dict[str, tuple[Scene, ...]] = _make_splits()


def prompts(split: str) -> list[str]:
    """Captions of one split ("train", "val" or "test"), in a fixed order."""
    return [caption(scene) for scene in _split(split)]


def _split(split: str) -> tuple[Scene, ...]:
    if split not in SPLITS:
        raise UserError(f"split {split!r} is unknown (accepted: {', '.join(SPLITS)})")
    return SPLITS[split]


# -------------------------------------------------------------------------------------------------- render


def path(direction: str, jitter: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Shape centre (x, y) per frame, (F, 2): STEP px per frame, centred on CENTRE, shifted by ``jitter``."""
    offsets = STEP * (np.arange(FRAMES) - (FRAMES - 1) / 2)  # (F,) e.g. −3, −1, 1, 3
    unit = np.asarray(DIRECTIONS[direction])  # (2,)
    return np.asarray(CENTRE) + np.asarray(jitter) + offsets[:, None] * unit[None, :]  # (F, 2)


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One antialiased clip of the scene, uint8 (F, 16, 16, 3), its whole path jittered by up to ±1.5 px."""
    jitter = rng.uniform(-JITTER, JITTER, size=2)
    colour = np.asarray(COLOURS[scene.colour])  # (3,)
    frames = [_coverage(scene.shape, cx, cy, HALF) for cx, cy in path(scene.direction, jitter)]
    clip = np.stack(frames)[..., None] * colour  # (F, 16, 16, 3)
    return np.round(clip * 255).astype(np.uint8)


def pretraining_clips(
    n: int,
    rng: np.random.Generator,
    *,
    wrong_direction_share: float = 0.3,
    splits: tuple[str, ...] = ("train", "val"),
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The base model's training data: ``n`` clips of scenes from ``splits`` and their captions.

    Exactly ``round(wrong_direction_share · n)`` of the clips move OPPOSITE to their caption ("moving right"
    captions a clip moving left): the known, dispreferred mode the base model inherits. The caption is always
    that of a scene in ``splits``, so no test caption is ever seen; only the rendered motion is reversed.

    Returns clips uint8 (n, F, 16, 16, 3), captions, and a bool (n,) marking the reversed clips.
    """
    if not 0.0 <= wrong_direction_share <= 1.0:
        raise UserError(f"wrong_direction_share must be in [0, 1], got {wrong_direction_share}")
    pool = [scene for split in splits for scene in _split(split)]
    picks = rng.integers(len(pool), size=n)
    wrong = np.zeros(n, dtype=bool)
    wrong[rng.permutation(n)[: round(wrong_direction_share * n)]] = True
    clips, captions = [], []
    for i, pick in enumerate(picks):
        scene = pool[pick]
        shown = replace(scene, direction=OPPOSITE[scene.direction]) if wrong[i] else scene
        clips.append(render(shown, rng))
        captions.append(caption(scene))
    return np.stack(clips), captions, wrong


def clips_to_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 clips (n, F, H, W, 3) → float video batch (n, 3, F, H, W) in [0, 1], the layout models consume."""
    if clips.ndim != 5 or clips.shape[-1] != 3:
        raise UserError(f"clips must have shape (n, F, H, W, 3), got {tuple(clips.shape)}")
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 255  # (n, 3, F, H, W)
