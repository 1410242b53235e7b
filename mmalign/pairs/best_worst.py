"""Best-vs-worst-of-N pairs: sample N images per prompt, score them, prefer the best over the worst.

This is the on-policy pair construction of Flow-DPO's online variant (Liu et al., arXiv 2501.13918, Sec. 4)
and of the toy world's offline data; pair quality (the reward gap) dominates what DPO can learn.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from mmalign.adapters import diffusion


def best_and_worst(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, N) rewards → index of the best and of the worst sample per group, and whether they differ."""
    best = rewards.argmax(dim=1)  # (G,)
    worst = rewards.argmin(dim=1)  # (G,)
    distinct = rewards.max(dim=1).values > rewards.min(dim=1).values  # (G,)
    return best, worst, distinct


def png_bytes(image: torch.Tensor) -> bytes:
    """(3, H, W) in [0, 1] → lossless PNG bytes (JPEG would shift the colours of a 16-pixel image)."""
    pixels = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_best_worst_pairs(
    components: diffusion.Components,
    prompts: list[str],
    reward,
    *,
    samples_per_group: int,
    groups_per_prompt: int,
    first_seed: int,
    steps: int,
    guidance_scale: float,
    batch_size: int = 128,
    seed: int = 0,
) -> list[tuple[str, bytes, bytes, float]]:
    """Pick-a-Pic style rows (caption, jpg_0, jpg_1, label_0) of best-vs-worst pairs.

    Which column holds the winner is a seeded coin flip, as in Pick-a-Pic, so readers must honour label_0.
    """
    n = samples_per_group
    repeated = [p for p in prompts for _ in range(groups_per_prompt * n)]
    seeds = [first_seed + i for i in range(len(repeated))]
    images = diffusion.sample(
        components, repeated, seeds, steps=steps, guidance_scale=guidance_scale, batch_size=batch_size
    )
    scores = reward(images, repeated).float().reshape(-1, n)  # (G, N)
    images = images.reshape(-1, n, *images.shape[1:])  # (G, N, 3, H, W)
    best, worst, distinct = best_and_worst(scores)
    coin = np.random.default_rng(seed).random(len(best)) < 0.5
    rows = []
    for g in range(len(best)):
        if not distinct[g]:
            continue
        caption = repeated[g * n]
        winner, loser = png_bytes(images[g, best[g]]), png_bytes(images[g, worst[g]])
        rows.append((caption, winner, loser, 1.0) if coin[g] else (caption, loser, winner, 0.0))
    return rows
