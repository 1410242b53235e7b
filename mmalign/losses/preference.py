"""Pairwise preference losses on per-sample scores: DPO and its relatives.

Every function takes four (B,) tensors of per-sample scores s — a log-likelihood surrogate: the summed
completion log-probability for a vision-language model, s = −½·e for diffusion and rectified flow, with e the
per-sample mean squared denoising (or velocity) error — and returns a :class:`PairLoss` whose ``loss`` is the
per-pair loss, NOT reduced. The caller takes the mean of ``loss``; a mean taken inside the log-sigmoid (a known
past bug elsewhere) optimises a different objective.

Notation used throughout: r_w = s_θ,w − s_ref,w, r_l = s_θ,l − s_ref,l, Δ = r_w − r_l.
All arithmetic is fp32, whatever the inputs' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairLoss:
    """Per-pair loss and implicit rewards of a pairwise preference loss.

    Attributes:
        loss: (B,) per-pair loss, not reduced; the caller averages it.
        chosen_rewards: (B,) β·(s_θ,w − s_ref,w), detached.
        rejected_rewards: (B,) β·(s_θ,l − s_ref,l), detached.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _log_ratios(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (r_w, r_l) in fp32, each (B,)."""
    chosen = policy_chosen.float() - ref_chosen.float()  # (B,)
    rejected = policy_rejected.float() - ref_rejected.float()  # (B,)
    return chosen, rejected


def _pair_loss(loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> PairLoss:
    return PairLoss(
        loss=loss,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
    )


def dpo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """Sigmoid DPO loss, −log σ(βΔ).

    Rafailov et al., arXiv 2305.18290, Eq. 7. For diffusion this is Diffusion-DPO (Wallace et al.,
    arXiv 2311.12908, Eq. 14): with s = −½·e, βΔ = −½·β·((e_θ,w − e_θ,l) − (e_ref,w − e_ref,l)), the exact
    argument of the official loss, so the published β (5000 for SD 1.5; 100 for Flow-DPO on SD 3.5-M,
    arXiv 2501.13918) carries over unchanged. At policy = reference the loss is ln 2.

    ``label_smoothing`` ε gives the conservative DPO loss (Mitchell, "A note on DPO with noisy preferences",
    2023, no arXiv id): (1 − ε)·(−log σ(βΔ)) + ε·(−log σ(−βΔ)), the cross-entropy against the soft label
    P(w ≻ l) = 1 − ε. With ε = 0.5 it is the loss for a tie pair (e.g. Pick-a-Pic label_0 = 0.5), minimised
    at Δ = 0. Neither paper says how to treat ties; the original Diffusion-DPO run drops them.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,) scores.
        beta: inverse temperature β > 0.
        label_smoothing: ε in [0, 0.5].
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    logits = beta * (chosen - rejected)  # (B,) βΔ
    loss = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return _pair_loss(loss, chosen, rejected, beta)


def ipo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
) -> PairLoss:
    """IPO loss, (Δ − 1/(2β))².

    Azar et al., arXiv 2310.12036, Eq. 17 (their τ is our β). The regression target 1/(2β) is on the scale of
    Δ itself, so the loss is not ln 2 at policy = reference but 1/(4β²). The paper states the loss for whole
    sequences; the common LVLM practice of dividing each sequence score by its completion length is the
    caller's job (score with the mean, not the sum, of token log-probs).
    """
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2  # (B,)
    return _pair_loss(loss, chosen, rejected, beta)


def hinge(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
) -> PairLoss:
    """Hinge (SLiC) loss, relu(1 − βΔ).

    Zhao et al., SLiC-HF, arXiv 2305.10425, rank-calibration loss max(0, δ − log P(y_w) + log P(y_l)).
    SLiC-HF compares raw policy log-likelihoods with margin δ and adds a separate regulariser towards the SFT
    targets; here the reference log-ratios stand in for that regulariser (as in DPO) and the margin is
    δ = 1/β, since relu(1 − βΔ) = β·relu(1/β − Δ). Pairs with βΔ ≥ 1 contribute zero loss and zero gradient.
    """
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = torch.relu(1.0 - beta * (chosen - rejected))  # (B,)
    return _pair_loss(loss, chosen, rejected, beta)


def robust(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    label_noise: float = 0.1,
) -> PairLoss:
    """Robust DPO (rDPO), [−(1 − ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε).

    Chowdhury et al., arXiv 2403.00409, Eq. 8: an unbiased estimate of the clean DPO loss when each label is
    flipped independently with probability ε. Since log σ(−x) = log σ(x) − x it equals −log σ(βΔ) − ε·βΔ/(1 − 2ε),
    so ε = 0 is plain DPO. The loss is unbounded below in Δ (the −εβΔ/(1−2ε) term), unlike DPO. The paper
    assumes ε is known; estimating it from the data is left open.

    Args:
        label_noise: flip rate ε in [0, 0.5); at 0.5 the labels carry no information and the loss divides by 0.
    """
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5), got {label_noise}")
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    logits = beta * (chosen - rejected)  # (B,) βΔ
    clean = -(1.0 - label_noise) * F.logsigmoid(logits)
    flipped = label_noise * F.logsigmoid(-logits)
    loss = (clean + flipped) / (1.0 - 2.0 * label_noise)  # (B,)
    return _pair_loss(loss, chosen, rejected, beta)


def bco_pair(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    delta: float = 0.0,
) -> PairLoss:
    """Binary-classifier (BCO) loss on a pair, −log σ(β·r_w − δ) − log σ(−(β·r_l − δ)).

    Jung et al., arXiv 2404.04656: chosen and rejected are two independent binary classifications of the
    implicit reward β·r against the shift δ. At policy = reference and δ = 0 the loss is 2·ln 2 (two terms).

    What the paper leaves open, and who owns it here: δ is the running mean of the implicit rewards β·r of
    both chosen and rejected samples, but the paper fixes neither the averaging window or decay, nor whether
    the mean is synchronised across ranks, nor its value at step 0. The caller keeps that running mean and
    passes it (detached, on the β-scaled reward scale) as ``delta``; 0 is the value before any step. The
    preference recipe's choices: ``mmalign.recipes.preference.RewardShift``.
    """
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen_logits = beta * chosen - delta  # (B,)
    rejected_logits = beta * rejected - delta  # (B,)
    loss = -F.logsigmoid(chosen_logits) - F.logsigmoid(-rejected_logits)  # (B,)
    return _pair_loss(loss, chosen, rejected, beta)
