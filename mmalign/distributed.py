"""What the recipes need to know about parameters and optimizer state split across processes, and no more.

Under DDP or on one process every rank holds whole tensors and these helpers pass them through. Two launch
backends split them:

- FSDP2 (``torch.distributed.fsdp.fully_shard``; accelerate applies it for ``configs/accelerate/fsdp2.yaml``):
  each parameter and its optimizer state is a ``DTensor`` whose rows are split across the ranks, and a
  forward pass of the sharded model is collective: every rank must run the same number of forwards.
- DeepSpeed ZeRO stage 1 / 2 (``configs/accelerate/deepspeed_zero2.yaml``): every rank holds the whole
  model, but the fp32 master weights and the optimizer state of a trained parameter are cut into one
  contiguous partition per rank, held by DeepSpeed's optimizer.

Reading a whole tensor (checkpoint, export) is then a collective gather: every rank must call it, in the
same order. Writing one back is local: every rank reads the same file and keeps its own part.
"""

from __future__ import annotations

import torch


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_sharded(module: torch.nn.Module) -> bool:
    """True for a module that ``fully_shard`` (FSDP2) has wrapped."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def is_zero_param(param: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed ZeRO 1/2 trains. Its mapping to the fp32 master partition is None on
    the ranks that hold none of its elements, which still take part in the gathers."""
    return hasattr(param, "_hp_mapping")


def is_zero_optimizer(optimizer) -> bool:
    """True for DeepSpeed's ZeRO 1/2 optimizer (what accelerate's optimizer wrapper holds under DeepSpeed)."""
    return hasattr(optimizer, "single_partition_of_fp32_groups") and hasattr(optimizer, "bit16_groups")


@torch.no_grad()
def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from all ranks for a DTensor, the fp32 master for a ZeRO parameter (both
    collective), ``tensor`` itself otherwise."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.full_tensor()
    if is_zero_param(tensor):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(tensor)
    return tensor.detach()


@torch.no_grad()
def local_all_finite(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """1.0 on ``device`` when every element this rank holds of ``tensors`` is finite (of a DTensor, its own
    shard), else 0.0. Nothing is communicated: reduce it across the ranks for one answer everywhere."""
    dtensor = _dtensor_type()
    finite = torch.ones((), device=device)
    for tensor in tensors:
        if dtensor is not None and isinstance(tensor, dtensor):
            tensor = tensor.to_local()
        finite = finite * torch.isfinite(tensor).all().to(device)
    return finite


def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``target``: this rank's rows of it when ``target`` is a DTensor.

    Every rank must hold the same ``value``; nothing is communicated.
    """
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(target, dtensor):
        from torch.distributed.tensor import distribute_tensor

        value = value.to(device=target.device, dtype=target.dtype)
        return distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
    return value


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set ``param`` to the whole tensor ``value``: this rank's rows of a DTensor; a ZeRO parameter and its
    fp32 master partition both."""
    param.copy_(like(value, param))
    if is_zero_param(param):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.to(device=param.device, dtype=torch.float32))


# ----------------------------------------------------------------------------- DeepSpeed optimizer state


def zero_params(optimizer) -> list[torch.Tensor]:
    """The trained parameters in the order the wrapped torch optimizer numbered them."""
    return [p for group in optimizer.bit16_groups for p in group]


def zero_state_dict(optimizer, *, keep: bool) -> dict:
    """A ZeRO optimizer's state in the wrapped torch optimizer's own ``state_dict`` layout, with whole
    tensors (gathered: collective). With ``keep=False`` the gathers run and nothing is kept."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner, state, first = optimizer.optimizer, {}, 0
    groups = []
    for flat, params in zip(optimizer.single_partition_of_fp32_groups, optimizer.bit16_groups):
        partition = inner.state.get(flat, {})
        for index, param in enumerate(params, start=first):
            entry = {}
            for key, value in partition.items():
                if torch.is_tensor(value) and value.shape == flat.shape:
                    entry[key] = safe_get_full_optimizer_state(param, key)
                else:
                    entry[key] = value.clone() if torch.is_tensor(value) else value  # the partition's step
            if entry and keep:
                state[index] = entry
        group = next(g for g in inner.param_groups if g["params"][0] is flat)
        groups.append(
            {**{k: v for k, v in group.items() if k != "params"}, "params": list(range(first, index + 1))}
        )
        first = index + 1
    return {"state": state, "param_groups": groups}


def load_zero_state_dict(optimizer, state_dict: dict) -> None:
    """Inverse of ``zero_state_dict``: every rank passes the same whole tensors and keeps its partition."""
    from deepspeed.utils import safe_set_full_optimizer_state

    inner, first = optimizer.optimizer, 0
    for flat, params, saved_group in zip(
        optimizer.single_partition_of_fp32_groups, optimizer.bit16_groups, state_dict["param_groups"]
    ):
        group = next(g for g in inner.param_groups if g["params"][0] is flat)
        group.update({k: v for k, v in saved_group.items() if k != "params"})
        saved = [state_dict["state"].get(i) for i in range(first, first + len(params))]
        first += len(params)
        if not any(saved):
            continue
        # the partition's state, made the way the torch optimizer's first step would, then filled per parameter
        template = next(entry for entry in saved if entry)
        inner.state[flat] = {
            key: torch.zeros_like(flat) if _is_per_element(value) else value
            for key, value in template.items()
        }
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()  # point each parameter at its slice of the new state
    for index, param in enumerate(zero_params(optimizer)):
        for key, value in (state_dict["state"].get(index) or {}).items():
            if _is_per_element(value):
                safe_set_full_optimizer_state(param, value.to(device=param.device, dtype=torch.float32), key)


def _is_per_element(value) -> bool:
    """An optimizer state entry with one value per parameter element (Adam's moments, not its step)."""
    return torch.is_tensor(value) and value.dim() > 0


def rank_chunk(count: int, rank: int, world: int) -> list[int]:
    """The item indices rank ``rank`` of ``world`` handles: a contiguous run of ⌈count / world⌉ indices, padded
    by repeating the last index so that every rank does the same amount of work (a sharded forward is
    collective). Concatenating the ranks' results in rank order and keeping the first ``count`` gives the items
    in their original order."""
    size = -(-count // world)
    chunk = list(range(rank * size, min((rank + 1) * size, count)))
    return chunk + [count - 1] * (size - len(chunk))
