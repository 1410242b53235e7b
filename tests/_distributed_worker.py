"""One process of a multi-process preference run, for tests/test_distributed.py.

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 --master_port PORT tests/_distributed_worker.py \\
        [--float64] [--fsdp2] key.sub=value ...

torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; accelerate reads them and, with
ACCELERATE_USE_CPU=1, joins a gloo process group on the CPU. The arguments are the same ``key.sub=value``
overrides ``mmalign train`` takes; ``--float64`` runs models, noise and LoRA in float64 so that runs which are
equal in exact arithmetic can be compared to 1e-6.

``--fsdp2`` runs under ``configs/accelerate/fsdp2.yaml``: the environment ``accelerate launch`` would export
for it, computed by accelerate's own launcher code, and the accelerator it would build. accelerate switches
FSDP on only for accelerator devices (on a CPU it falls back to DDP); the worker lifts that one check, so
accelerate's FSDP2 preparation — ``fully_shard`` per ResNet and transformer block, over gloo — is what runs.
"""

from __future__ import annotations

import contextlib
import os
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


FSDP2_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "accelerate", "fsdp2.yaml"
)


def fsdp2_accelerator(gradient_accumulation_steps: int):
    from accelerate import Accelerator
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", FSDP2_CONFIG, "-m", "mmalign"]))
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith("FSDP_") or key == "ACCELERATE_USE_FSDP":
            os.environ[key] = value
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=gradient_accumulation_steps)
    accelerator.state.distributed_type = DistributedType.FSDP  # the device check, lifted
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables
    assert accelerator.is_fsdp2
    return accelerator


def main(argv: list[str]) -> None:
    overrides = [arg for arg in argv if not arg.startswith("--")]
    precision = float64_recipe() if "--float64" in argv else contextlib.nullcontext()
    cfg = load_config(None, overrides)
    accelerator = fsdp2_accelerator(cfg.optim.gradient_accumulation_steps) if "--fsdp2" in argv else None
    with precision:
        preference.train(cfg, accelerator=accelerator)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
