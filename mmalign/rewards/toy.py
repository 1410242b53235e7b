"""Programmatic reward of the toy shapes world: parse the caption, measure the image.

    reward = 0.4 · colour + 0.2 · position + 0.2 · shape + 0.2 · size        ∈ [0, 1]

Foreground = pixels whose brightest channel exceeds ``FOREGROUND``. Each term is continuous in what it measures:

- colour: share of foreground pixels whose chromaticity (pixel / its brightest channel) is nearest the captioned
  colour among the six palette colours. Weighted 0.4 so that the world's targeted mistake — the wrong colour —
  costs real reward (a perfect shape in the wrong colour scores at most 0.6).
- position: exp(−(d / 2.5)²), d = distance in pixels from the foreground centroid to the captioned location
  (shifted by the shape's mean centroid offset on renders: a triangle's centroid sits below its box centre).
- shape: exp(−((f − f*) / 0.12)²), f = foreground pixels / bounding-box area (circle ≈ π/4, square ≈ 1,
  triangle ≈ 1/2); f* is the mean over jittered renders of the captioned shape and size.
- size: exp(−((e − e*) / 1.5)²), e = longer side of the foreground bounding box (small ≈ 4 px, large ≈ 7 px);
  e* likewise calibrated on renders.

A blank image scores 0. Renders of the captioned scene score ≈ 0.9; the same scene in a wrong colour ≈ 0.5.
No model is involved, so nothing under training can game the reward by reading its own internals.
"""

from __future__ import annotations

import numpy as np
import torch

from mmalign.toy import shapes

WEIGHTS = {"colour": 0.4, "position": 0.2, "shape": 0.2, "size": 0.2}
FOREGROUND = 0.4  # brightest-channel threshold in [0, 1]
POSITION_SCALE = 2.5  # pixels
FILL_SCALE = 0.12
EXTENT_SCALE = 1.5  # pixels
MIN_FOREGROUND_PIXELS = 3  # fewer counts as blank
_CALIBRATION_RENDERS = 64

_PALETTE = torch.tensor(list(shapes.COLOURS.values()))  # (6, 3)
_COLOUR_INDEX = {name: i for i, name in enumerate(shapes.COLOURS)}


class ShapesReward:
    """``reward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)`` in [0, 1]; prompts must follow the grammar."""

    def __init__(self) -> None:
        self.target_fill, self.target_extent, self.centroid_offset = _calibrate()

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.components(images, prompts)["reward"]

    def components(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Every term of the reward, each (B,), plus the weighted ``reward``."""
        scenes = [shapes.parse_caption(p) for p in prompts]
        m = _measure(images)
        colour_idx = torch.tensor([_COLOUR_INDEX[s.colour] for s in scenes])  # (B,)
        centre = torch.tensor([shapes.POSITIONS[s.position] for s in scenes])  # (B, 2)
        centre = centre + torch.tensor([self.centroid_offset[(s.shape, s.size)] for s in scenes])
        fill = torch.tensor([self.target_fill[(s.shape, s.size)] for s in scenes])  # (B,)
        extent = torch.tensor([self.target_extent[s.size] for s in scenes])  # (B,)

        count = m["fg"].sum(dim=(1, 2)).clamp(min=1)  # (B,)
        agree = (m["fg"] & (m["nearest"] == colour_idx[:, None, None])).sum(dim=(1, 2))  # (B,)
        terms = {
            "colour": agree / count,
            "position": torch.exp(-(((m["centroid"] - centre).norm(dim=1) / POSITION_SCALE) ** 2)),
            "shape": torch.exp(-(((m["fill"] - fill) / FILL_SCALE) ** 2)),
            "size": torch.exp(-(((m["extent"] - extent) / EXTENT_SCALE) ** 2)),
        }
        present = (m["count"] >= MIN_FOREGROUND_PIXELS).float()  # (B,)
        terms = {name: value * present for name, value in terms.items()}
        terms["reward"] = sum(WEIGHTS[name] * terms[name] for name in WEIGHTS)
        return terms

    def mistake(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The targeted mistake, (B,) bool: the dominant foreground colour is not the captioned one, or no shape."""
        m = _measure(images)
        colour_idx = torch.tensor([_COLOUR_INDEX[shapes.parse_caption(p).colour] for p in prompts])  # (B,)
        votes = torch.stack(
            [(m["fg"] & (m["nearest"] == k)).sum(dim=(1, 2)) for k in range(len(_PALETTE))], dim=1
        )  # (B, 6)
        dominant = votes.argmax(dim=1)  # (B,)
        return (dominant != colour_idx) | (m["count"] < MIN_FOREGROUND_PIXELS)


def _measure(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Foreground mask, nearest palette colour per pixel, centroid, bounding-box fill and extent."""
    images = images.detach().float().cpu().clamp(0, 1)  # (B, 3, H, W)
    _, _, height, width = images.shape
    brightness = images.max(dim=1).values  # (B, H, W)
    fg = brightness > FOREGROUND  # (B, H, W)
    chroma = images / brightness.clamp(min=1e-6)[:, None]  # (B, 3, H, W)
    distances = ((chroma[:, None] - _PALETTE[None, :, :, None, None]) ** 2).sum(dim=2)  # (B, 6, H, W)
    nearest = distances.argmin(dim=1)  # (B, H, W)

    count = fg.sum(dim=(1, 2)).float()  # (B,)
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    cx = (fg.sum(dim=1) * xs).sum(dim=1) / count.clamp(min=1)  # (B,)
    cy = (fg.sum(dim=2) * ys).sum(dim=1) / count.clamp(min=1)  # (B,)
    box_w = _span(fg.any(dim=1))  # (B,)
    box_h = _span(fg.any(dim=2))  # (B,)
    fill = count / (box_w * box_h).clamp(min=1)
    return {
        "fg": fg,
        "nearest": nearest,
        "count": count,
        "centroid": torch.stack([cx, cy], dim=1),  # (B, 2)
        "fill": fill,
        "extent": torch.maximum(box_w, box_h),
    }


def _span(occupied: torch.Tensor) -> torch.Tensor:
    """(B, N) bool → number of cells from the first to the last occupied one, 0 when none (B,)."""
    index = torch.arange(occupied.shape[1])
    first = torch.where(occupied, index, occupied.shape[1]).min(dim=1).values
    last = torch.where(occupied, index, -1).max(dim=1).values
    return (last - first + 1).clamp(min=0).float()


def _calibrate() -> tuple[dict, dict, dict]:
    """Mean fill and centroid offset per (shape, size) and mean extent per size, measured on jittered renders."""
    rng = np.random.default_rng(0)
    fill, offset, extent_by_size = {}, {}, {size: [] for size in shapes.SIZES}
    for shape in shapes.SHAPES:
        for size in shapes.SIZES:
            scene = shapes.Scene("red", shape, "center", size)
            batch = np.stack(
                [shapes.render(scene, rng) for _ in range(_CALIBRATION_RENDERS)]
            )  # (N, 16, 16, 3)
            m = _measure(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255)
            fill[(shape, size)] = m["fill"].mean().item()
            offset[(shape, size)] = (
                m["centroid"].mean(dim=0) - torch.tensor(shapes.POSITIONS["center"])
            ).tolist()
            extent_by_size[size].append(m["extent"].mean().item())
    extent = {size: float(np.mean(values)) for size, values in extent_by_size.items()}
    return fill, extent, offset


SPARSE_THRESHOLDS = {"colour": 0.5, "position": 0.5, "shape": 0.5}


class SparseShapesReward:
    """The toy world's sparse reward: 1 when colour, shape and position all match the caption, else 0.

    ``reward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)`` in {0, 1}. A term "matches" when its
    :class:`ShapesReward` component reaches ``SPARSE_THRESHOLDS`` (0.5 each): most foreground pixels in the
    captioned colour, the centroid within 2.1 px of the captioned place (exp(−(d/2.5)²) ≥ 0.5), the fill
    within 0.1 of the captioned shape's. Size is not asked for. A sparse reward is what online RL with
    branching (B²-DiffuRL, arXiv 2503.11240) is built for: most samples score the same, and the signal lies
    in the few that differ.
    """

    def __init__(self) -> None:
        self.dense = ShapesReward()

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        terms = self.dense.components(images, prompts)
        match = torch.ones_like(terms["reward"], dtype=torch.bool)  # (B,)
        for name, threshold in SPARSE_THRESHOLDS.items():
            match &= terms[name] >= threshold
        return match.float()

    def mistake(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The toy world's targeted mistake (wrong dominant colour or no shape), as ``ShapesReward`` has it."""
        return self.dense.mistake(images, prompts)
