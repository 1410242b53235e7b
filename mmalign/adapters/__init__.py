"""Modality adapters behind one protocol (``base.Adapter``), chosen by ``model.kind`` in :data:`ADAPTERS`.

Recipes import this package, never a modality module: ``adapters.load(cfg.model)`` gives the adapter.
"""

from __future__ import annotations

import torch

from mmalign.adapters.base import (
    Adapter,
    adapters_disabled,
    for_sampling,
    fuse_lora,
    per_sample_mean,
    score_of,
    weight_dtype,
)
from mmalign.adapters.diffusion import DiffusionAdapter
from mmalign.adapters.flow import FlowAdapter
from mmalign.errors import UserError

ADAPTERS: dict[str, type] = {"diffusion": DiffusionAdapter, "flow": FlowAdapter}


def load(model_cfg, *, timesteps=None, dtype: torch.dtype = torch.float32) -> Adapter:
    """The adapter of ``model_cfg.kind`` over the pipeline folder ``model_cfg.path``, checked against the
    ``model`` section (target, media size); ``timesteps``: the config's training noise-level section."""
    if model_cfg.kind not in ADAPTERS:
        raise UserError(f"`model.kind` must be one of {', '.join(ADAPTERS)}, got {model_cfg.kind!r}")
    adapter = ADAPTERS[model_cfg.kind].load(
        model_cfg.path, dtype=dtype, model_cfg=model_cfg, timesteps_cfg=timesteps
    )
    adapter.check(model_cfg)
    return adapter


__all__ = [
    "ADAPTERS",
    "Adapter",
    "adapters_disabled",
    "for_sampling",
    "fuse_lora",
    "load",
    "per_sample_mean",
    "score_of",
    "weight_dtype",
]
