"""Advantages for online RL on a denoiser: per-prompt reward z-scores, branch selection, constant rewards.

DDPO (Black et al., arXiv 2305.13301) normalises each reward against the recent rewards of the same prompt
("per-prompt stat tracking"), falling back to the batch's statistics while a prompt has too few rewards.
B²-DiffuRL (Hu et al., arXiv 2503.11240) keeps the rewards of the current and the last 8 stages per prompt,
and from each group of branches that forked from one shared prefix trains only on the best branch if its z ≥
0.5 and the worst if its z < −0.5, dropping the rest. Under a sparse reward a whole batch can score the same
(every sample 0): :func:`is_constant` detects it, since its z-scores carry no signal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmalign.errors import UserError


def _z_scores(rewards: torch.Tensor, pool: torch.Tensor, eps: float) -> torch.Tensor:
    """(r − mean(pool)) / (std(pool) + eps), population std (ddof 0)."""
    return (rewards - pool.mean()) / (pool.std(correction=0) + eps)


class PromptStats:
    """Per-prompt reward history over a window of stages; z-scores each new reward against it.

    Each prompt keeps the rewards it got at the current stage and at the last ``window`` stages (B²-DiffuRL:
    window 8). A reward's z-score is (r − mean)/(std + eps) over its prompt's kept rewards, this call's
    included, with the population std (ddof 0). A prompt with fewer than ``min_count`` kept rewards is
    z-scored against all the rewards of this call instead (DDPO's fallback; DDPO tracks the last 16 rewards
    per prompt with min_count 16). In a multi-process run, gather prompts and rewards from all processes
    before calling :meth:`update`, so that every process keeps the same history.

    Args:
        window: number of past stages kept besides the current one, ≥ 0.
        min_count: fewest kept rewards for a prompt's own statistics, ≥ 1.
        eps: added to the std (DDPO: 1e-6), > 0.
    """

    def __init__(self, *, window: int, min_count: int, eps: float = 1e-6):
        if window < 0:
            raise UserError(f"window must be >= 0 (past stages kept per prompt), got {window}")
        if min_count < 1:
            raise UserError(f"min_count must be >= 1, got {min_count}")
        if eps <= 0:
            raise UserError(f"eps must be > 0, got {eps}")
        self.window = window
        self.min_count = min_count
        self.eps = eps
        self.stage: int | None = None
        self.history: dict[str, list[tuple[int, float]]] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor, *, stage: int) -> torch.Tensor:
        """Record ``rewards`` of ``prompts`` at ``stage`` and return their z-scores. Shape (B,), fp32.

        Stages never decrease; several calls at one stage add to it. Rewards of stages before
        stage − window are dropped.
        """
        if rewards.ndim != 1 or rewards.shape[0] != len(prompts):
            raise ValueError(
                f"expected ({len(prompts)},) rewards, one per prompt; got {tuple(rewards.shape)}"
            )
        if self.stage is not None and stage < self.stage:
            raise ValueError(f"stage must not decrease: got {stage} after {self.stage}")
        self.stage = stage
        values = rewards.detach().float().cpu()  # (B,)
        for prompt, reward in zip(prompts, values.tolist()):
            self.history.setdefault(prompt, []).append((stage, reward))
        oldest = stage - self.window
        for prompt in self.history:
            self.history[prompt] = [(s, r) for s, r in self.history[prompt] if s >= oldest]
        self.history = {prompt: kept for prompt, kept in self.history.items() if kept}
        z = torch.empty_like(values)  # (B,)
        for prompt in set(prompts):
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            kept = torch.tensor([r for _, r in self.history[prompt]])
            pool = kept if len(kept) >= self.min_count else values
            z[rows] = _z_scores(values[rows], pool, self.eps)
        return z.to(rewards.device)

    def state(self) -> dict:
        """The history as plain Python values, for a checkpoint."""
        return {
            "stage": self.stage,
            "history": {prompt: [[s, r] for s, r in kept] for prompt, kept in self.history.items()},
        }

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned."""
        self.stage = state["stage"]
        self.history = {
            prompt: [(int(s), float(r)) for s, r in kept] for prompt, kept in state["history"].items()
        }


def select_branches(
    z: torch.Tensor, group_ids: torch.Tensor, *, high: float = 0.5, low: float = -0.5
) -> torch.Tensor:
    """Keep mask over samples: per branch group its best if z ≥ high, and its worst if z < low. Shape (B,), bool.

    B²-DiffuRL's branch selection (arXiv 2503.11240; thresholds ±0.5 from its reference run). A group whose
    best is below ``high`` and whose worst is at or above ``low`` keeps nothing. Ties go to the first sample of
    the group in batch order.

    Args:
        z: (B,) z-scored rewards.
        group_ids: (B,) integer ids; samples with one id forked from one shared prefix.
        high, low: thresholds, low ≤ high.
    """
    if low > high:
        raise UserError(f"low must be <= high, got low={low}, high={high}")
    if z.shape != group_ids.shape or z.ndim != 1:
        raise ValueError(
            f"z and group_ids must both be (B,), got {tuple(z.shape)} and {tuple(group_ids.shape)}"
        )
    keep = torch.zeros(z.shape, dtype=torch.bool, device=z.device)  # (B,)
    for group in torch.unique(group_ids):
        members = (group_ids == group).nonzero().flatten()  # (k,)
        values = z[members]  # (k,)
        best, worst = members[values.argmax()], members[values.argmin()]
        if z[best] >= high:
            keep[best] = True
        if z[worst] < low:
            keep[worst] = True
    return keep


def is_constant(rewards: torch.Tensor) -> bool:
    """True when every reward equals the first: z-scores of such a batch are all 0, so it teaches nothing."""
    if rewards.numel() == 0:
        raise ValueError("is_constant needs at least one reward")
    return bool((rewards == rewards.flatten()[0]).all())
