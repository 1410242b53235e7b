"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint folder ``step-N/`` holds

- ``trainable.safetensors``: the trained parameters (LoRA weights or the whole UNet), by parameter name;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's per-parameter tensors and its param groups;
- ``state.json``: the step, the lr schedule's state and the recipe's own counters.

It is first written to ``step-N.tmp``, every file and the folder flushed to disk (fsync), and only then renamed
into place, so a crash (even ``kill -9`` or a power cut) never leaves a half checkpoint under a ``step-N`` name;
a folder is removed by renaming it away first, for the same reason. ``latest`` takes only complete folders,
and ``prune`` keeps the newest complete one. The reference model is never stored: it is always the initial
model, rebuilt from ``model.path``.

Tensors are stored whole whatever the launch: under FSDP2 and DeepSpeed ZeRO each is gathered from its
shards while it is written and split again while it is read (``mmalign.distributed``), so a checkpoint of a
sharded run resumes on one process and the other way round. That is why every rank calls ``save`` and ``save_weights`` (only the
one given ``write=True`` writes) and every rank calls ``load``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import torch
from safetensors.torch import load_file, save_file

from mmalign import distributed
from mmalign.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d+)$")
# what an interrupted write (.tmp) or removal (.old) leaves behind
_LEFTOVER = re.compile(r"^step-(\d+)\.(tmp|old)$")
FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "state.json")
EXTRA = "extra.safetensors"
# Seconds to hold every checkpoint half-written (tensors on disk, state not yet): lets a crash inside the write
# be reproduced on purpose, to check crash safety on one's own storage (the test suite kills runs there).
PAUSE_ENV = "MMALIGN_CHECKPOINT_PAUSE"


def trainable_state(module: torch.nn.Module, *, keep: bool = True) -> dict[str, torch.Tensor]:
    """The trained parameters by name, whole and on the CPU (ZeRO's fp32 masters). Collective under FSDP2 and
    ZeRO; with ``keep=False`` this rank takes part in the gathers and returns an empty dict."""
    state = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            value = distributed.whole(p)
            if keep:
                state[name] = value.cpu().contiguous()
    return state


def save(
    folder: str,
    *,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    extra: dict[str, torch.Tensor] | None = None,
    write: bool = True,
) -> None:
    """Write one checkpoint atomically. Every rank calls it; only the one with ``write=True`` writes.

    ``extra``: the recipe's own tensors (e.g. an online pair pool), stored in ``extra.safetensors``."""
    weights = trainable_state(module, keep=write)
    tensors, meta = _flatten_optimizer(optimizer, keep=write)
    if not write:
        return
    tmp = _fresh(folder + ".tmp")
    save_file(weights, os.path.join(tmp, "trainable.safetensors"))
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    if extra:
        save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, os.path.join(tmp, EXTRA))
    if os.environ.get(PAUSE_ENV):
        time.sleep(float(os.environ[PAUSE_ENV]))
    with open(os.path.join(tmp, "optimizer.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f, indent=2)
    _publish(tmp, folder)


def save_weights(folder: str, module: torch.nn.Module, *, write: bool = True) -> None:
    """Write only the trained parameters (the best-so-far snapshot), atomically; every rank calls it."""
    weights = trainable_state(module, keep=write)
    if write:
        tmp = _fresh(folder + ".tmp")
        save_file(weights, os.path.join(tmp, "trainable.safetensors"))
        _publish(tmp, folder)


def _fresh(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def _publish(tmp: str, folder: str) -> None:
    """Make ``tmp`` durable, then give it its name: a folder under that name is always whole."""
    for name in os.listdir(tmp):
        _fsync(os.path.join(tmp, name))
    _fsync(tmp)
    # a previous version (``best``, or a step written again) is renamed away and deleted once the new one is in
    old = folder + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync(os.path.dirname(os.path.abspath(folder)))  # the renames themselves
    shutil.rmtree(old, ignore_errors=True)


def _remove(folder: str) -> None:
    """Delete ``folder``, renamed away first so that a crash midway never leaves a part under its name."""
    doomed = folder + ".old"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(folder: str) -> bool:
    """Whether ``folder`` holds every file of a checkpoint."""
    return all(os.path.isfile(os.path.join(folder, name)) for name in FILES)


def load_weights(folder: str, module: torch.nn.Module) -> None:
    """Copy saved trained parameters into ``module``; every saved name must be a trainable parameter."""
    saved = load_file(os.path.join(folder, "trainable.safetensors"))
    unknown = sorted(set(saved) - {name for name, _ in module.named_parameters()})
    if unknown:
        raise UserError(
            f"{folder}: checkpoint has parameters this model lacks, e.g. {unknown[0]!r} (other LoRA config?)"
        )
    assign(module, saved)


def assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the parameters of the same names (this rank's part of a sharded one)."""
    params = dict(module.named_parameters())
    for name, value in tensors.items():
        distributed.assign(params[name], value)


def load(folder: str, *, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore parameters and optimizer from ``folder``; returns its ``state.json``."""
    for name in FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"checkpoint.resume: {folder} is not a checkpoint (no {name})")
    load_weights(folder, module)
    with open(os.path.join(folder, "optimizer.json")) as f:
        meta = json.load(f)
    state_dict = _unflatten_optimizer(load_file(os.path.join(folder, "optimizer.safetensors")), meta)
    if distributed.is_zero_optimizer(optimizer):
        distributed.load_zero_state_dict(optimizer, state_dict)
    else:
        params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
        for index, entry in state_dict["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value) and value.shape == params[index].shape:  # not the scalar step
                    entry[key] = distributed.like(value, params[index])
        optimizer.load_state_dict(state_dict)
    with open(os.path.join(folder, "state.json")) as f:
        return json.load(f)


def load_extra(folder: str) -> dict[str, torch.Tensor]:
    """The recipe's own tensors of a checkpoint (empty when it stored none)."""
    path = os.path.join(folder, EXTRA)
    return load_file(path) if os.path.isfile(path) else {}


def latest(checkpoints_dir: str) -> str | None:
    """The newest complete ``step-N`` folder, or None; ``.tmp`` / ``.old`` leftovers of a crash never count."""
    steps = _complete_steps(checkpoints_dir)
    return os.path.join(checkpoints_dir, f"step-{steps[-1]}") if steps else None


def prune(checkpoints_dir: str, keep: int) -> None:
    """Delete all but the ``keep`` newest complete ``step-N`` folders (so never the newest complete one), and
    what interrupted writes or removals left behind before it."""
    steps = _complete_steps(checkpoints_dir)
    if not steps:
        return
    for step in steps[:-keep]:
        _remove(os.path.join(checkpoints_dir, f"step-{step}"))
    for name in os.listdir(checkpoints_dir):
        m = _LEFTOVER.match(name)
        if m and int(m.group(1)) < steps[-1]:
            shutil.rmtree(os.path.join(checkpoints_dir, name), ignore_errors=True)


def _complete_steps(checkpoints_dir: str) -> list[int]:
    """The steps of the complete ``step-N`` folders, oldest first."""
    if not os.path.isdir(checkpoints_dir):
        return []
    steps = []
    for name in os.listdir(checkpoints_dir):
        m = _STEP_DIR.match(name)
        if m and is_complete(os.path.join(checkpoints_dir, name)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _flatten_optimizer(
    optimizer: torch.optim.Optimizer, *, keep: bool
) -> tuple[dict[str, torch.Tensor], dict]:
    if distributed.is_zero_optimizer(optimizer):
        state_dict = distributed.zero_state_dict(optimizer, keep=keep)  # gathered already
    else:
        state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                value = distributed.whole(value)  # collective for a sharded parameter's state
                if keep:
                    tensors[f"{index}.{key}"] = value.cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
