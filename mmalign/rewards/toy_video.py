"""Programmatic reward of the toy moving-shapes world: parse the caption, measure the clip.

    reward = 0.3 · colour + 0.2 · shape + 0.5 · motion        ∈ [0, 1]

Each frame is measured as the still-image reward measures an image (``mmalign.rewards.toy``): foreground = pixels
whose brightest channel exceeds ``toy.FOREGROUND`` (0.4); a frame with fewer than ``MIN_FOREGROUND_PIXELS`` is blank.

- colour: share of foreground pixels, over all frames, whose chromaticity is nearest the captioned colour.
- shape: per frame exp(−((f − f*) / 0.12)²), f = foreground pixels / bounding-box area, f* the mean fill of
  jittered renders of the captioned shape; averaged over all frames, a blank frame scoring 0.
- motion: d = displacement of the foreground centroid over the clip, estimated as the least-squares slope of
  centroid against frame index (over the non-blank frames) times (F − 1), so every frame counts and one noisy
  frame cannot flip the sign. With u the captioned unit direction, along = d·u and across = |d × u|:
  motion = sigmoid((along − 2) / 1) · exp(−(across / 3)²). A true clip (along ≈ 6 px) scores ≈ 0.98, a static one
  ≈ 0.12, a reversed one (along ≈ −6 px) ≈ 0. Fewer than two non-blank frames score 0.

Weighted 0.5 on motion so that the world's targeted mistake — moving the wrong way — costs real reward: a
perfect shape in the right colour moving backwards scores at most 0.5. A blank clip scores 0. Distances are in
pixels, calibrated for the 16×16 canvas; any H, W and F ≥ 2 are measured the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from mmalign.errors import UserError
from mmalign.rewards.toy import FILL_SCALE, MIN_FOREGROUND_PIXELS, _measure
from mmalign.toy import moving

WEIGHTS = {"colour": 0.3, "shape": 0.2, "motion": 0.5}
ALONG_OFFSET = 2.0  # pixels of displacement along the caption at which motion scores 0.5
ALONG_SCALE = 1.0  # pixels
ACROSS_SCALE = 3.0  # pixels
_CALIBRATION_RENDERS = 64
_COLOUR_INDEX = {name: i for i, name in enumerate(moving.COLOURS)}


class MovingShapesReward:
    """``reward(videos (B, 3, F, H, W) in [0, 1], prompts) -> (B,)`` in [0, 1]; prompts follow the grammar."""

    def __init__(self) -> None:
        self.target_fill = _calibrate()

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.components(videos, prompts)["reward"]

    def components(self, videos: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Every term of the reward, each (B,), plus the weighted ``reward``."""
        scenes = [moving.parse_caption(p) for p in prompts]
        m = _measure_clips(videos, len(prompts))
        colour_idx = torch.tensor([_COLOUR_INDEX[s.colour] for s in scenes])  # (B,)
        fill = torch.tensor([self.target_fill[s.shape] for s in scenes])  # (B,)
        along, across = _along_across(m, scenes)  # (B,) each

        fg_count = m["fg"].sum(dim=(1, 2, 3)).clamp(min=1)  # (B,)
        agree = (m["fg"] & (m["nearest"] == colour_idx[:, None, None, None])).sum(dim=(1, 2, 3))  # (B,)
        fill_error = (m["fill"] - fill[:, None]) / FILL_SCALE  # (B, F)
        shape_per_frame = torch.exp(-(fill_error**2)) * m["present"]  # (B, F), blank frames score 0
        forward = torch.sigmoid((along - ALONG_OFFSET) / ALONG_SCALE)  # (B,)
        straight = torch.exp(-((across / ACROSS_SCALE) ** 2))  # (B,)
        terms = {
            "colour": agree / fg_count,
            "shape": shape_per_frame.mean(dim=1),
            "motion": forward * straight * (m["present"].sum(dim=1) >= 2),
        }
        terms["reward"] = sum(WEIGHTS[name] * terms[name] for name in WEIGHTS)
        return terms

    def mistake(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The targeted mistake, (B,) bool: the clip does not move the captioned way (along ≤ 0), or its first or
        last frame is blank (no motion can be read)."""
        scenes = [moving.parse_caption(p) for p in prompts]
        m = _measure_clips(videos, len(prompts))
        along, _ = _along_across(m, scenes)  # (B,)
        ends_present = m["present"][:, 0].bool() & m["present"][:, -1].bool()  # (B,)
        return (along <= 0) | ~ends_present


def _measure_clips(videos: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """The still-image measurements of every frame, regrouped per clip: fg/nearest (B, F, H, W), rest (B, F, ...)."""
    if videos.ndim != 5 or videos.shape[1] != 3 or videos.shape[2] < 2 or videos.shape[0] != batch:
        raise UserError(
            f"videos must have shape (B, 3, F, H, W) with F >= 2 and B = {batch} prompts, "
            f"got {tuple(videos.shape)}"
        )
    b, _, f, h, w = videos.shape
    frames = videos.permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)  # (B·F, 3, H, W)
    m = {name: value.reshape(b, f, *value.shape[1:]) for name, value in _measure(frames).items()}
    m["present"] = (m["count"] >= MIN_FOREGROUND_PIXELS).float()  # (B, F)
    return m


def _displacement(m: dict[str, torch.Tensor]) -> torch.Tensor:
    """Least-squares centroid velocity over the non-blank frames × (F − 1), (B, 2); 0 under two such frames."""
    weight = m["present"]  # (B, F)
    frames = weight.shape[1]
    t = torch.arange(frames, dtype=torch.float32)[None, :]  # (1, F)
    total = weight.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    t_mean = (weight * t).sum(dim=1, keepdim=True) / total  # (B, 1)
    c_mean = (weight[..., None] * m["centroid"]).sum(dim=1, keepdim=True) / total[..., None]  # (B, 1, 2)
    dt = (t - t_mean) * weight  # (B, F)
    covariance = (dt[..., None] * (m["centroid"] - c_mean)).sum(dim=1)  # (B, 2)
    variance = (dt * (t - t_mean)).sum(dim=1, keepdim=True)  # (B, 1)
    slope = torch.where(variance > 0, covariance / variance.clamp(min=1e-6), torch.zeros_like(covariance))
    return slope * (frames - 1)  # (B, 2)


def _along_across(
    m: dict[str, torch.Tensor], scenes: list[moving.Scene]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Displacement projected on the captioned unit direction u: (d·u, |d × u|), each (B,)."""
    d = _displacement(m)  # (B, 2)
    u = torch.tensor([moving.DIRECTIONS[s.direction] for s in scenes])  # (B, 2)
    along = (d * u).sum(dim=1)
    across = (d[:, 0] * u[:, 1] - d[:, 1] * u[:, 0]).abs()
    return along, across


def _calibrate() -> dict[str, float]:
    """Mean per-frame bounding-box fill per shape, measured on jittered renders of every direction."""
    rng = np.random.default_rng(0)
    fill = {}
    for shape in moving.SHAPES:
        scenes = [moving.Scene("red", shape, d) for d in moving.DIRECTIONS]
        clips = np.stack(
            [moving.render(scenes[i % len(scenes)], rng) for i in range(_CALIBRATION_RENDERS)]
        )  # (N, F, 16, 16, 3)
        m = _measure_clips(moving.clips_to_tensor(clips), len(clips))
        fill[shape] = m["fill"].mean().item()
    return fill
