"""Unpaired Kahneman–Tversky loss (KTO, Diffusion-KTO) on per-sample scores.

Each sample is desirable or undesirable on its own; no pairs. r = s_θ − s_ref is the implicit reward and z
a reference point (an estimate of KL(π_θ ‖ π_ref)) that is treated as a constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class KTOLoss:
    """Per-sample KTO loss.

    Attributes:
        loss: (B,) per-sample loss, not reduced; the caller averages it.
        rewards: (B,) implicit rewards r = s_θ − s_ref, detached.
        reference_point: () the reference point z that was used, detached.
    """

    loss: torch.Tensor
    rewards: torch.Tensor
    reference_point: torch.Tensor


def _reference_point(rewards: torch.Tensor) -> torch.Tensor:
    """z = max(0, mean of r over the batch and over all ranks), detached. Shape ()."""
    z = rewards.detach().float().mean()  # ()
    if dist.is_available() and dist.is_initialized():
        # Every rank must reach this call, or the all-reduce hangs.
        dist.all_reduce(z, op=dist.ReduceOp.SUM)
        z = z / dist.get_world_size()
    return z.clamp(min=0.0)


def mismatched_reference_point(policy_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """Reference point from mismatched pairs: z = max(0, mean(s_θ − s_ref)), averaged over ranks, detached.

    The scores are of (prompt, sample) pairs whose prompts are rolled by one within the batch, so that
    the mean log-ratio estimates KL(π_θ ‖ π_ref) on samples the prompt did not produce (KTO, Ethayarajh et
    al., arXiv 2402.01306, Sec. 4; the mismatched-prompt variant of Diffusion-KTO, arXiv 2404.04465). Making
    the mismatched batch (the roll) is the caller's job; this function only reduces it. Shape ().
    """
    return _reference_point(policy_mismatched.float() - ref_mismatched.float())


def kto(
    policy_scores: torch.Tensor,
    ref_scores: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reference_point: torch.Tensor | None = None,
) -> KTOLoss:
    """KTO loss, λ_y·(1 − σ(sign_y·β·(r − z))), sign_y = +1 desirable, −1 undesirable.

    Ethayarajh et al., arXiv 2402.01306, Eq. 8 (λ_y minus the value function), applied to diffusion by
    Diffusion-KTO (Li et al., arXiv 2404.04465). r = s_θ − s_ref. If ``reference_point`` is None, z is the
    batch mean of r, averaged across ranks when torch.distributed is initialised, clamped at ≥ 0 and detached
    (Diffusion-KTO's choice); otherwise the given z is used, detached (e.g. from
    :func:`mismatched_reference_point`). At policy = reference (r = z = 0) the loss is λ_y/2.

    Scale of β: Diffusion-KTO writes its implicit reward with errors, g = e_ref − e_θ, while our diffusion
    score is s = −½·e, so g = 2·r and a paper reference point z_paper = 2·z. The same loss therefore needs
    β = 2·β_paper here: Diffusion-KTO's β = 1000 for SD 1.5 is β = 2000 in this library. (For LVLMs, r is the
    sequence log-ratio as in KTO and β carries over unchanged.) The paper does not say how to weight
    λ_D/λ_U for imbalanced data; KTO suggests λ_D·n_D/(λ_U·n_U) in [1, 4/3].

    Args:
        policy_scores, ref_scores: (B,) scores.
        desirable: (B,) bool, True for desirable samples.
        beta: inverse temperature β > 0.
        desirable_weight, undesirable_weight: λ_D, λ_U.
        reference_point: optional scalar z, on the scale of r.
    """
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got dtype {desirable.dtype}")
    rewards = policy_scores.float() - ref_scores.float()  # (B,)
    if reference_point is None:
        z = _reference_point(rewards)
    else:
        z = reference_point.detach().float()
    sign = desirable.float() * 2.0 - 1.0  # (B,) +1 / −1
    weight = torch.where(desirable, desirable_weight, undesirable_weight).float()  # (B,)
    loss = weight * (1.0 - torch.sigmoid(sign * beta * (rewards - z)))  # (B,)
    return KTOLoss(loss=loss, rewards=rewards.detach(), reference_point=z)
