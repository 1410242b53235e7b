"""Backward progressive training: how many of the last denoising steps a stage trains.

B²-DiffuRL (Hu et al., "Towards Better Alignment: Training Diffusion Models with Reinforcement Learning
Against Sparse Rewards", CVPR 2025, arXiv 2503.11240) trains, at stage i of S, only the last split_step(i)
denoising steps, growing the trained span from the end of the trajectory (closest to the image) backwards.
Trajectories share their prefix up to step T − split_step(i) and fork into branches there. The reference run
uses S = 100 stages of a 20-step DDIM schedule with left = 14, right = 20.
"""

from __future__ import annotations

from mmalign.errors import UserError


def split_step(stage: int, *, left: int, right: int, stages: int) -> int:
    """The number of final denoising steps trained at ``stage``: left + floor(stage·(right − left + 1)/stages).

    The span grows in right − left + 1 equal blocks of stages, from ``left`` at stage 0 to ``right`` in the
    last block. Reference run (left 14, right 20, 100 stages): stage 0 → 14, 14 → 14, 15 → 15, 57 → 17,
    85 → 19, 86 → 20, 99 → 20.

    Args:
        stage: 0 ≤ stage < stages.
        left: the span at stage 0, ≥ 1.
        right: the final span, ≥ left (at most the number of denoising steps, which the caller checks).
        stages: S ≥ 1.
    """
    if stages < 1:
        raise UserError(f"stages must be >= 1, got {stages}")
    if not 0 <= stage < stages:
        raise UserError(f"stage must be in [0, {stages}) for stages={stages}, got {stage}")
    if left < 1:
        raise UserError(f"left must be >= 1 (the steps trained at stage 0), got {left}")
    if right < left:
        raise UserError(f"right must be >= left={left}, got {right}")
    return left + stage * (right - left + 1) // stages
