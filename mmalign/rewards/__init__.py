"""Reward models: ``reward(media, prompts) -> Tensor (B,)``, chosen by name in ``REWARDS``.

Reward models on local weights (``mmalign.rewards.base.RewardModel``) are chosen by name in ``MODEL_REWARDS``
and built from their folder by ``load_reward_model``.
"""

from __future__ import annotations

import importlib

from mmalign.errors import UserError
from mmalign.rewards.toy import ShapesReward, SparseShapesReward
from mmalign.rewards.toy_video import MovingShapesReward

REWARDS = {
    "toy_shapes": ShapesReward,
    "toy_shapes_sparse": SparseShapesReward,
    "toy_moving_shapes": MovingShapesReward,
}

# name -> (module, class); imported when loaded, so that a run that only uses the toy rewards never imports
# transformers' CLIP image processing (which warns about a missing torchvision on import)
MODEL_REWARDS = {
    "clip_score": ("mmalign.rewards.clip", "CLIPScore"),
    "pick_score": ("mmalign.rewards.clip", "PickScore"),
    "aesthetic": ("mmalign.rewards.aesthetic", "AestheticScore"),
}


def build_reward(name: str, **kwargs):
    """Instantiate the reward called ``name`` with keyword arguments ``kwargs``."""
    if name not in REWARDS:
        raise UserError(f"reward {name!r} is unknown (accepted: {', '.join(REWARDS)})")
    return REWARDS[name](**kwargs)


def load_reward_model(name: str, path: str, **options):
    """The reward model called ``name`` loaded from the local folder ``path``; ``options``: batch_size,
    differentiable, device, dtype."""
    if name not in MODEL_REWARDS:
        raise UserError(f"reward model {name!r} is unknown (accepted: {', '.join(MODEL_REWARDS)})")
    module, cls = MODEL_REWARDS[name]
    return getattr(importlib.import_module(module), cls)(path, **options)
