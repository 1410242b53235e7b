"""Multi-process runs: torchrun + gloo on the CPU, and the accelerate launch configs we ship.

A run split over processes must be the run a single process makes with the whole batch: every process takes
its slice of the same deterministic pair stream, DDP averages the gradients, and only rank 0 writes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from _distributed_worker import main as run_worker
from accelerate.commands.config.config_args import load_config_from_file
from conftest import TOY_BASE, run_overrides
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
def test_two_processes_give_bco_pair_the_reward_shift_of_one_process(pixel_pipeline, pairs_parquet, tmp_path):
    """BCO's δ is the running mean over the whole global batch: the processes' reward sums are added up, so a
    process that kept the mean of its own pairs would train with another δ and end with other weights."""
    bco = ["loss.name=bco_pair", "loss.beta=500", "optim.lr=1e-2"]
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun(2, ["--float64", *overrides(pixel_pipeline, pairs_parquet, two, batch_size=2), *bco])
    run_worker(["--float64", *overrides(pixel_pipeline, pairs_parquet, one, batch_size=4), *bco])

    rows_two, rows_one = metrics(two), metrics(one)
    assert [row["step"] for row in rows_two] == [1, 2, 3]
    assert abs(rows_one[-1]["reward_shift"]) > 0.05, "δ must have moved for the comparison to mean anything"
    for a, b in zip(rows_two, rows_one):
        for key in ("reward_shift", "implicit_reward", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    lora = "final/pytorch_lora_weights.safetensors"
    assert max_difference(load_file(two / lora), load_file(one / lora)) <= 1e-6
    shifts = [load_file(run / "checkpoints" / "step-3" / "extra.safetensors") for run in (two, one)]
    assert max_difference(*shifts) <= 1e-9


@needs_gloo
def test_toy_pairs_are_built_once_under_two_processes(tmp_path):
    """``mmalign train`` under torchrun: rank 0 samples the missing toy pairs while rank 1 waits, then rank 1
    finds them built (one "built" line), and both train on the same file."""
    data = tmp_path / "run" / "data" / "pairs.parquet"  # the quickstart's data.path: inside output_dir
    stdout = torchrun(
        2,
        [
            "-m",
            "mmalign",
            "train",
            os.path.join(ROOT, "configs", "quickstart.yaml"),
            f"output_dir={tmp_path / 'run'}",
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


# ------------------------------------------------------------------------------------------------ FSDP2


def validated_overrides(pipeline: str, data: str, out, batch_size: int, *extra: str) -> list[str]:
    """Three steps with validation at 0, 2 and 3 (so sampling from the sharded UNet) and a checkpoint at 2."""
    return [
        *overrides(pipeline, data, out, batch_size),
        "validation.every=2",
        "validation.seeds_per_prompt=1",
        "sampling.steps=2",
        *extra,
    ]


def checkpoint_difference(a, b, step: int) -> float:
    names = ("trainable.safetensors", "optimizer.safetensors")
    folder = f"checkpoints/step-{step}"
    return max(max_difference(load_file(a / folder / n), load_file(b / folder / n)) for n in names)


@needs_gloo
def test_fsdp2_run_equals_one_process_and_resumes_a_single_process_checkpoint(pairs_parquet, tmp_path):
    """Under fsdp2.yaml each LoRA weight and its Adam moments live as two half shards; the run must still be
    the single-process run with the whole batch: the same validation rewards (sampled from the sharded UNet,
    each rank its share of the prompts), whole-tensor checkpoints equal to 1e-6, the same exported LoRA. A
    single-process checkpoint resumed under FSDP2 is split back into shards and ends the same."""
    fsdp, one, resumed = tmp_path / "fsdp", tmp_path / "one", tmp_path / "resumed"
    args = [*validated_overrides(TOY_BASE, pairs_parquet, fsdp, 2), "log.progress=true"]
    assert "2 processes (FSDP2)" in torchrun(2, ["--float64", "--fsdp2", *args])
    run_worker(["--float64", *validated_overrides(TOY_BASE, pairs_parquet, one, 4)])

    lora = "final/pytorch_lora_weights.safetensors"
    assert max_difference(load_file(fsdp / lora), load_file(one / lora)) <= 1e-6
    assert checkpoint_difference(fsdp, one, 2) <= 1e-6 and checkpoint_difference(fsdp, one, 3) <= 1e-6
    rows_fsdp, rows_one = metrics(fsdp), metrics(one)
    assert [row["step"] for row in rows_fsdp] == [row["step"] for row in rows_one]
    val = [(row["step"], row["val_reward"]) for row in rows_fsdp if "val_reward" in row]
    assert [step for step, _ in val] == [0, 2, 3]
    for a, b in zip(rows_fsdp, rows_one):
        for key in ("loss", "grad_norm", "val_reward"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    with open(fsdp / "final" / "mmalign.json") as f, open(one / "final" / "mmalign.json") as g:
        assert json.load(f)["step"] == json.load(g)["step"]

    # resume: the single-process step-2 checkpoint, continued by two FSDP2 processes
    os.makedirs(resumed / "checkpoints")
    # what an interrupted run leaves: step-2, the best-so-far snapshot (step 3 has moved it only if step 3 also
    # validates better, which the resumed run then repeats), and the metrics
    for folder in ("step-2", "best"):
        shutil.copytree(one / "checkpoints" / folder, resumed / "checkpoints" / folder)
    shutil.copy(one / "metrics.jsonl", resumed / "metrics.jsonl")
    args = validated_overrides(TOY_BASE, pairs_parquet, resumed, 2, "checkpoint.resume=latest")
    assert "resuming at step 2" in torchrun(2, ["--float64", "--fsdp2", *args, "log.progress=true"])
    assert checkpoint_difference(resumed, one, 3) <= 1e-6
    assert max_difference(load_file(resumed / lora), load_file(one / lora)) <= 1e-6
    assert [row["step"] for row in metrics(resumed)] == [row["step"] for row in rows_one]


@needs_gloo
def test_fsdp2_full_fine_tuning_shards_the_reference_and_exports_the_whole_unet(
    pixel_pipeline, pairs_parquet, tmp_path
):
    """Full fine-tuning under fsdp2.yaml: the frozen reference copy is sharded like the policy, and final/
    is a complete UNet folder gathered from the shards, equal to the single-process one."""
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    full = ["lora.enabled=false", "optim.lr=1e-4"]
    torchrun(2, ["--float64", "--fsdp2", *overrides(pixel_pipeline, pairs_parquet, fsdp, 2), *full])
    run_worker(["--float64", *overrides(pixel_pipeline, pairs_parquet, one, 4), *full])
    weights = "final/diffusion_pytorch_model.safetensors"
    exported, expected = load_file(fsdp / weights), load_file(one / weights)
    assert max_difference(exported, expected) <= 1e-6
    # trained for real: the exported UNet is not the base
    base = load_file(os.path.join(pixel_pipeline, "unet", "diffusion_pytorch_model.safetensors"))
    assert max(float((exported[k].double() - base[k].double()).abs().max()) for k in base) > 1e-6
    for a, b in zip(metrics(fsdp), metrics(one)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["ref_err_w"] == pytest.approx(b["ref_err_w"], rel=1e-6, abs=1e-7)


# -------------------------------------------------------------------------------------------- DeepSpeed

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')",
)


@needs_gloo
@needs_deepspeed
def test_deepspeed_zero2_run_equals_one_process_and_resumes_a_single_process_checkpoint(
    pairs_parquet, tmp_path
):
    """Under deepspeed_zero2.yaml the fp32 master weights and Adam moments are partitioned across the ranks
    inside DeepSpeed's optimizer, which also clips and accumulates. With the micro-batch, accumulation and
    clipping handed over from the mmalign config, the run is the single-process run: same validation rewards,
    whole-tensor checkpoints and exported LoRA; and a single-process checkpoint resumes under ZeRO."""
    zero, one, resumed = tmp_path / "zero", tmp_path / "one", tmp_path / "resumed"
    # DeepSpeed accumulates, clips and steps inside its backward; the lr schedule stays the recipe's own
    accumulate = [
        "optim.gradient_accumulation_steps=2",
        "optim.max_grad_norm=0.05",
        "optim.lr_scheduler=linear",
        "optim.warmup_steps=1",
    ]
    args = [*validated_overrides(TOY_BASE, pairs_parquet, zero, 1, *accumulate), "log.progress=true"]
    assert "2 processes (DeepSpeed ZeRO-2)" in torchrun(2, ["--float64", "--deepspeed", *args])
    run_worker(["--float64", *validated_overrides(TOY_BASE, pairs_parquet, one, 2, *accumulate)])

    lora = "final/pytorch_lora_weights.safetensors"
    assert max_difference(load_file(zero / lora), load_file(one / lora)) <= 1e-6
    assert checkpoint_difference(zero, one, 2) <= 1e-6 and checkpoint_difference(zero, one, 3) <= 1e-6
    rows_zero, rows_one = metrics(zero), metrics(one)
    assert [row["step"] for row in rows_zero] == [row["step"] for row in rows_one]
    # ZeRO keeps its master weights in fp32 even for a float64 model, and β = 5000 magnifies that rounding
    # in the loss: the metrics agree to 1e-4, the weights to 1e-6
    for a, b in zip(rows_zero, rows_one):
        for key in ("loss", "grad_norm", "val_reward"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert any(row.get("grad_norm", 0) > 0.05 for row in rows_one), "clipping should have been active"

    os.makedirs(resumed / "checkpoints")
    # what an interrupted run leaves: step-2, the best-so-far snapshot (step 3 has moved it only if step 3 also
    # validates better, which the resumed run then repeats), and the metrics
    for folder in ("step-2", "best"):
        shutil.copytree(one / "checkpoints" / folder, resumed / "checkpoints" / folder)
    shutil.copy(one / "metrics.jsonl", resumed / "metrics.jsonl")
    args = validated_overrides(TOY_BASE, pairs_parquet, resumed, 1, *accumulate, "checkpoint.resume=latest")
    assert "resuming at step 2" in torchrun(2, ["--float64", "--deepspeed", *args, "log.progress=true"])
    assert checkpoint_difference(resumed, one, 3) <= 1e-6
    assert max_difference(load_file(resumed / lora), load_file(one / lora)) <= 1e-6


@pytest.mark.parametrize("count, world", [(5, 2), (5, 3), (2, 4), (8, 4), (1, 1)])
def test_validation_shares_are_equal_and_rejoin_in_order(count, world):
    """Each rank samples an equal share (a sharded forward is collective); gathered in rank order and cut to
    ``count``, the shares are the prompts in their original order, each once."""
    from mmalign.distributed import rank_chunk

    shares = [rank_chunk(count, rank, world) for rank in range(world)]
    assert len({len(share) for share in shares}) == 1
    assert [i for share in shares for i in share][:count] == list(range(count))
