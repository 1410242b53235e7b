"""Diffusion-DPO micro-step: time over its compute floor, and peak memory over a supervised step.

Targets: a LoRA DPO step takes at most 1.15× its floor, and needs at most 1.25× the peak memory of a LoRA
supervised step on the same batch (no second model copy); the trainer's whole loop step (data, randomness, step,
logging) takes at most 1.10× the floor at the default ``log.every`` and 1.15× at ``log.every=1``.

Variants, all on the same batch of B pairs (2B latents), the same LoRA policy and the same optimizer:

- ``dpo``: exactly what the trainer runs per micro-batch: ``preference.preference_step`` with a real
  ``TrainConfig`` (loss ``dpo``, β = 5000), ``loss.mean().backward()``, gradient clipping, ``optimizer.step()``,
  ``zero_grad``.
- ``floor``: the compute DPO cannot avoid: one no-grad forward of the LoRA-disabled UNet on the 2B latents,
  then one policy forward + backward on the same 2B inputs (the trainer's order), written directly with
  ``diffusion.denoising_errors``; no loss function, inputs already concatenated; the same clipping and optimizer
  step.
- ``sft_2b`` (memory only): the supervised denoising loss of the policy on the same 2B latents (both members),
  forward + backward + the same optimizer step.
- ``text`` (time only, for information): ``diffusion.encode_prompts`` on the B captions.

Text encoding is inside every step: ``preference_step`` encodes its captions (the trainer's captions change every
step, caption dropout included), so the floor and the supervised step encode the same B captions once too.
Building the batch (``build_batch``: latent cache, noise, timesteps) is outside every step.

Time: one process, ``torch.set_num_threads(1)`` by default, the variants interleaved after warm-up (dpo, floor,
text, then text, floor, dpo, …: the order flips every repeat); medians of wall time and their ratio (the target),
plus the quartiles of the per-repeat ratios and, on CPU, the same medians of process CPU time, which leave out
the time other processes hold the core.

Whole loop (``--no-loop`` skips it): ``preference.train`` itself, on a Stable Diffusion pipeline folder (the
same UNet and text tower, a VAE, DDPM) and a Pick-a-Pic parquet of noise PNGs written to a temporary folder, with
the trainer's defaults (validation and evaluation off); after each of its steps one ``floor`` step runs, so the
two see the same load, and the loop step is timed from the end of one trainer step to the end of the next, less
that floor step (``time_loop``). Three runs: ``log.every`` 10 (the default) and 1, and, for information,
``data.cache_latents=false`` (each step decodes and encodes its pairs, as diffusers' example script does).

Peak memory: each variant in a fresh subprocess, one warm step and ``--memory-steps`` more, the growth over the
post-setup baseline. CUDA: ``max_memory_allocated`` minus ``memory_allocated`` after setup
(``reset_peak_memory_stats`` in between). CPU: peak RSS minus RSS after setup; the peak is the kernel's
high-water mark (``VmHWM``), reset after setup through ``/proc/self/clear_refs``, and glibc's mmap threshold is
pinned at 64 KiB so that every buffer of 64 KiB or more goes back to the kernel when freed and RSS follows the
live tensors instead of allocator caching. As a cross-check on CPU, the peak of live tensor storage counted op
by op (a ``TorchDispatchMode``). Each counts what the step adds on top of the weights: activations, gradients,
AdamW state and, were there one, a reference copy.

    python benchmarks/diffusion_dpo_step.py                                   # tiny UNet, CPU, < 3 min
    python benchmarks/diffusion_dpo_step.py --model sd15 --device cuda --dtype bf16 --batch 4
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from mmalign.adapters import diffusion
from mmalign.config import TrainConfig, load_config
from mmalign.data.pickapic import write_pickapic_parquet
from mmalign.recipes import preference, runtime
from mmalign.toy.text import clip_text_encoder, word_tokenizer

TIME_TARGET = 1.15
LOOP_TARGETS = {10: 1.10, 1: 1.15}  # whole-loop step / floor, by log.every (10 is the default)
MEMORY_TARGET = 1.25
WORDS = ["a", "red", "green", "blue", "circle", "square", "cat", "dog", "on", "the", "left", "right"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MEMORY_VARIANTS = ("dpo", "sft_2b")
MMAP_THRESHOLD = 65536


# ------------------------------------------------------------------------------------------------- models


def build_unet(model: str) -> UNet2DConditionModel:
    """tiny: a 3.2 M-parameter UNet shaped like SD's (attention down to the full 32×32 latent grid);
    sd15: SD 1.5's UNet config (860 M parameters). Random init, nothing downloaded."""
    down = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    if model == "tiny":
        return UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 128),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=down[1:],
            up_block_types=up[:-1],
            cross_attention_dim=64,
            attention_head_dim=(1, 2, 4),  # heads per block (diffusers' legacy name): 32 channels per head
        )
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def build_text_encoder(model: str) -> tuple[CLIPTextModel, PreTrainedTokenizerFast]:
    """A word-level tokenizer and a CLIP text model: 2 small layers (tiny) or SD 1.5's ViT-L/14 text tower shape."""
    tokenizer = word_tokenizer(WORDS, max_length=16 if model == "tiny" else 77)
    if model == "tiny":
        encoder = clip_text_encoder(tokenizer, hidden=64, layers=2, heads=4)
    else:
        encoder = clip_text_encoder(tokenizer, hidden=768, intermediate=3072, layers=12, heads=12)
    return encoder.requires_grad_(False).eval(), tokenizer


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass
class Setup:
    components: diffusion.Components
    unet: UNet2DConditionModel
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    batch: dict
    inputs_2b: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # latents, noise, timesteps, each with 2B rows
    base_bytes: int


def build_setup(model: str, pairs: int, device: torch.device) -> Setup:
    """The trainer's LoRA setup (config defaults) on random-init components, and one fixed batch."""
    torch.manual_seed(0)
    cfg = TrainConfig()
    cfg.optim.batch_size = pairs
    unet = build_unet(model)
    base_bytes = param_bytes(unet)
    text_encoder, tokenizer = build_text_encoder(model)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    components = diffusion.Components(unet, scheduler, text_encoder.to(device), tokenizer)
    unet.to(device)
    lora = cfg.lora
    params = diffusion.add_lora(
        unet, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules
    )
    unet.train()
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
        weight_decay=cfg.optim.weight_decay,
    )
    shape = (pairs, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    rng = random.Random(0)
    batch = {
        "captions": [" ".join(rng.choices(WORDS, k=6)) for _ in range(pairs)],
        "chosen": torch.randn(shape, device=device),  # (B, C, H, W)
        "rejected": torch.randn(shape, device=device),  # (B, C, H, W)
        "label": torch.ones(pairs, device=device),  # (B,)
        "noise": torch.randn(shape, device=device),  # (B, C, H, W)
        "timesteps": torch.randint(0, 1000, (pairs,), device=device),  # (B,)
    }
    inputs_2b = (
        torch.cat([batch["chosen"], batch["rejected"]]),  # (2B, C, H, W)
        torch.cat([batch["noise"], batch["noise"]]),  # (2B, C, H, W)
        torch.cat([batch["timesteps"], batch["timesteps"]]),  # (2B,)
    )
    return Setup(components, unet, params, optimizer, cfg, batch, inputs_2b, base_bytes)


# ----------------------------------------------------------------------------------------------- variants


def optimizer_step(s: Setup) -> None:
    """The trainer's step 8 after backward: clip, step, zero_grad."""
    torch.nn.utils.clip_grad_norm_(s.params, s.cfg.optim.max_grad_norm)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


def dpo_step(s: Setup) -> None:
    adapter = diffusion.DiffusionAdapter(s.components, "")
    reference = functools.partial(runtime.reference_of, s.unet, None)
    stats = preference.preference_step(adapter, s.unet, reference, s.batch, s.cfg)
    stats["loss"].mean().backward()
    optimizer_step(s)


def floor_step(s: Setup) -> None:
    latents, noise, timesteps = s.inputs_2b
    hidden, added = diffusion.encode_prompts(s.components, s.batch["captions"])  # (B, L, D)
    hidden = torch.cat([hidden, hidden])  # (2B, L, D)
    scheduler = s.components.scheduler
    # the reference first, as the trainer runs it: its activations are gone before the policy's are kept
    with torch.no_grad():
        s.unet.disable_adapters()
        diffusion.denoising_errors(s.unet, scheduler, latents, noise, timesteps, hidden, added)  # (2B,)
        s.unet.enable_adapters()
    policy = diffusion.denoising_errors(s.unet, scheduler, latents, noise, timesteps, hidden, added)  # (2B,)
    policy.mean().backward()
    optimizer_step(s)


def sft_2b_step(s: Setup) -> None:
    latents, noise, timesteps = s.inputs_2b
    hidden, added = diffusion.encode_prompts(s.components, s.batch["captions"])  # (B, L, D)
    hidden = torch.cat([hidden, hidden])  # (2B, L, D)
    errors = diffusion.denoising_errors(
        s.unet, s.components.scheduler, latents, noise, timesteps, hidden, added
    )
    errors.mean().backward()
    optimizer_step(s)


def text_step(s: Setup) -> None:
    diffusion.encode_prompts(s.components, s.batch["captions"])


STEPS = {"dpo": dpo_step, "floor": floor_step, "sft_2b": sft_2b_step, "text": text_step}
TIMED = ("dpo", "floor", "text")


def autocast(device: torch.device, dtype: str):
    """bf16 runs as the trainer's ``optim.mixed_precision=bf16`` does: fp32 weights under autocast."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------- timing


def time_variants(
    s: Setup, device: torch.device, dtype: str, repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU milliseconds per step of each timed variant.

    The variants are interleaved so that load changes hit all of them alike, in an order reversed every other
    repeat (A B C C B A …) so that none always runs right after the same neighbour. With one thread, CPU time
    leaves out the time other processes hold the core.
    """
    wall: dict[str, list[float]] = {name: [] for name in TIMED}
    cpu: dict[str, list[float]] = {name: [] for name in TIMED}
    for i in range(warmup + repeats):
        for name in TIMED if i % 2 == 0 else TIMED[::-1]:
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            with autocast(device, dtype):
                STEPS[name](s)
            sync(device)
            if i >= warmup:
                wall[name].append((time.perf_counter() - start) * 1e3)
                cpu[name].append((time.process_time() - start_cpu) * 1e3)
    return wall, cpu


# ------------------------------------------------------------------------------------------------- memory


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage created under the mode and still alive; ``peak`` is their high-water mark.

    Every aten op's outputs pass through ``__torch_dispatch__``, backward and optimizer ops included; a storage
    counts from the op that creates it until its last reference goes. Storages alive when the mode starts
    (weights, optimizer state, the batch) never count, though views of them (``weight.t()`` inside a linear
    layer) and in-place ops on them come out of ops too.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()
        self._existing = {
            obj.untyped_storage().data_ptr()
            for obj in gc.get_objects()
            if issubclass(type(obj), torch.Tensor)
        }

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen or key in self._existing:
                continue
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def measure_memory(
    variant: str, model: str, pairs: int, device: torch.device, dtype: str, steps: int
) -> dict:
    """Peak bytes one variant adds over its post-setup baseline: one warm step, then ``steps`` more.

    CUDA: the caching allocator's peak of allocated tensor bytes. CPU: the process's peak RSS (first pass),
    then the peak of live tensor bytes counted op by op (second pass, ``steps`` more steps), to which the
    optimizer state created in the first pass is added.
    """
    s = build_setup(model, pairs, device)
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _proc_status_kb("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark (VmHWM, ru_maxrss) to the current RSS
    for _ in range(1 + steps):
        with autocast(device, dtype):
            STEPS[variant](s)
    sync(device)
    if device.type == "cuda":
        growth = torch.cuda.max_memory_allocated(device) - baseline
        return {"variant": variant, "growth_bytes": growth, "tensor_bytes": growth}
    growth = _proc_status_kb("VmHWM") * 1024 - baseline
    tracker = LiveTensorBytes()
    with tracker:
        for _ in range(steps):
            with autocast(device, dtype):
                STEPS[variant](s)
    tensor_bytes = tracker.peak + optimizer_state_bytes(s.optimizer)
    return {
        "variant": variant,
        "growth_bytes": growth,
        "baseline_rss_bytes": baseline,
        "tensor_bytes": tensor_bytes,
    }


def memory_in_subprocess(variant: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    command = [sys.executable, os.path.abspath(__file__), "--memory-variant", variant]
    for flag in ("model", "batch", "device", "dtype", "threads", "memory_steps"):
        command += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"memory run of {variant!r} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- whole loop


def build_vae(model: str) -> AutoencoderKL:
    """tiny: two blocks, pixels at twice the latent grid (64 px for 32×32 latents); sd15: SD's VAE config (8×)."""
    if model == "tiny":
        blocks, channels, groups, size = 2, [32, 64], 8, 64
    else:
        blocks, channels, groups, size = 4, [128, 256, 512, 512], 32, 512
    return AutoencoderKL(
        block_out_channels=channels,
        norm_num_groups=groups,
        latent_channels=4,
        layers_per_block=1 if model == "tiny" else 2,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        sample_size=size,
    )


def write_run_inputs(model: str, root: str, pairs: int) -> tuple[str, str]:
    """What a user's run reads: a Stable Diffusion pipeline folder (the benchmark's UNet and text tower, a VAE,
    DDPM) and a Pick-a-Pic parquet of ``pairs`` rows, two noise PNGs each at the pipeline's resolution."""
    torch.manual_seed(0)
    unet = build_unet(model)
    text_encoder, tokenizer = build_text_encoder(model)
    vae = build_vae(model)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    pipeline = os.path.join(root, "pipeline")
    diffusion.save_components(diffusion.Components(unet, scheduler, text_encoder, tokenizer, vae), pipeline)
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    pixels, words = np.random.default_rng(0), random.Random(0)

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = [(" ".join(words.choices(WORDS, k=6)), png(), png(), float(i % 2)) for i in range(pairs)]
    data = os.path.join(root, "pairs.parquet")
    write_pickapic_parquet(data, rows)
    return pipeline, data


def time_loop(
    s: Setup,
    pipeline: str,
    data: str,
    out: str,
    args: argparse.Namespace,
    *,
    log_every: int,
    cache: bool = True,
) -> dict:
    """Whole-loop steps of ``preference.train`` itself on ``pipeline`` and ``data``, each followed by one timed
    ``floor`` step on the setup ``s`` (the same UNet shape, batch and LoRA), so that both see the same load.

    A loop step is the time from the end of one trainer step (after its ``Run.end_step``: lr schedule, metrics,
    TensorBoard, progress) to the end of the next, less the floor step run in between: the stream position, the
    batch (cached latents, noise, timesteps, dropout), the DPO step, backward, clipping, the NaN check, the
    optimizer and the logging. The config is the trainer's defaults (TensorBoard and progress on, checkpoints
    every 100 steps) with validation and evaluation off; the last step, which writes the final checkpoint, is
    not timed. ``cache`` false encodes the pairs inside every step, as diffusers' example script does."""
    device = torch.device(args.device)
    steps = args.warmup + args.repeats + 1
    overrides = [
        f"model.path={pipeline}",
        "data.format=pickapic",
        f"data.path={data}",
        f"data.cache_latents={str(cache).lower()}",
        f"output_dir={out}",
        "loss.name=dpo",
        "loss.beta=5000",
        f"optim.batch_size={args.batch}",
        f"optim.max_steps={steps}",
        f"log.every={log_every}",
        "validation.every=0",
        "eval.enabled=false",
        "toy.enabled=false",
    ]
    if args.dtype == "bf16":
        overrides.append("optim.mixed_precision=bf16")
    cfg = load_config(None, overrides)
    times: dict[str, list[float]] = {"step": [], "step_cpu": [], "floor": [], "floor_cpu": []}
    mark: dict[str, float] = {}
    end_step, encode_ahead = runtime.Run.end_step, runtime.Run.encode_ahead

    def timed_end_step(run, done):
        end_step(run, done)
        sync(device)
        if "wall" in mark:
            times["step"].append((time.perf_counter() - mark["wall"]) * 1e3)
            times["step_cpu"].append((time.process_time() - mark["cpu"]) * 1e3)
        start, start_cpu = time.perf_counter(), time.process_time()
        with autocast(device, args.dtype):
            floor_step(s)
        sync(device)
        times["floor"].append((time.perf_counter() - start) * 1e3)
        times["floor_cpu"].append((time.process_time() - start_cpu) * 1e3)
        mark["wall"], mark["cpu"] = time.perf_counter(), time.process_time()

    def timed_encode_ahead(run, source):
        start = time.perf_counter()
        mark["encoded"] = encode_ahead(run, source)
        mark["encode_s"] = time.perf_counter() - start
        return mark["encoded"]

    runtime.Run.end_step, runtime.Run.encode_ahead = timed_end_step, timed_encode_ahead
    try:
        preference.train(cfg)
    finally:
        runtime.Run.end_step, runtime.Run.encode_ahead = end_step, encode_ahead
    # steps 2 … N were timed: keep steps warmup + 1 … N − 1, and the floors run right after steps warmup … N − 1
    kept = {key: values[args.warmup - 1 : args.warmup - 1 + args.repeats] for key, values in times.items()}
    kept["floor"] = times["floor"][args.warmup : args.warmup + args.repeats]
    kept["floor_cpu"] = times["floor_cpu"][args.warmup : args.warmup + args.repeats]
    median = {key: statistics.median(values) for key, values in kept.items()}
    return {
        "log_every": log_every,
        "cache_latents": cache,
        "step_ms": {"median": median["step"], "all": kept["step"]},
        "floor_ms": {"median": median["floor"], "all": kept["floor"]},
        "ratio": median["step"] / median["floor"],
        "cpu_ratio": median["step_cpu"] / median["floor_cpu"],
        "paired_ratio_quartiles": quartiles([a / b for a, b in zip(kept["step"], kept["floor"])]),
        "target": LOOP_TARGETS.get(log_every) if cache else None,
        "encode_ahead_s": mark.get("encode_s"),
        "pairs_encoded_ahead": mark.get("encoded", 0),
    }


def time_loops(s: Setup, args: argparse.Namespace) -> list[dict]:
    """The loop at the default ``log.every`` (10), at ``log.every=1``, and without the latent cache."""
    with tempfile.TemporaryDirectory(prefix="mmalign-loop-inputs-") as root:
        pipeline, data = write_run_inputs(args.model, root, args.loop_pairs)
        runs = {"default": (10, True), "log_every_1": (1, True), "not_cached": (10, False)}
        return [
            time_loop(s, pipeline, data, os.path.join(root, name), args, log_every=every, cache=cache)
            for name, (every, cache) in runs.items()
        ]


# ------------------------------------------------------------------------------------------------- report


def verdict(ratio: float, target: float) -> str:
    return "pass" if ratio <= target else "FAIL"


def quartiles(values: list[float]) -> tuple[float, float, float]:
    low, mid, high = statistics.quantiles(values, n=4)
    return low, mid, high


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    started = time.perf_counter()
    memory = {name: memory_in_subprocess(name, args) for name in MEMORY_VARIANTS}
    s = build_setup(args.model, args.batch, device)
    times, cpu_times = time_variants(s, device, args.dtype, args.repeats, args.warmup)
    median = {name: statistics.median(values) for name, values in times.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu_times.items()}
    time_ratio = median["dpo"] / median["floor"]
    paired = [a / b for a, b in zip(times["dpo"], times["floor"])]
    loops = [] if args.no_loop else time_loops(s, args)
    memory_ratio = memory["dpo"]["growth_bytes"] / memory["sft_2b"]["growth_bytes"]
    tensor_ratio = memory["dpo"]["tensor_bytes"] / memory["sft_2b"]["tensor_bytes"]
    return {
        "time_ms": {name: {"median": median[name], "all": times[name]} for name in TIMED},
        "cpu_time_ms": {name: {"median": cpu_median[name], "all": cpu_times[name]} for name in TIMED},
        "time_ratio_dpo_over_floor": time_ratio,
        "cpu_time_ratio_dpo_over_floor": cpu_median["dpo"] / cpu_median["floor"],
        "time_paired_ratio_quartiles": quartiles(paired),
        "time_target": TIME_TARGET,
        "time_pass": time_ratio <= TIME_TARGET,
        "loop": loops,
        "loop_pass": all(loop["ratio"] <= loop["target"] for loop in loops if loop["target"]),
        "memory": memory,
        "memory_ratio_dpo_over_sft_2b": memory_ratio,
        "memory_tensor_ratio_dpo_over_sft_2b": tensor_ratio,
        "memory_target": MEMORY_TARGET,
        "memory_pass": memory_ratio <= MEMORY_TARGET and tensor_ratio <= MEMORY_TARGET,
        "reference_param_bytes": {"lora": 0, "full_finetuning": s.base_bytes},
        "unet_params": sum(p.numel() for p in s.unet.parameters() if not p.requires_grad),
        "lora_params": sum(p.numel() for p in s.params),
        "env": {
            "torch": torch.__version__,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "cpu": platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "threads": torch.get_num_threads(),
            "model": args.model,
            "batch_pairs": args.batch,
            "latents_per_forward": 2 * args.batch,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "memory_steps": args.memory_steps,
            "loop_pairs": args.loop_pairs,
            "memory_method": "torch.cuda.max_memory_allocated over memory_allocated after setup"
            if device.type == "cuda"
            else "peak RSS (VmHWM reset by clear_refs) over post-setup RSS, "
            f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}; cross-check: peak live tensor bytes",
            "wall_s": round(time.perf_counter() - started, 1),
        },
    }


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def print_report(result: dict) -> None:
    t, m, env = result["time_ms"], result["memory"], result["env"]
    mb = {name: m[name]["growth_bytes"] / 2**20 for name in MEMORY_VARIANTS}
    time_ratio, memory_ratio = result["time_ratio_dpo_over_floor"], result["memory_ratio_dpo_over_sft_2b"]
    floor_ms = t["floor"]["median"]
    rows = [
        ["variant", "median ms", "time ratio", "peak MiB", "memory ratio", "target", "result"],
        [
            "dpo (preference_step)",
            f"{t['dpo']['median']:.1f}",
            f"{time_ratio:.3f}",
            f"{mb['dpo']:.1f}",
            f"{memory_ratio:.3f}",
            f"time ≤ {TIME_TARGET}, memory ≤ {MEMORY_TARGET}",
            f"time {verdict(time_ratio, TIME_TARGET)}, memory {verdict(memory_ratio, MEMORY_TARGET)}",
        ],
        ["floor (2B ref fwd, 2B fwd+bwd)", f"{floor_ms:.1f}", "1.000", "—", "—", "time baseline", ""],
        ["sft_2b (2B fwd+bwd)", "—", "—", f"{mb['sft_2b']:.1f}", "1.000", "memory baseline", ""],
        [
            "text encoding (inside each)",
            f"{t['text']['median']:.1f}",
            f"{t['text']['median'] / floor_ms:.3f}",
            "—",
            "—",
            "information",
            "",
        ],
    ]
    print(
        f"model={env['model']} ({result['unet_params'] / 1e6:.2f} M UNet params, LoRA "
        f"{result['lora_params'] / 1e3:.1f} k) pairs={env['batch_pairs']} (2B={env['latents_per_forward']}) "
        f"dtype={env['dtype']} device={env['device']} threads={env['threads']} torch={env['torch']} "
        f"repeats={env['repeats']} load={env['load_average_1min']:.1f}"
    )
    print(table(rows))
    if result["loop"]:
        print_loop_report(result["loop"], env)
    low, mid, high = result["time_paired_ratio_quartiles"]
    print(f"time: dpo/floor per interleaved repeat, quartiles {low:.3f} / {mid:.3f} / {high:.3f}")
    if env["device"] == "cpu":
        c = result["cpu_time_ms"]
        print(
            f"time, process CPU ms (other processes' share of the core left out): dpo {c['dpo']['median']:.1f}, "
            f"floor {c['floor']['median']:.1f}, ratio {result['cpu_time_ratio_dpo_over_floor']:.3f}"
        )
        tensor = {name: m[name]["tensor_bytes"] / 2**20 for name in MEMORY_VARIANTS}
        print(
            f"memory cross-check, peak live tensor bytes: dpo {tensor['dpo']:.1f} MiB, sft_2b "
            f"{tensor['sft_2b']:.1f} MiB, ratio {result['memory_tensor_ratio_dpo_over_sft_2b']:.3f} "
            f"({verdict(result['memory_tensor_ratio_dpo_over_sft_2b'], MEMORY_TARGET)})"
        )
    ref = result["reference_param_bytes"]
    print(
        f"reference parameter bytes: LoRA {ref['lora']} (the adapter-disabled policy); full fine-tuning "
        f"{ref['full_finetuning']} ({ref['full_finetuning'] / 2**20:.1f} MiB, a frozen copy of the UNet)"
    )
    print(f"peak memory: {env['memory_method']}; wall {env['wall_s']} s")


def print_loop_report(loops: list[dict], env: dict) -> None:
    rows = [
        [
            "whole loop step (preference.train)",
            "median ms",
            "floor ms",
            "ratio",
            "CPU-time ratio",
            "target",
            "result",
        ]
    ]
    for loop in loops:
        what = f"log.every={loop['log_every']}" + ("" if loop["cache_latents"] else ", latents not cached")
        target = loop["target"]
        rows.append(
            [
                what,
                f"{loop['step_ms']['median']:.1f}",
                f"{loop['floor_ms']['median']:.1f}",
                f"{loop['ratio']:.3f}",
                f"{loop['cpu_ratio']:.3f}",
                f"≤ {target}" if target else "information",
                verdict(loop["ratio"], target) if target else "",
            ]
        )
    print(
        f"whole loop: {env['loop_pairs']}-pair Pick-a-Pic parquet of PNGs through a VAE, trainer defaults, one floor "
        "step after each trainer step"
    )
    print(table(rows))
    ahead = loops[0]
    if ahead["pairs_encoded_ahead"]:
        print(
            f"encoded ahead, before step 0: {ahead['pairs_encoded_ahead']} pairs in {ahead['encode_ahead_s']:.2f} s "
            f"({ahead['encode_ahead_s'] / ahead['pairs_encoded_ahead'] * 1e3:.1f} ms per pair)"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--batch", type=int, default=4, help="pairs per micro-batch (2B latents per forward)")
    parser.add_argument("--repeats", type=int, default=20, help="measured steps per timed variant")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per timed variant first")
    parser.add_argument(
        "--memory-steps", type=int, default=3, help="measured memory steps after the warm one"
    )
    parser.add_argument(
        "--loop-pairs", type=int, default=64, help="pairs in the whole-loop run's parquet (each encoded once)"
    )
    parser.add_argument("--no-loop", action="store_true", help="skip the whole-loop runs of preference.train")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: reproducible on a busy box)"
    )
    parser.add_argument("--out", default="benchmarks/results/diffusion_dpo_step.json")
    parser.add_argument("--memory-variant", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error(
            f"--repeats must be at least 2 (medians and quartiles of the interleaved runs), got {args.repeats}"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_variant is not None:
        result = measure_memory(
            args.memory_variant,
            args.model,
            args.batch,
            torch.device(args.device),
            args.dtype,
            args.memory_steps,
        )
        print(json.dumps(result))
        return
    result = run(args)
    print_report(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
