"""One process of a multi-process preference run, for tests/test_distributed.py.

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 --master_port PORT tests/_distributed_worker.py \\
        [--float64] [--fsdp2 | --deepspeed] key.sub=value ...

torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; accelerate reads them and, with
ACCELERATE_USE_CPU=1, joins a gloo process group on the CPU. The arguments are the same ``key.sub=value``
overrides ``mmalign train`` takes; ``--float64`` runs models, noise and LoRA in float64 so that runs which are
equal in exact arithmetic can be compared to 1e-6.

``--fsdp2`` runs under ``configs/accelerate/fsdp2.yaml``: the environment ``accelerate launch`` would export
for it, computed by accelerate's own launcher code, and the accelerator it would build. accelerate switches
FSDP on only for accelerator devices (on a CPU it falls back to DDP); the worker lifts that one check, so
accelerate's FSDP2 preparation — ``fully_shard`` per ResNet and transformer block, over gloo — is what runs.

``--deepspeed`` runs under ``configs/accelerate/deepspeed_zero2.yaml`` the same way. accelerate does switch
DeepSpeed on without a GPU, but then picks no process-group backend, so the worker names gloo
(``DS_ACCELERATOR=cpu`` tells DeepSpeed itself to run on the CPU).
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from mmalign.adapters import diffusion, flow
from mmalign.config import load_config
from mmalign.recipes import preference


@contextlib.contextmanager
def float64_recipe():
    """Inside: the recipe loads its pipeline (UNet or flow) in float64 and draws float64 noise and LoRA weights."""
    real, real_flow = diffusion.load_components, flow.load_pipeline

    def load_float64(path, **kwargs):
        return real(path, dtype=torch.float64)

    def load_flow_float64(path, **kwargs):
        pipe = real_flow(path, dtype=torch.float64)
        pipe.transformer.to(torch.float64)  # the modules diffusers keeps in fp32 (Wan's norms) too
        return pipe

    previous = torch.get_default_dtype()
    diffusion.load_components, flow.load_pipeline = load_float64, load_flow_float64
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
        diffusion.load_components, flow.load_pipeline = real, real_flow


ACCELERATE_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "accelerate"
)


def launch_environment(name: str, prefixes: tuple[str, ...]) -> None:
    """Export what ``accelerate launch --config_file configs/accelerate/NAME`` would (the variables starting
    with ``prefixes``; mixed precision stays the config's)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = os.path.join(ACCELERATE_CONFIGS, name)
    parsed = launch_command_parser().parse_args(["--config_file", path, "-m", "mmalign"])
    args, defaults, _ = _validate_launch_command(parsed)
    if args.use_deepspeed:  # as accelerate's launch_command does before it builds the environment
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        environment = prepare_deepspeed_cmd_env(args)[1]
    else:
        environment = prepare_multi_gpu_env(args)
    for key, value in environment.items():
        if key.startswith(prefixes):
            os.environ[key] = value


def fsdp2_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    launch_environment("fsdp2.yaml", ("FSDP_", "ACCELERATE_USE_FSDP"))
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        mixed_precision=cfg.optim.mixed_precision,
    )
    accelerator.state.distributed_type = DistributedType.FSDP  # the device check, lifted
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables
    assert accelerator.is_fsdp2
    return accelerator


def deepspeed_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.pop("ACCELERATE_USE_CPU", None)  # with it, accelerate would fall back to DDP
    launch_environment("deepspeed_zero2.yaml", ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_"))
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        mixed_precision=cfg.optim.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )
    assert accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.num_processes > 1
    return accelerator


def main(argv: list[str]) -> None:
    overrides = [arg for arg in argv if not arg.startswith("--")]
    precision = float64_recipe() if "--float64" in argv else contextlib.nullcontext()
    cfg = load_config(None, overrides)
    accelerator = None
    if "--fsdp2" in argv:
        accelerator = fsdp2_accelerator(cfg)
    if "--deepspeed" in argv:
        accelerator = deepspeed_accelerator(cfg)
    with precision:
        preference.train(cfg, accelerator=accelerator)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
