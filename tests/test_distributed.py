"""Multi-process runs: torchrun + gloo on the CPU, and the accelerate launch configs we ship.

A run split over processes must be the run a single process makes with the whole batch: every process takes
its slice of the same deterministic pair stream, DDP averages the gradients, and only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from _distributed_worker import main as run_worker
from accelerate.commands.config.config_args import load_config_from_file
from conftest import run_overrides
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ACCELERATE_CONFIGS = os.path.join(ROOT, "configs", "accelerate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(pipeline: str, data: str, out, batch_size: int) -> list[str]:
    return [
        *run_overrides(pipeline, data, out),
        "optim.max_steps=3",
        f"optim.batch_size={batch_size}",
        "checkpoint.every=2",
        "log.every=1",
    ]


def torchrun(nproc: int, args: list[str], timeout: float = 300) -> str:
    """Run ``args`` (a script and its arguments, or ``-m module ...``) in ``nproc`` gloo processes; stdout."""
    if args[0] != "-m":
        args = [os.path.join(HERE, "_distributed_worker.py"), *args]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *args,
    ]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"torchrun exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is needed to run torchrun on the CPU",
)


@needs_gloo
def test_two_processes_equal_one_process_with_the_whole_batch(pixel_pipeline, pairs_parquet, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun(2, ["--float64", *overrides(pixel_pipeline, pairs_parquet, two, batch_size=2)])
    run_worker(["--float64", *overrides(pixel_pipeline, pairs_parquet, one, batch_size=4)])

    lora = "final/pytorch_lora_weights.safetensors"
    assert max_difference(load_file(two / lora), load_file(one / lora)) <= 1e-6
    # The optimizer state too, so a multi-process run resumes like a single one.
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        saved_two = load_file(two / "checkpoints" / "step-3" / name)
        assert max_difference(saved_two, load_file(one / "checkpoints" / "step-3" / name)) <= 1e-6

    # Rank 0 alone writes: one metrics row per step, complete checkpoints, nothing half-written.
    rows_two, rows_one = metrics(two), metrics(one)
    assert [row["step"] for row in rows_two] == [1, 2, 3]
    assert sorted(os.listdir(two / "checkpoints")) == ["step-2", "step-3"]
    assert not [path for path, _, _ in os.walk(two) if path.endswith(".tmp")]
    with open(two / "config.yaml") as f:
        assert f.read().count("output_dir:") == 1
    # Metrics are means over all pairs of the step (each rank's mean, averaged across ranks by reduce).
    for a, b in zip(rows_two, rows_one):
        for key in ("loss", "implicit_acc", "reward_margin", "grad_norm", "policy_err_w", "ref_err_l"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    assert any(0 < row["implicit_acc"] < 1 for row in rows_one[1:]), "accuracies should not all be 0 or 1"


@needs_gloo
def test_toy_pairs_are_built_once_under_two_processes(tmp_path):
    """``mmalign train`` under torchrun: rank 0 samples the missing toy pairs while rank 1 waits, then rank 1
    finds them built (one "built" line), and both train on the same file."""
    data = tmp_path / "data" / "pairs.parquet"
    stdout = torchrun(
        2,
        [
            "-m",
            "mmalign",
            "train",
            os.path.join(ROOT, "configs", "quickstart.yaml"),
            f"output_dir={tmp_path / 'run'}",
            f"data.path={data}",
            "toy.samples_per_prompt=2",
            "toy.pairs_per_prompt=1",
            "toy.control=false",
            "sampling.steps=2",
            "optim.max_steps=1",
            "optim.batch_size=2",
            "validation.every=0",
            "eval.enabled=false",
            "log.progress=false",
            "log.tensorboard=false",
        ],
    )
    assert stdout.count("best-vs-worst-of-2 pairs from base samples") == 1, stdout
    assert sorted(os.listdir(data.parent)) == ["pairs.parquet"]
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").exists()
    # and the training was one 2-process run, not two single ones: a single rank 0 wrote one row
    assert [row["step"] for row in metrics(tmp_path / "run")] == [1]


# ------------------------------------------------------------------------------------ accelerate configs

LAUNCH_CONFIGS = {"ddp.yaml": "MULTI_GPU", "deepspeed_zero2.yaml": "DEEPSPEED", "fsdp2.yaml": "FSDP"}


def launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


@pytest.mark.parametrize("name", sorted(LAUNCH_CONFIGS))
def test_accelerate_config_loads(name):
    config = load_config_from_file(os.path.join(ACCELERATE_CONFIGS, name))
    assert config.distributed_type.value == LAUNCH_CONFIGS[name]
    assert config.mixed_precision == "bf16"
    assert config.num_processes == 8 and config.num_machines == 1
    # accelerate launch copies each nested key onto its own argument; a misspelt one would be ignored silently.
    nested = [*config.deepspeed_config, *config.fsdp_config]
    unknown = sorted(set(nested) - launch_options())
    assert not unknown, f"{name}: keys accelerate launch does not know: {unknown}"


def test_deepspeed_config_leaves_accumulation_to_mmalign():
    config = load_config_from_file(os.path.join(ACCELERATE_CONFIGS, "deepspeed_zero2.yaml"))
    assert config.deepspeed_config["zero_stage"] == 2
    assert config.deepspeed_config["offload_optimizer_device"] == "none"
    # Set here, either would be exported to the environment and override the mmalign config.
    assert "gradient_accumulation_steps" not in config.deepspeed_config
    assert "gradient_clipping" not in config.deepspeed_config


def test_fsdp2_config_builds_the_plugin_accelerate_launch_would(monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = os.path.join(ACCELERATE_CONFIGS, "fsdp2.yaml")
    args = launch_command_parser().parse_args(["--config_file", path, "-m", "mmalign", "train", "CONFIG"])
    args, _, _ = _validate_launch_command(args)
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.reshard_after_forward is True
    # The wrapped classes must exist in a diffusers UNet, or nothing would be sharded per block.
    from conftest import tiny_unet

    classes = {type(module).__name__ for module in tiny_unet(4, 8).modules()}
    assert set(plugin.transformer_cls_names_to_wrap) <= classes
