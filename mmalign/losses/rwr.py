"""Regression on the denoising / velocity error: reward-weighted (Flow-RWR), or unweighted (SFT)."""

from __future__ import annotations

import torch


def rwr_weights(rewards: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Batch-normalised exponential reward weights, w = B·softmax(r/τ), detached. Shape (B,).

    Flow-RWR (Liu et al., arXiv 2501.13918) weights each sample's regression loss by exp(r). The paper leaves
    the scale of exp(r) unnormalised; normalising over the batch keeps the mean weight at 1 (Σ w = B), so the
    loss stays on the scale of the plain regression loss whatever the reward's offset, and τ sets how sharply
    the best samples dominate (τ → ∞ gives uniform weights, plain fine-tuning). Weights are constants: no
    gradient flows into the reward.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rewards = rewards.detach().float()  # (B,)
    return torch.softmax(rewards / temperature, dim=0) * rewards.shape[0]


def rwr(policy_errors: torch.Tensor, rewards: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Flow-RWR loss per sample, w(r)·e with w from :func:`rwr_weights`. Shape (B,), not reduced.

    Liu et al., arXiv 2501.13918: E[w(r)·‖v − v_θ(x_t, t, y)‖²]. Takes the per-sample mean squared errors e
    (not the scores s = −½·e) of the policy; no reference model is involved.
    """
    weights = rwr_weights(rewards, temperature=temperature)  # (B,)
    return weights * policy_errors.float()


def sft(policy_chosen_errors: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning loss per sample: the policy's error e on the chosen member. Shape (B,), fp32.

    The plain denoising (or velocity) regression of the model's own pretraining, with neither reference nor
    rejected member: :func:`rwr` with uniform weights (τ → ∞). The preference recipe's baseline, and with
    ``data.labels: random`` its no-label control.
    """
    return policy_chosen_errors.float()
