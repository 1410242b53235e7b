"""Losses of a reward model trained on preferences or scores: Bradley–Terry (with ties) and regression.

They train the latent reward model of reward-guided sampling (``mmalign.rewards.latent``): pure functions on
per-sample, per-dimension rewards, returning the loss NOT reduced. All arithmetic is fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# outcome codes of a pair, per reward dimension
A_PREFERRED, TIE, B_PREFERRED = 1.0, 0.0, -1.0


def bradley_terry(
    reward_a: torch.Tensor, reward_b: torch.Tensor, outcome: torch.Tensor, *, tie_margin: float = 0.0
) -> torch.Tensor:
    """Negative log-likelihood of each pair's outcome under the Bradley–Terry model; any shape, not reduced.

    Bradley & Terry (Biometrika 39, 1952): P(a ≻ b) = σ(r_a − r_b), loss −log σ(d) with d = r_a − r_b for an
    ``outcome`` of +1 (a preferred) and −log σ(−d) for −1 (b preferred). A tie (outcome 0):

    - ``tie_margin`` = 0: the cross-entropy against the soft label ½, −½·log σ(d) − ½·log σ(−d), symmetric in
      the pair and smallest at d = 0 (how Pick-a-Pic's label_0 = 0.5 is read as a soft label);
    - ``tie_margin`` m > 0: Rao & Kupper's model with ties (JASA 62, 1967, Eq. 2.1 with θ = e^m):
      P(a ≻ b) = σ(d − m), P(b ≻ a) = σ(−d − m), P(tie) = 1 − P(a ≻ b) − P(b ≻ a); the loss is −log of the
      observed outcome's probability, so wins and losses are also read with the margin. VideoReward (Liu et
      al., arXiv 2501.13918) trains its multi-dimensional video reward model with ties this way (unverified
      which of the two forms).

    Neither paper says how to weigh dimensions; each (pair, dimension) entry is one term here.

    Args:
        reward_a, reward_b: rewards of the two members, same shape, e.g. (B,) or (B, D).
        outcome: +1, 0 or −1 per entry, broadcastable to the rewards.
        tie_margin: m ≥ 0.
    """
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    d = reward_a.float() - reward_b.float()
    outcome = outcome.float().expand_as(d)
    a_wins, b_wins = outcome > 0, outcome < 0
    if tie_margin == 0:
        win_loss = -F.logsigmoid(d)
        lose_loss = -F.logsigmoid(-d)
        tie_loss = 0.5 * (win_loss + lose_loss)
    else:
        win_loss = -F.logsigmoid(d - tie_margin)
        lose_loss = -F.logsigmoid(-d - tie_margin)
        # P(tie) = 1 − σ(d − m) − σ(−d − m) = σ(m − d) − σ(−d − m), as a difference of two sigmoids
        p_tie = torch.sigmoid(tie_margin - d) - torch.sigmoid(-d - tie_margin)
        tie_loss = -torch.log(p_tie.clamp(min=torch.finfo(d.dtype).tiny))
    return torch.where(a_wins, win_loss, torch.where(b_wins, lose_loss, tie_loss))


def reward_regression(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error of predicted against observed rewards, (r̂ − r)², elementwise, not reduced; fp32.

    How a reward model learns from scored samples (e.g. a programmatic reward's components): its optimum is
    the conditional mean E[r | input], which is what guidance differentiates on a noisy latent.
    """
    return (predicted.float() - target.float()).pow(2)
