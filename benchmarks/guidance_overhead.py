"""Reward-guided sampling: wall time of latent-guided (Flow-NRG) and pixel-guided sampling over unguided sampling.

Target: latent-reward guidance costs at most 1.3× unguided sampling (one small forward and backward of the latent
reward model per step, no decode); pixel-space guidance is the baseline it is compared with (decode the predicted
x0, score, back-propagate through the decoder and the generator's own forward), reported beside it.

The three variants sample the same model (the toy video base, ``assets/toy-video``: a pixel-space Wan
transformer, so "decode" is the identity and the pixel baseline's extra cost is the generator's backward), the same
prompts and seeds, the same number of steps, classifier-free guidance scale and batch, through the one sampler
(``FlowAdapter.sample``) and the guides of ``mmalign.recipes.guidance``:

- ``unguided``: ``guide=None``;
- ``latent``: ``LatentGuide`` on the shipped latent reward model (``assets/toy-video-reward/final``; a freshly
  initialised one of the same architecture when it is absent: the cost is the same), guidance on every step;
- ``pixel``: ``PixelGuide`` with the same model read at noise level 0 on the decoded predicted x0
  (``CleanLatentReward``), guidance on every step.

Timing: one torch thread, the variants interleaved (unguided, latent, pixel, unguided, …) after a warm-up round,
median over repeats and the ratio of medians; the quartiles of the per-round ratios show the spread.

    python benchmarks/guidance_overhead.py                      # ≈ 1–2 min on a 2-core CPU
    python benchmarks/guidance_overhead.py --batch 32 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from mmalign.adapters.flow import FlowAdapter, load_pipeline
from mmalign.recipes.guidance import LatentGuide, PixelGuide
from mmalign.rewards.latent import CleanLatentReward, LatentRewardModel
from mmalign.toy import moving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "toy-video")
REWARD_MODEL = os.path.join(ROOT, "assets", "toy-video-reward", "final")
LATENT_TARGET = 1.3
VARIANTS = ("unguided", "latent", "pixel")


def build(args: argparse.Namespace):
    """The adapter, the prompts and seeds, and the guide of each variant."""
    adapter = FlowAdapter(load_pipeline(BASE), BASE, media_shape=(moving.FRAMES, 16, 16))
    if os.path.isdir(REWARD_MODEL):
        model, source = LatentRewardModel.load(REWARD_MODEL), REWARD_MODEL
    else:
        torch.manual_seed(0)
        model = LatentRewardModel(
            latent_shape=list(adapter.latent_shape()),
            dimensions=["colour", "shape", "motion"],
            vocabulary=moving.vocabulary(),
            kind="flow",
            latent_space="pixels",
        ).requires_grad_(False)
        source = "fresh initialisation (no shipped model)"
    weights = torch.tensor([1.0 if name == "motion" else 0.0 for name in model.dimensions])
    schedule = {"scale": args.scale, "start": 0.0, "end": 1.0, "max_grad_norm": 0.0}
    guides = {
        "unguided": None,
        "latent": LatentGuide(model, weights, **schedule),
        "pixel": PixelGuide(adapter, CleanLatentReward(model), weights, **schedule),
    }
    test = moving.prompts("test")
    prompts = [test[i % len(test)] for i in range(args.batch)]
    seeds = [1000 + i for i in range(args.batch)]
    parameters = sum(p.numel() for p in model.parameters())
    return adapter, prompts, seeds, guides, {"reward_model": source, "reward_model_parameters": parameters}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    adapter, prompts, seeds, guides, info = build(args)
    options = {"steps": args.steps, "guidance_scale": args.cfg, "batch_size": args.batch}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(args.warmup + args.repeats):
        for name in VARIANTS:
            begin = time.perf_counter()
            adapter.sample(prompts, seeds, guide=guides[name], **options)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - begin)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: medians[name] / medians["unguided"] for name in ("latent", "pixel")}
    per_round = {
        name: [a / b for a, b in zip(times[name], times["unguided"])] for name in ("latent", "pixel")
    }
    return {
        "model": "toy video base (WanTransformer3DModel, pixel space, 3×4×16×16)",
        **info,
        "batch": args.batch,
        "steps": args.steps,
        "cfg_scale": args.cfg,
        "guidance_scale": args.scale,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seconds": times,
        "median_s": medians,
        "ratio_over_unguided": ratios,
        "ratio_quartiles": {name: _quartiles(values) for name, values in per_round.items()},
        "latent_target": LATENT_TARGET,
        "latent_pass": ratios["latent"] <= LATENT_TARGET,
        "environment": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "wall_s": round(time.perf_counter() - started, 1),
        },
    }


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0]] * 3
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[1], q[2]]


def report(result: dict) -> str:
    lines = [
        f"{result['model']}; batch {result['batch']}, {result['steps']} Euler steps, CFG {result['cfg_scale']}, "
        f"{result['threads']} thread(s), {result['repeats']} interleaved repeats",
        f"{'variant':<10} {'median s':>9} {'× unguided':>11} {'per-round quartiles':>22}  target",
    ]
    for name in VARIANTS:
        median = result["median_s"][name]
        if name == "unguided":
            lines.append(f"{name:<10} {median:>9.2f} {1.0:>11.2f} {'':>22}")
            continue
        ratio = result["ratio_over_unguided"][name]
        low, mid, high = result["ratio_quartiles"][name]
        target = ""
        if name == "latent":
            target = f"≤ {LATENT_TARGET} [{'ok' if result['latent_pass'] else 'MISS'}]"
        lines.append(
            f"{name:<10} {median:>9.2f} {ratio:>11.2f} {f'{low:.2f} / {mid:.2f} / {high:.2f}':>22}  {target}"
        )
    lines.append(f"reward model: {result['reward_model']} ({result['reward_model_parameters']} parameters)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="clips sampled together (default 16)")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps (default 20, the toy configs')")
    parser.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (default 1.5)")
    parser.add_argument("--scale", type=float, default=300.0, help="reward guidance scale (default 300)")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results", "guidance_overhead.json")
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
