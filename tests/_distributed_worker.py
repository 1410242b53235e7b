"""One process of a multi-process preference run, for tests/test_distributed.py.

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 --master_port PORT tests/_distributed_worker.py \\
        [--float64] key.sub=value ...

torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; accelerate reads them and, with
ACCELERATE_USE_CPU=1, joins a gloo process group on the CPU. The arguments are the same ``key.sub=value``
overrides ``mmalign train`` takes; ``--float64`` runs models, noise and LoRA in float64 so that runs which are
equal in exact arithmetic can be compared to 1e-6.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from mmalign.adapters import diffusion
from mmalign.config import load_config
from mmalign.recipes import preference


@contextlib.contextmanager
def float64_recipe():
    """Inside: the recipe loads its pipeline in float64 and draws float64 noise and LoRA weights."""
    real = diffusion.load_components

    def load_float64(path, **kwargs):
        return real(path, dtype=torch.float64)

    previous = torch.get_default_dtype()
    diffusion.load_components = load_float64
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
        diffusion.load_components = real


def main(argv: list[str]) -> None:
    overrides = [arg for arg in argv if arg != "--float64"]
    precision = float64_recipe() if "--float64" in argv else contextlib.nullcontext()
    with precision:
        preference.train(load_config(None, overrides))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
