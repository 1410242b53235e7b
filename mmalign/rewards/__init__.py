"""Reward models: ``reward(media, prompts) -> Tensor (B,)``, chosen by name in ``REWARDS``."""

from __future__ import annotations

from mmalign.errors import UserError
from mmalign.rewards.toy import ShapesReward
from mmalign.rewards.toy_video import MovingShapesReward

REWARDS = {"toy_shapes": ShapesReward, "toy_moving_shapes": MovingShapesReward}


def build_reward(name: str, **kwargs):
    """Instantiate the reward called ``name`` with keyword arguments ``kwargs``."""
    if name not in REWARDS:
        raise UserError(f"reward {name!r} is unknown (accepted: {', '.join(REWARDS)})")
    return REWARDS[name](**kwargs)
