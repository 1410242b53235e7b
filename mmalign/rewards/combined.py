"""A weighted sum of scalar reward models, e.g. PickScore plus a little aesthetic score.

    reward(I, c) = Σ_k w_k · r_k(I, c)

``components`` returns the parts side by side, (B, K), in the order given, named by ``component_names``, so a
recipe can log each part next to the sum it optimises.
"""

from __future__ import annotations

import math

import torch

from mmalign.errors import UserError
from mmalign.rewards.base import RewardModel

__all__ = ["WeightedSum"]


class WeightedSum:
    """``reward(media, prompts) -> (B,)`` = Σ w · r over ``parts`` = {name: (reward model, weight w)}.

    Every part must be scalar (one dimension); weights may be negative (a penalty) but must be finite.
    Differentiable when every part is.
    """

    dimensions = ("weighted_sum",)

    def __init__(self, parts: dict[str, tuple[RewardModel, float]]) -> None:
        if not parts:
            raise UserError("a weighted sum of rewards needs at least one {name: (reward, weight)} part")
        for name, (reward, weight) in parts.items():
            if len(reward.dimensions) != 1:
                raise UserError(
                    f"reward {name!r} has {len(reward.dimensions)} dimensions ({', '.join(reward.dimensions)}); "
                    "a weighted sum takes scalar rewards"
                )
            if not math.isfinite(weight):
                raise UserError(f"weight of reward {name!r} must be a finite number, got {weight}")
        self.parts = parts
        self.component_names = tuple(parts)
        self.differentiable = all(reward.differentiable for reward, _ in parts.values())

    def components(self, media: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Each part's reward, unweighted: (B, K), column k for ``component_names[k]``."""
        return torch.stack([reward(media, prompts) for reward, _ in self.parts.values()], dim=1)  # (B, K)

    def __call__(self, media: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        weights = torch.tensor([weight for _, weight in self.parts.values()])  # (K,)
        parts = self.components(media, prompts)  # (B, K)
        return parts @ weights.to(parts.device, parts.dtype)  # (B,)
