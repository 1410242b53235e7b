"""Held-out reward against denoiser evaluations: B²-DiffuRL and its DDPO baseline on the same budget.

Reads two ``recipe: branch_rl`` run directories (by default the toy configs' ``runs/b2_diffurl_toy`` and
``runs/ddpo_toy``; ``--train`` runs ``configs/b2_diffurl_toy.yaml`` and ``configs/ddpo_toy.yaml`` first). Each
validation row of ``metrics.jsonl`` (held-out validation prompts, deterministic DDIM with guidance) is paired
with the recipe's cumulative count of denoiser evaluations at that stage (``denoiser_evals``: sampling and
training forwards, guidance counting two; 0 at the base). Printed: the curve of both runs, each run's final
validation reward and total evaluations, the evaluations B²-DiffuRL spent when its validation reward first
reached DDPO's final one (and the ratio to DDPO's total), and each run's ``eval.json`` (test prompts) when
present. Written: the curve as PNG and JSON.

    python benchmarks/b2_vs_ddpo.py                       # reads the two toy run directories
    python benchmarks/b2_vs_ddpo.py --train               # trains both toy configs first (≈ 2 × 8 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

RUNS = {"b2_diffurl": "runs/b2_diffurl_toy", "ddpo": "runs/ddpo_toy"}
CONFIGS = {"b2_diffurl": "configs/b2_diffurl_toy.yaml", "ddpo": "configs/ddpo_toy.yaml"}


def curve(run_dir: str) -> list[dict]:
    """[{"stage", "denoiser_evals", "val_reward"}] of one run, the base (stage 0, no evaluations) first."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evaluations = {row["step"]: row["denoiser_evals"] for row in rows if "denoiser_evals" in row}
    evaluations[0] = 0
    points = []
    for row in rows:
        if "val_reward" in row:
            if row["step"] not in evaluations:
                raise SystemExit(
                    f"{run_dir}: no denoiser_evals at stage {row['step']}; validate on logged stages "
                    "(validation.every a multiple of log.every)"
                )
            points.append(
                {
                    "stage": row["step"],
                    "denoiser_evals": evaluations[row["step"]],
                    "val_reward": row["val_reward"],
                }
            )
    return points


def first_reaching(points: list[dict], target: float) -> dict | None:
    """The first point whose validation reward reaches ``target``."""
    return next((point for point in points if point["val_reward"] >= target), None)


def summary(curves: dict[str, list[dict]], evals: dict[str, dict | None]) -> dict:
    b2, ddpo = curves["b2_diffurl"], curves["ddpo"]
    target = ddpo[-1]["val_reward"]
    reached = first_reaching(b2[1:], target)  # a trained stage, not the base
    result = {
        "ddpo_final_val_reward": target,
        "ddpo_total_denoiser_evals": ddpo[-1]["denoiser_evals"],
        "b2_diffurl_final_val_reward": b2[-1]["val_reward"],
        "b2_diffurl_total_denoiser_evals": b2[-1]["denoiser_evals"],
        "b2_diffurl_evals_to_reach_ddpo_final": reached["denoiser_evals"] if reached else None,
        "evals_ratio": reached["denoiser_evals"] / ddpo[-1]["denoiser_evals"] if reached else None,
    }
    for name, found in evals.items():
        if found is not None:
            result[f"{name}_test"] = {
                key: found[key]
                for key in (
                    "base_reward_mean",
                    "aligned_reward_mean",
                    "aligned_reward_gain",
                    "aligned_reward_gain_z",
                )
            }
    return result


def plot(path: str, curves: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in curves.items():
        ax.plot(
            [p["denoiser_evals"] for p in points], [p["val_reward"] for p in points], marker="o", label=name
        )
    ax.set_xlabel("denoiser evaluations (sampling + training)")
    ax.set_ylabel("validation reward (sparse)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b2", default=RUNS["b2_diffurl"], help="B²-DiffuRL run directory")
    parser.add_argument("--ddpo", default=RUNS["ddpo"], help="DDPO run directory")
    parser.add_argument("--train", action="store_true", help="train both toy configs first")
    parser.add_argument("--out", default="benchmarks/results/b2_vs_ddpo", help="PNG and JSON path, no suffix")
    args = parser.parse_args(argv)
    dirs = {"b2_diffurl": args.b2, "ddpo": args.ddpo}
    if args.train:
        for name, config in CONFIGS.items():
            subprocess.run(
                [sys.executable, "-m", "mmalign", "train", config, f"output_dir={dirs[name]}"], check=True
            )
    curves = {name: curve(run_dir) for name, run_dir in dirs.items()}
    evals = {}
    for name, run_dir in dirs.items():
        path = os.path.join(run_dir, "eval.json")
        evals[name] = None
        if os.path.isfile(path):
            with open(path) as f:
                evals[name] = json.load(f)
    for name, points in curves.items():
        print(f"{name} ({dirs[name]})")
        print(f"  {'stage':>5} {'denoiser evals':>15} {'val reward':>11}")
        for p in points:
            print(f"  {p['stage']:>5} {p['denoiser_evals']:>15,.0f} {p['val_reward']:>11.3f}")
    result = summary(curves, evals)
    ratio = result["evals_ratio"]
    print(
        f"DDPO final validation reward {result['ddpo_final_val_reward']:.3f} after "
        f"{result['ddpo_total_denoiser_evals']:,.0f} evaluations; B²-DiffuRL "
        + (
            f"reached it after {result['b2_diffurl_evals_to_reach_ddpo_final']:,.0f} ({ratio:.2f}×)"
            if ratio is not None
            else f"did not reach it (final {result['b2_diffurl_final_val_reward']:.3f})"
        )
    )
    for name in curves:
        test = result.get(f"{name}_test")
        if test:
            print(
                f"{name} test: base {test['base_reward_mean']:.3f} → {test['aligned_reward_mean']:.3f} "
                f"({test['aligned_reward_gain']:+.3f}, {test['aligned_reward_gain_z']:+.1f} clustered SE)"
            )
    plot(args.out + ".png", curves)
    with open(args.out + ".json", "w") as f:
        json.dump({"runs": dirs, "curves": curves, **result}, f, indent=2)
    print(f"wrote {args.out}.png and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
