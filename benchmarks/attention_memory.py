"""Peak memory of one forward + backward of a tiny Wan video transformer at 1×, 2× and 4× the video tokens, for
each attention backend that ``model.attention`` can select (``FlowAdapter.set_attention``).

Targets: the default backend (what ``model.attention: auto`` resolves to here, ``sdpa`` on a CPU) grows at most
5× from 1× to 4× the tokens (linear in the tokens, plus slack), while ``math``, which materialises the
(heads, N, N) score matrix of every layer, grows markedly faster (quadratic).

The model: a ``WanPipeline`` built and saved as in ``flow_dpo_step.py``, its transformer a 2-layer
``WanTransformer3DModel`` with 2 heads × 32 channels, loaded back through ``load_pipeline`` into a
``FlowAdapter``. One sample of latents (1, 16, F, 64, 64): 32 × 32 patches per latent frame, so F = 2, 4, 8
gives 2,048, 4,096 and 8,192 video tokens. A pass is ``adapter.errors(...).mean().backward()`` with every
transformer weight trainable (full fine-tuning; no optimizer), fp32 or bf16 autocast over fp32 weights.

Backends: ``sdpa``, ``math``, ``flash`` and, on CUDA where it imports, ``xformers``. Each (backend, size) runs
in a fresh subprocess: load, ``set_attention``, one unmeasured warm pass (so one-time costs — code pages,
thread pools, kernel caches — sit in the baseline and do not dilute the growth), then the measured pass.

Peak memory, the method of ``diffusion_dpo_step.py``: CUDA ``max_memory_allocated`` over ``memory_allocated``
before the measured pass; CPU peak RSS (``VmHWM`` reset through ``/proc/self/clear_refs``) over the RSS before
it, glibc's mmap threshold pinned at 64 KiB; cross-check, the peak of live tensor bytes counted op by op over one
more pass, which also records the attention kernels (aten ops) that ran — what torch's SDPA dispatch picked.

    python benchmarks/attention_memory.py                                          # CPU, fp32, < 3 min
    python benchmarks/attention_memory.py --device cuda --dtype bf16 --base-frames 8
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from diffusion_dpo_step import DTYPES, MMAP_THRESHOLD, LiveTensorBytes, _proc_status_kb, autocast, sync, table
from flow_dpo_step import load_adapter, quiet, save_pipeline

from mmalign.recipes import runtime

GROWTH_TARGET = 5.0
SCALES = (1, 2, 4)
TRANSFORMER = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 128,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
TEXT_TOKENS = 16
LATENT_SIZE = 64  # latent height = width: 32 × 32 patches per latent frame
CAPTION = "a red square on the left"


def backends(device: torch.device) -> list[str]:
    """The ``model.attention`` choices to measure here: xformers only where it imports and on CUDA."""
    names = ["sdpa", "math", "flash"]
    if device.type == "cuda" and runtime._xformers_importable():
        names.append("xformers")
    return names


def latent_shape(frames: int) -> tuple[int, int, int, int]:
    return (TRANSFORMER["in_channels"], frames, LATENT_SIZE, LATENT_SIZE)  # (C, F, H, W)


def video_tokens(frames: int) -> int:
    pt, ph, pw = TRANSFORMER["patch_size"]
    return (frames // pt) * (LATENT_SIZE // ph) * (LATENT_SIZE // pw)


class KernelsAndBytes(LiveTensorBytes):
    """Peak live tensor bytes (the parent's count), and how often each attention-related aten op ran."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "attention" in name or "softmax" in name or name == "bmm":
            self.ops[name] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


# ------------------------------------------------------------------------------------------- one subprocess


def measure(backend: str, frames: int, folder: str, device: torch.device, dtype: str) -> dict:
    """Peak bytes of one forward + backward over the baseline after setup and a warm pass."""
    media = (4 * (frames - 1) + 1, 8 * LATENT_SIZE, 8 * LATENT_SIZE)  # Wan VAE: 4× frames, 8× pixels
    adapter = load_adapter(folder, media)
    adapter.to(device)
    network = adapter.network.to(device)
    adapter.set_attention(network, backend)
    network.requires_grad_(True).train()
    shape = adapter.family.latent_shape(adapter.pipe, adapter.media_shape())
    assert tuple(shape) == latent_shape(frames), (shape, frames)
    noise, t = adapter.draw(torch.Generator().manual_seed(0), torch.Size(shape))
    latents = torch.randn(1, *shape, device=device)  # (1, C, F, H, W)
    noise, timesteps = noise[None].to(device), t[None].to(device)  # (1, C, F, H, W), (1,)
    condition = adapter.encode_prompts([CAPTION])  # {"encoder_hidden_states": (1, L, D)}

    def one_pass() -> None:
        with autocast(device, dtype):
            errors = adapter.errors(network, latents, noise, timesteps, condition)  # (1,)
        errors.mean().backward()
        network.zero_grad(set_to_none=True)

    one_pass()  # warm: one-time allocations and code pages go into the baseline
    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _proc_status_kb("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark (VmHWM) to the current RSS
    start = time.process_time()
    one_pass()
    sync(device)
    pass_cpu_s = time.process_time() - start
    if device.type == "cuda":
        growth = torch.cuda.max_memory_allocated(device) - baseline
    else:
        growth = _proc_status_kb("VmHWM") * 1024 - baseline
    tracker = KernelsAndBytes()
    with tracker:
        one_pass()
    return {
        "backend": backend,
        "frames": frames,
        "video_tokens": video_tokens(frames),
        "growth_bytes": growth,
        "baseline_bytes": baseline,
        "tensor_bytes": tracker.peak,
        "attention_ops": dict(tracker.ops),
        "pass_cpu_s": round(pass_cpu_s, 3),
    }


def in_subprocess(backend: str, frames: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--measure",
        backend,
        str(frames),
        "--pipeline-dir",
        args.pipeline_dir,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--dtype",
        args.dtype,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"backend": backend, "frames": frames, "error": reason[-300:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- report


def kernel_of(ops: dict[str, int]) -> str:
    """The self-attention kernel: the SDPA implementation op that ran, or the math path's bmm + softmax."""
    implementations = [name for name in ops if name.startswith("_scaled_dot_product") or "efficient" in name]
    forward = [name for name in implementations if not name.endswith("backward")]
    if forward:
        return ", ".join(sorted(forward))
    if "bmm" in ops and any("softmax" in name for name in ops):
        return "math (bmm + softmax)"
    return ", ".join(sorted(ops)) or "?"


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    started = time.perf_counter()
    default = runtime.resolve_attention("auto", device)
    frames = [args.base_frames * scale for scale in SCALES]
    results: dict[str, list[dict]] = {}
    for backend in backends(device):
        results[backend] = [in_subprocess(backend, f, args) for f in frames]
    summary = {}
    for backend, rows in results.items():
        if any("error" in row for row in rows):
            summary[backend] = {"error": next(row["error"] for row in rows if "error" in row)}
            continue
        growth = rows[-1]["growth_bytes"] / rows[0]["growth_bytes"]
        tensor_growth = rows[-1]["tensor_bytes"] / rows[0]["tensor_bytes"]
        summary[backend] = {
            "peak_mib": [row["growth_bytes"] / 2**20 for row in rows],
            "tensor_mib": [row["tensor_bytes"] / 2**20 for row in rows],
            "growth_4x_over_1x": growth,
            "tensor_growth_4x_over_1x": tensor_growth,
            "kernel": kernel_of(rows[-1]["attention_ops"]),
        }
    if default in summary and "error" not in summary[default]:
        d = summary[default]
        d["target"] = f"≤ {GROWTH_TARGET}"
        d["pass"] = d["growth_4x_over_1x"] <= GROWTH_TARGET and d["tensor_growth_4x_over_1x"] <= GROWTH_TARGET
        if "math" in summary and "error" not in summary["math"] and default != "math":
            m = summary["math"]
            m["target"] = f"> {default}'s"
            m["pass"] = m["growth_4x_over_1x"] > d["growth_4x_over_1x"]
    return {
        "default_backend": default,
        "growth_target": GROWTH_TARGET,
        "video_tokens": [video_tokens(f) for f in frames],
        "latent_shapes": [list(latent_shape(f)) for f in frames],
        "summary": summary,
        "runs": results,
        "transformer": TRANSFORMER,
        "env": {
            "torch": torch.__version__,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "cpu": platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "threads": args.threads,
            "dtype": args.dtype,
            "memory_method": "torch.cuda.max_memory_allocated over memory_allocated before the measured pass"
            if device.type == "cuda"
            else "peak RSS (VmHWM reset by clear_refs) over RSS after setup and a warm pass, "
            f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}; cross-check: peak live tensor bytes",
            "wall_s": round(time.perf_counter() - started, 1),
        },
    }


def print_report(result: dict) -> None:
    tokens, env, default = result["video_tokens"], result["env"], result["default_backend"]
    head = [f"peak MiB {s}× ({n} tok)" for s, n in zip(SCALES, tokens)]
    rows = [["backend", *head, "growth 4×/1×", "target", "result", "attention kernel (aten)"]]
    cross = [["backend", *[f"tensor MiB {s}×" for s in SCALES], "growth 4×/1×"]]
    for backend, s in result["summary"].items():
        label = f"{backend} (auto)" if backend == default else backend
        if "error" in s:
            rows.append([label, "—", "—", "—", "—", "", "unavailable", s["error"][:80]])
            continue
        verdict = "" if "pass" not in s else ("pass" if s["pass"] else "FAIL")
        rows.append(
            [
                label,
                *[f"{v:.1f}" for v in s["peak_mib"]],
                f"{s['growth_4x_over_1x']:.2f}",
                s.get("target", "information"),
                verdict,
                s["kernel"],
            ]
        )
        cross.append([label, *[f"{v:.1f}" for v in s["tensor_mib"]], f"{s['tensor_growth_4x_over_1x']:.2f}"])
    t = result["transformer"]
    print(
        f"WanTransformer3DModel {t['num_layers']} layers × {t['num_attention_heads']} heads × "
        f"{t['attention_head_dim']}, one sample, latents {' / '.join(str(tuple(s)) for s in result['latent_shapes'])}"
        f", {env['dtype']}, device={env['device']} threads={env['threads']} torch={env['torch']} "
        f"load={env['load_average_1min']:.1f}; auto → {default}"
    )
    print(table(rows))
    print("cross-check, peak live tensor bytes of one forward + backward:")
    print(table(cross))
    print(f"peak memory: {env['memory_method']}; wall {env['wall_s']} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base-frames", type=int, default=2, help="latent frames at 1× (1,024 video tokens each); default 2"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="fp32", help="bf16: autocast over fp32 weights"
    )
    parser.add_argument("--out", default="benchmarks/results/attention_memory.json")
    parser.add_argument("--pipeline-dir", help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("BACKEND", "FRAMES"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    if args.measure is not None:
        backend, frames = args.measure
        print(
            json.dumps(
                measure(backend, int(frames), args.pipeline_dir, torch.device(args.device), args.dtype)
            )
        )
        return
    folder = tempfile.mkdtemp(prefix="attention_memory_")
    try:
        args.pipeline_dir = save_pipeline(TRANSFORMER, TEXT_TOKENS, folder)
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
