"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint folder ``step-N/`` holds

- ``trainable.safetensors``: the trained parameters (LoRA weights or the whole UNet), by parameter name;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's per-parameter tensors and its param groups;
- ``state.json``: the step, the lr schedule's state and the recipe's own counters.

It is first written to ``step-N.tmp`` and renamed into place, so a crash never leaves a half checkpoint that
``resume=latest`` would pick up. The reference model is never stored: it is always the initial model,
rebuilt from ``model.path``.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from mmalign.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def save(folder: str, *, module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write one checkpoint atomically (call on the main process only)."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(trainable_state(module), os.path.join(tmp, "trainable.safetensors"))
    tensors, meta = _flatten_optimizer(optimizer)
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, "optimizer.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def save_weights(folder: str, module: torch.nn.Module) -> None:
    """Write only the trained parameters (the best-so-far snapshot), atomically."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(trainable_state(module), os.path.join(tmp, "trainable.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def load_weights(folder: str, module: torch.nn.Module) -> None:
    """Copy saved trained parameters into ``module``; every saved name must be a trainable parameter."""
    saved = load_file(os.path.join(folder, "trainable.safetensors"))
    params = dict(module.named_parameters())
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise UserError(
            f"{folder}: checkpoint has parameters this model lacks, e.g. {unknown[0]!r} (other LoRA config?)"
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def load(folder: str, *, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore parameters and optimizer from ``folder``; returns its ``state.json``."""
    for name in ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "state.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"checkpoint.resume: {folder} is not a checkpoint (no {name})")
    load_weights(folder, module)
    with open(os.path.join(folder, "optimizer.json")) as f:
        meta = json.load(f)
    optimizer.load_state_dict(
        _unflatten_optimizer(load_file(os.path.join(folder, "optimizer.safetensors")), meta)
    )
    with open(os.path.join(folder, "state.json")) as f:
        return json.load(f)


def latest(checkpoints_dir: str) -> str | None:
    """The newest complete ``step-N`` folder, or None."""
    if not os.path.isdir(checkpoints_dir):
        return None
    steps = [int(m.group(1)) for name in os.listdir(checkpoints_dir) if (m := _STEP_DIR.match(name))]
    return os.path.join(checkpoints_dir, f"step-{max(steps)}") if steps else None


def prune(checkpoints_dir: str, keep: int) -> None:
    """Delete all but the ``keep`` newest ``step-N`` folders."""
    steps = sorted(int(m.group(1)) for name in os.listdir(checkpoints_dir) if (m := _STEP_DIR.match(name)))
    for step in steps[:-keep]:
        shutil.rmtree(os.path.join(checkpoints_dir, f"step-{step}"), ignore_errors=True)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
