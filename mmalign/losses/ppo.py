"""The PPO clipped surrogate on per-transition log-probabilities, as DDPO and B²-DiffuRL train denoisers.

Each denoising step x_t → x_{t−1} is an action whose log-probability under the sampling policy was stored
with the trajectory (:mod:`mmalign.rl.samplers`); the loss compares it with the log-probability under the
current policy and weighs the ratio by the trajectory's advantage (a z-scored reward,
:mod:`mmalign.rl.advantages`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PPOLoss:
    """Per-sample PPO loss.

    Attributes:
        loss: (B,) per-sample loss, not reduced; the caller averages it.
        ratio: (B,) importance ratio exp(log p_θ − log p_old), detached.
        clipped: (B,) bool, |ratio − 1| > ε (their mean is DDPO's logged "clipfrac"), detached.
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor


def ppo_clip(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    advantage_clip: float,
) -> PPOLoss:
    """PPO clipped loss per sample, max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)).

    Schulman et al., arXiv 1707.06347, Eq. 7 (negated, to be minimised), applied per denoising step by DDPO
    (Black et al., arXiv 2305.13301) and B²-DiffuRL (Hu et al., arXiv 2503.11240). ρ = exp(log_prob −
    old_log_prob), A = clamp(advantage, −c, c); the old log-probability and the advantage are constants. Where
    the clip is active (ρ > 1 + ε with A > 0, or ρ < 1 − ε with A < 0) the loss is the constant clipped term
    and its gradient is 0. At ρ = 1 (the first inner step after sampling) the loss is −A, so its mean is
    −mean(A). Published values: DDPO ε = 1e-4, c = 10; B²-DiffuRL ε = 0.1, c = 5. The log-probabilities are
    means over latent dimensions, which is what those ε were tuned for.

    Args:
        log_prob: (B,) log p_θ(x_{t−1} | x_t) under the current policy.
        old_log_prob: (B,) the same under the policy that sampled the trajectory.
        advantages: (B,) advantages (z-scored rewards).
        clip_range: ε > 0.
        advantage_clip: c > 0.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if advantage_clip <= 0:
        raise ValueError(f"advantage_clip must be > 0, got {advantage_clip}")
    advantage = advantages.detach().float().clamp(-advantage_clip, advantage_clip)  # (B,)
    ratio = torch.exp(log_prob.float() - old_log_prob.detach().float())  # (B,)
    unclipped = -advantage * ratio  # (B,)
    clipped = -advantage * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)  # (B,)
    return PPOLoss(
        loss=torch.maximum(unclipped, clipped),
        ratio=ratio.detach(),
        clipped=((ratio.detach() - 1.0).abs() > clip_range),
    )
