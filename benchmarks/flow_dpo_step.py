"""Flow-DPO micro-step of a Wan video transformer: time over its compute floor, peak memory over a supervised step.

Targets (as for the Diffusion-DPO step): a LoRA Flow-DPO step takes at most 1.15× its floor, and needs at most
1.25× the peak memory of a LoRA supervised step on the same batch (no second model copy).

The model is a real ``WanPipeline`` (random-init ``WanTransformer3DModel``, a small UMT5 text encoder, a tiny
``AutoencoderKLWan`` with Wan's 4× temporal / 8× spatial compression), saved with ``save_pretrained`` to a
temporary folder and loaded back through ``mmalign.adapters.flow.load_pipeline`` into a ``FlowAdapter``, as a
user's local weights are. The VAE never runs in a step: the batch holds latents (B, 16, F, H, W) directly; it is
there so that the media shape maps onto Wan's latent grid.

Variants, all on the same batch of B pairs (2B latents), the same LoRA policy (the config's defaults: r = 8 on
``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and the same AdamW optimizer, each ending with the trainer's
clipping, ``optimizer.step()`` and ``zero_grad``:

- ``dpo``: exactly ``preference.preference_step(adapter, network, reference, batch, cfg)`` with a real
  ``TrainConfig`` (loss ``dpo``) and ``reference = runtime.reference_of(network, None)`` (the policy with its
  LoRA disabled), then ``loss.mean().backward()``.
- ``floor``: the compute DPO cannot avoid, written directly with ``adapter.errors`` on inputs already
  concatenated to 2B: one no-grad forward of the LoRA-disabled transformer, then one policy forward + backward
  (``errors.mean().backward()``, no loss function).
- ``sft_2b`` (memory only): the supervised flow-matching loss of the policy on the same 2B latents, forward +
  backward.
- ``text`` (time only, for information): ``adapter.encode_prompts`` on the B captions (inside every variant).

Method (interleaved timing, peak RSS with ``VmHWM`` reset and a live-tensor-bytes cross-check in a fresh
subprocess per memory variant) and helpers are those of ``diffusion_dpo_step.py``.

    python benchmarks/flow_dpo_step.py                                    # tiny Wan, CPU, < 3 min
    python benchmarks/flow_dpo_step.py --model wan1.3b --dry-run          # build Wan-2.1-1.3B's shape only
    python benchmarks/flow_dpo_step.py --model wan1.3b --device cuda --dtype bf16 --batch 1 --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import diffusers
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusion_dpo_step import (
    DTYPES,
    MMAP_THRESHOLD,
    WORDS,
    LiveTensorBytes,
    _proc_status_kb,
    autocast,
    optimizer_state_bytes,
    param_bytes,
    quartiles,
    sync,
    table,
    verdict,
)
from transformers import UMT5Config, UMT5EncoderModel

from mmalign.adapters.flow import FlowAdapter, load_pipeline
from mmalign.config import TrainConfig
from mmalign.recipes import preference, runtime
from mmalign.toy.text import word_tokenizer

TIME_TARGET = 1.15
MEMORY_TARGET = 1.25
MEMORY_VARIANTS = ("dpo", "sft_2b")
TIMED = ("dpo", "floor", "text")

# WanTransformer3DModel configs. wan1.3b: Wan-AI/Wan2.1-T2V-1.3B-Diffusers' transformer/config.json.
TRANSFORMERS = {
    "tiny": {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 4,
        "attention_head_dim": 16,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 64,
        "freq_dim": 256,
        "ffn_dim": 256,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    },
    "wan1.3b": {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 12,
        "attention_head_dim": 128,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": 8960,
        "num_layers": 30,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    },
}
# media (frames, height, width) → latents (16, (frames − 1) / 4 + 1, height / 8, width / 8)
MEDIA = {"tiny": (17, 128, 128), "wan1.3b": (81, 480, 832)}  # latents (16, 5, 16, 16) / (16, 21, 60, 104)
TEXT_TOKENS = {"tiny": 16, "wan1.3b": 226}  # Wan pads the UMT5 condition to 226 tokens
DEFAULT_BATCH = {"tiny": 4, "wan1.3b": 1}


# ------------------------------------------------------------------------------------------------- models


def build_pipeline(transformer_config: dict, text_tokens: int) -> WanPipeline:
    """A WanPipeline of random-init components: the given transformer, a 1-layer UMT5 text encoder whose width
    is the transformer's ``text_dim`` (Wan's real one is UMT5-XXL, which only sets the condition's shape here),
    a tiny Wan VAE with Wan's compression (4× frames, 8× pixels), and a flow-matching Euler scheduler."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS, max_length=text_tokens, eos="</s>")
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=transformer_config["text_dim"],
            d_kv=32,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        )
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=WanTransformer3DModel(**transformer_config),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def save_pipeline(transformer_config: dict, text_tokens: int, folder: str) -> str:
    """Build the pipeline and write it to ``folder`` (``save_pretrained``); the model is freed before return."""
    pipe = build_pipeline(transformer_config, text_tokens)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    gc.collect()
    return folder


def quiet() -> None:
    """No progress bars and no per-call warnings from diffusers (``set_attention_backend`` warns every call)."""
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def load_adapter(folder: str, media_shape: tuple[int, ...]) -> FlowAdapter:
    """The FlowAdapter of the saved pipeline, through the same loader a user's local weights take."""
    return FlowAdapter(load_pipeline(folder), folder, media_shape=media_shape)


@dataclass
class Setup:
    adapter: FlowAdapter
    network: WanTransformer3DModel
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    batch: dict
    inputs_2b: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # latents, noise, timesteps, each with 2B rows
    attention: str
    latent_shape: tuple[int, ...]
    base_bytes: int

    def reference(self):
        """The reference context of a LoRA run (``runtime.Policy.reference``): the LoRA-disabled policy."""
        return runtime.reference_of(self.network, None)


def build_setup(
    folder: str, model: str, pairs: int, device: torch.device, gradient_checkpointing: bool
) -> Setup:
    """The trainer's LoRA setup (``runtime.Policy``'s steps, config defaults) on the saved pipeline, and one
    fixed batch of latents with per-pair noise and timesteps drawn by the adapter (``PairStream``'s way)."""
    cfg = TrainConfig()
    cfg.model.kind = "flow"
    cfg.optim.batch_size = pairs
    cfg.model.gradient_checkpointing = gradient_checkpointing
    adapter = load_adapter(folder, MEDIA[model])
    adapter.to(device)
    network = adapter.network.to(device)
    base_bytes = param_bytes(network)
    torch.manual_seed(cfg.optim.seed)
    lora = cfg.lora
    params = adapter.add_lora(
        network, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules
    )
    if gradient_checkpointing:
        network.enable_gradient_checkpointing()
    attention = runtime.resolve_attention(cfg.model.attention, device)
    adapter.set_attention(network, attention)
    network.train()
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
        weight_decay=cfg.optim.weight_decay,
    )
    latent_shape = adapter.family.latent_shape(adapter.pipe, adapter.media_shape())  # (C, F, H, W)
    rng = random.Random(0)
    draws = [adapter.draw(torch.Generator().manual_seed(k), torch.Size(latent_shape)) for k in range(pairs)]
    batch = {
        "captions": [" ".join(rng.choices(WORDS, k=6)) for _ in range(pairs)],
        "chosen": torch.randn(pairs, *latent_shape, device=device),  # (B, C, F, H, W)
        "rejected": torch.randn(pairs, *latent_shape, device=device),  # (B, C, F, H, W)
        "label": torch.ones(pairs, device=device),  # (B,)
        "noise": torch.stack([noise for noise, _ in draws]).to(device),  # (B, C, F, H, W)
        "timesteps": torch.stack([t for _, t in draws]).to(device),  # (B,)
    }
    inputs_2b = (
        torch.cat([batch["chosen"], batch["rejected"]]),  # (2B, C, F, H, W)
        torch.cat([batch["noise"], batch["noise"]]),  # (2B, C, F, H, W)
        torch.cat([batch["timesteps"], batch["timesteps"]]),  # (2B,)
    )
    return Setup(
        adapter, network, params, optimizer, cfg, batch, inputs_2b, attention, tuple(latent_shape), base_bytes
    )


def video_tokens(model: str, latent_shape: tuple[int, ...]) -> int:
    """Tokens per sample the transformer attends over: latent (F, H, W) over the (1, 2, 2) patch."""
    pt, ph, pw = TRANSFORMERS[model]["patch_size"]
    _, frames, height, width = latent_shape
    return (frames // pt) * (height // ph) * (width // pw)


# ----------------------------------------------------------------------------------------------- variants


def optimizer_step(s: Setup) -> None:
    """The trainer's step after backward: clip, step, zero_grad."""
    torch.nn.utils.clip_grad_norm_(s.params, s.cfg.optim.max_grad_norm)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


def dpo_step(s: Setup) -> None:
    stats = preference.preference_step(s.adapter, s.network, s.reference, s.batch, s.cfg)
    stats["loss"].mean().backward()
    optimizer_step(s)


def floor_step(s: Setup) -> None:
    latents, noise, timesteps = s.inputs_2b
    condition = s.adapter.encode_prompts(s.batch["captions"])  # {"encoder_hidden_states": (B, L, D)}
    condition = {key: torch.cat([value, value]) for key, value in condition.items()}  # (2B, L, D)
    with torch.no_grad():
        s.network.disable_adapters()
        s.adapter.errors(s.network, latents, noise, timesteps, condition)  # (2B,)
        s.network.enable_adapters()
    policy = s.adapter.errors(s.network, latents, noise, timesteps, condition)  # (2B,)
    policy.mean().backward()
    optimizer_step(s)


def sft_2b_step(s: Setup) -> None:
    latents, noise, timesteps = s.inputs_2b
    condition = s.adapter.encode_prompts(s.batch["captions"])
    condition = {key: torch.cat([value, value]) for key, value in condition.items()}  # (2B, L, D)
    errors = s.adapter.errors(s.network, latents, noise, timesteps, condition)  # (2B,)
    errors.mean().backward()
    optimizer_step(s)


def text_step(s: Setup) -> None:
    s.adapter.encode_prompts(s.batch["captions"])


STEPS = {"dpo": dpo_step, "floor": floor_step, "sft_2b": sft_2b_step, "text": text_step}


# ------------------------------------------------------------------------------------------ timing, memory


def time_variants(
    s: Setup, device: torch.device, dtype: str, repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU milliseconds per step, the variants interleaved in an order reversed every other
    round (dpo floor text, text floor dpo, …)."""
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


def measure_memory(variant: str, args: argparse.Namespace) -> dict:
    """Peak bytes one variant adds over its post-setup baseline: one warm step, then ``memory_steps`` more
    (``diffusion_dpo_step.measure_memory``'s method: CUDA allocator peak, or CPU peak RSS with VmHWM reset,
    then peak live tensor bytes over ``memory_steps`` further steps plus the optimizer state)."""
    device = torch.device(args.device)
    s = build_setup(args.pipeline_dir, args.model, args.batch, device, args.gradient_checkpointing)
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _proc_status_kb("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark (VmHWM) to the current RSS
    for _ in range(1 + args.memory_steps):
        with autocast(device, args.dtype):
            STEPS[variant](s)
    sync(device)
    if device.type == "cuda":
        growth = torch.cuda.max_memory_allocated(device) - baseline
        return {"variant": variant, "growth_bytes": growth, "tensor_bytes": growth}
    growth = _proc_status_kb("VmHWM") * 1024 - baseline
    tracker = LiveTensorBytes()
    with tracker:
        for _ in range(args.memory_steps):
            with autocast(device, args.dtype):
                STEPS[variant](s)
    return {
        "variant": variant,
        "growth_bytes": growth,
        "baseline_rss_bytes": baseline,
        "tensor_bytes": tracker.peak + optimizer_state_bytes(s.optimizer),
    }


def memory_in_subprocess(variant: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    command = [sys.executable, os.path.abspath(__file__), "--memory-variant", variant]
    for flag in ("model", "batch", "device", "dtype", "threads", "memory_steps", "pipeline_dir"):
        command += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    command.append(
        "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"
    )
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"memory run of {variant!r} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- report


def describe(s: Setup, model: str) -> dict:
    return {
        "transformer_params": sum(p.numel() for p in s.network.parameters() if not p.requires_grad),
        "lora_params": sum(p.numel() for p in s.params),
        "latent_shape": list(s.latent_shape),
        "media_shape": list(s.adapter.media_shape()),
        "video_tokens_per_sample": video_tokens(model, s.latent_shape),
        "text_tokens": TEXT_TOKENS[model],
        "attention": s.attention,
        "gradient_checkpointing": s.cfg.model.gradient_checkpointing,
    }


def environment(args: argparse.Namespace, device: torch.device, started: float) -> dict:
    return {
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
        "memory_method": "torch.cuda.max_memory_allocated over memory_allocated after setup"
        if device.type == "cuda"
        else "peak RSS (VmHWM reset by clear_refs) over post-setup RSS, "
        f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}; cross-check: peak live tensor bytes",
        "wall_s": round(time.perf_counter() - started, 1),
    }


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    started = time.perf_counter()
    memory = {name: memory_in_subprocess(name, args) for name in MEMORY_VARIANTS}
    s = build_setup(args.pipeline_dir, args.model, args.batch, device, args.gradient_checkpointing)
    times, cpu_times = time_variants(s, device, args.dtype, args.repeats, args.warmup)
    median = {name: statistics.median(values) for name, values in times.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu_times.items()}
    time_ratio = median["dpo"] / median["floor"]
    paired = [a / b for a, b in zip(times["dpo"], times["floor"])]
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
        "memory": memory,
        "memory_ratio_dpo_over_sft_2b": memory_ratio,
        "memory_tensor_ratio_dpo_over_sft_2b": tensor_ratio,
        "memory_target": MEMORY_TARGET,
        "memory_pass": memory_ratio <= MEMORY_TARGET and tensor_ratio <= MEMORY_TARGET,
        "reference_param_bytes": {"lora": 0, "full_finetuning": s.base_bytes},
        **describe(s, args.model),
        "env": environment(args, device, started),
    }


def header(result: dict) -> str:
    env = result["env"]
    return (
        f"model={env['model']} ({result['transformer_params'] / 1e6:.2f} M transformer params, LoRA "
        f"{result['lora_params'] / 1e3:.1f} k) latents={tuple(result['latent_shape'])} "
        f"({result['video_tokens_per_sample']} video + {result['text_tokens']} text tokens) "
        f"pairs={env['batch_pairs']} (2B={env['latents_per_forward']}) attention={result['attention']} "
        f"grad_ckpt={result['gradient_checkpointing']} dtype={env['dtype']} device={env['device']} "
        f"threads={env['threads']} torch={env['torch']} repeats={env['repeats']} "
        f"load={env['load_average_1min']:.1f}"
    )


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
    print(header(result))
    print(table(rows))
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
        f"{ref['full_finetuning']} ({ref['full_finetuning'] / 2**20:.1f} MiB, a frozen copy of the transformer)"
    )
    print(f"peak memory: {env['memory_method']}; wall {env['wall_s']} s")


def dry_run(args: argparse.Namespace) -> None:
    """Build and load the pipeline, the LoRA policy and the batch; run one step of each variant unless the
    model is wan1.3b on a CPU (minutes per step there)."""
    device = torch.device(args.device)
    started = time.perf_counter()
    s = build_setup(args.pipeline_dir, args.model, args.batch, device, args.gradient_checkpointing)
    info = describe(s, args.model)
    print(json.dumps({"model": args.model, **info, "built_s": round(time.perf_counter() - started, 1)}))
    if args.model == "wan1.3b" and device.type == "cpu":
        print("dry run: wan1.3b built and loaded; steps skipped on CPU")
        return
    for name in ("dpo", "floor", "sft_2b", "text"):
        begin = time.perf_counter()
        with autocast(device, args.dtype):
            STEPS[name](s)
        sync(device)
        print(f"dry run: {name} step ran in {(time.perf_counter() - begin) * 1e3:.0f} ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(TRANSFORMERS), default="tiny")
    parser.add_argument(
        "--batch", type=int, help="pairs per micro-batch, 2B latents per forward (default 4 tiny, 1 wan1.3b)"
    )
    parser.add_argument("--repeats", type=int, default=40, help="measured steps per timed variant")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per timed variant first")
    parser.add_argument(
        "--memory-steps", type=int, default=3, help="measured memory steps after the warm one"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: reproducible on a busy box)"
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the transformer's gradient checkpointing (default: on for wan1.3b, off for tiny)",
    )
    parser.add_argument("--dry-run", action="store_true", help="build and check the setup, measure nothing")
    parser.add_argument("--out", default="benchmarks/results/flow_dpo_step.json")
    parser.add_argument("--pipeline-dir", help=argparse.SUPPRESS)
    parser.add_argument("--memory-variant", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error(
            f"--repeats must be at least 2 (medians and quartiles of the interleaved runs), got {args.repeats}"
        )
    if args.batch is None:
        args.batch = DEFAULT_BATCH[args.model]
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.model == "wan1.3b"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    if args.memory_variant is not None:
        print(json.dumps(measure_memory(args.memory_variant, args)))
        return
    folder = tempfile.mkdtemp(prefix=f"flow_dpo_{args.model}_")
    try:
        args.pipeline_dir = save_pipeline(TRANSFORMERS[args.model], TEXT_TOKENS[args.model], folder)
        if args.dry_run:
            dry_run(args)
            return
        result = run(args)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_report(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
