"""What the recipes need to know about parameters sharded across processes (FSDP2), and nothing more.

Under DDP or on one process every rank holds whole tensors and these helpers pass them through. Under FSDP2
(``torch.distributed.fsdp.fully_shard``, which accelerate applies for ``configs/accelerate/fsdp2.yaml``) each
parameter and its optimizer state is a ``DTensor`` whose rows are split across the ranks. Then:

- reading a whole tensor (checkpoint, export) is an all-gather: every rank must call it, in the same order;
- writing one back is local: every rank reads the same file and keeps its own rows;
- a forward pass of the sharded model is collective: every rank must run the same number of forwards.
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


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from all ranks for a DTensor (collective), ``tensor`` itself otherwise."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.full_tensor()
    return tensor


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


def rank_chunk(count: int, rank: int, world: int) -> list[int]:
    """The item indices rank ``rank`` of ``world`` handles: a contiguous run of ⌈count / world⌉ indices, padded
    by repeating the last index so that every rank does the same amount of work (a sharded forward is
    collective). Concatenating the ranks' results in rank order and keeping the first ``count`` gives the items
    in their original order."""
    size = -(-count // world)
    chunk = list(range(rank * size, min((rank + 1) * size, count)))
    return chunk + [count - 1] * (size - len(chunk))
