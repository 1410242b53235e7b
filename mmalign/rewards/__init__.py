"""Reward models: ``reward(media, prompts) -> Tensor (B,)``, chosen by name in ``REWARDS``."""

from __future__ import annotations

from mmalign.errors import UserError
from mmalign.rewards.toy import ShapesReward

REWARDS = {"toy_shapes": ShapesReward}


def build_reward(name: str, **kwargs):
    """Instantiate the reward called ``name`` with keyword arguments ``kwargs``."""
    if name not in REWARDS:
        raise UserError(f"reward {name!r} is unknown (accepted: {', '.join(REWARDS)})")
    return REWARDS[name](**kwargs)
