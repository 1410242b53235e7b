"""Online reinforcement learning on denoisers: stochastic samplers with log-probabilities, the stage schedule
of backward progressive training, and reward-to-advantage bookkeeping.

The building blocks of B²-DiffuRL (Hu et al., arXiv 2503.11240) and its baselines DDPO (Black et al.,
arXiv 2305.13301) and Flow-GRPO (Liu et al., arXiv 2505.05470). The loss itself is
:func:`mmalign.losses.ppo.ppo_clip`.
"""

from __future__ import annotations

from mmalign.rl.advantages import PromptStats, is_constant, select_branches
from mmalign.rl.samplers import (
    Gaussian,
    Transition,
    ddim_posterior,
    ddim_prev_timestep,
    ddim_step,
    flow_sde_posterior,
    flow_sde_step,
    kl_to_reference,
    log_prob_of,
)
from mmalign.rl.schedule import split_step

__all__ = [
    "Gaussian",
    "PromptStats",
    "Transition",
    "ddim_posterior",
    "ddim_prev_timestep",
    "ddim_step",
    "flow_sde_posterior",
    "flow_sde_step",
    "is_constant",
    "kl_to_reference",
    "log_prob_of",
    "select_branches",
    "split_step",
]
