"""What every reward model offers, and the batching, gradient and video handling they share.

A reward model scores media against prompts:

    reward(media (B, 3, H, W) or (B, 3, F, H, W) in [0, 1], prompts: list[str]) -> (B,) or (B, D)

``dimensions`` names the D columns (one name for a scalar reward, which returns (B,)). A video is scored frame
by frame with its prompt and the frame scores are averaged, so an image reward model scores videos unchanged.
Scoring runs in chunks of ``batch_size`` under ``torch.no_grad()``; a model built with ``differentiable=True``
keeps the graph, so a guidance or reward-backpropagation recipe gets gradients with respect to the media.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from mmalign.errors import UserError

__all__ = ["RewardModel", "require_files", "score_media"]


class RewardModel(Protocol):
    """``reward(media, prompts) -> (B,) or (B, D)``; see the module docstring."""

    dimensions: tuple[str, ...]
    differentiable: bool

    def __call__(self, media: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


def score_media(
    score_images: Callable[[torch.Tensor, list[str]], torch.Tensor],
    media: torch.Tensor,
    prompts: list[str],
    *,
    batch_size: int,
    differentiable: bool,
) -> torch.Tensor:
    """Score ``media`` with ``score_images`` ((N, 3, H, W), N prompts -> (N,) or (N, D)) in chunks of ``batch_size``.

    Videos (B, 3, F, H, W) are flattened to B·F frames, each frame paired with its video's prompt, and the frame
    scores averaged over F. The result is float32 on ``media``'s device.
    """
    if media.ndim not in (4, 5) or media.shape[1] != 3:
        raise ValueError(f"reward media must be (B, 3, H, W) or (B, 3, F, H, W), got {tuple(media.shape)}")
    if len(prompts) != media.shape[0]:
        raise ValueError(f"reward got {media.shape[0]} media and {len(prompts)} prompts")
    batch, frames = media.shape[0], 1
    images = media  # (B, 3, H, W)
    if media.ndim == 5:
        frames = media.shape[2]
        images = media.transpose(1, 2).flatten(0, 1)  # (B·F, 3, H, W), frames of one video adjacent
        prompts = [prompt for prompt in prompts for _ in range(frames)]
    grad = contextlib.nullcontext() if differentiable else torch.no_grad()
    with grad:
        chunks = [
            score_images(images[start : start + batch_size], prompts[start : start + batch_size])
            for start in range(0, images.shape[0], batch_size)
        ]
        scores = torch.cat(chunks).float()  # (B·F,) or (B·F, D)
        scores = scores.unflatten(0, (batch, frames)).mean(dim=1)  # (B,) or (B, D)
    return scores.to(media.device)


def require_files(path: str, files: Sequence[tuple[str, ...]], needs: str) -> None:
    """Raise a ``UserError`` unless the folder ``path`` holds, for each group of ``files``, one of its names.

    ``needs`` describes the whole folder for the message, e.g. "a transformers CLIP folder needs config.json, …".
    """
    if not os.path.isdir(path):
        what = "is not a folder" if os.path.exists(path) else "does not exist"
        raise UserError(f"reward path {path} {what} ({needs})")
    for names in files:
        if not any(os.path.isfile(os.path.join(path, name)) for name in names):
            raise UserError(f"reward path {path} has no {' or '.join(names)} ({needs})")
