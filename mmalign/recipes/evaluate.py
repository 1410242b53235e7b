"""Evaluation: sample the base and the trained models on the same prompts and seeds, score, compare.

The comparison is paired: every model draws sample j of prompt p from the same starting noise (seed
1000 + j), so "aligned beats base" is measured sample by sample. Uncertainty is clustered by prompt: the
samples of one prompt are not independent, so the standard error comes from the per-prompt means.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from mmalign import adapters
from mmalign.errors import UserError

EVAL_FIRST_SEED = 1000


@dataclass
class Scored:
    """Samples of one model on the evaluation prompts."""

    prompts: list[str]
    seeds: list[int]
    rewards: torch.Tensor  # (N,)
    mistakes: torch.Tensor | None  # (N,) bool, the toy world's targeted mistake
    images: torch.Tensor  # (N, 3, H, W) or (N, 3, F, H, W) in [0, 1]


def prompt_list(spec: str, *, key: str, world: str = "shapes") -> list[str]:
    """A split name of the toy ``world`` (train / val / test) or a text file with one prompt per line."""
    from mmalign.toy import WORLDS

    splits = WORLDS[world]
    if spec in splits.SPLITS:
        return splits.prompts(spec)
    if os.path.isfile(spec):
        with open(spec) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise UserError(f"`{key}`: {spec} holds no prompts (one per line expected)")
        return prompts
    raise UserError(
        f"`{key}` must be a toy split ({', '.join(splits.SPLITS)}) or a text file of prompts, got {spec!r}"
    )


def prompt_seeds(prompts: list[str], per_prompt: int, *, first_seed: int = EVAL_FIRST_SEED):
    """Each prompt repeated ``per_prompt`` times with seeds first_seed + j."""
    repeated = [p for p in prompts for _ in range(per_prompt)]
    seeds = [first_seed + j for _ in prompts for j in range(per_prompt)]
    return repeated, seeds


def build_reward_model(name: str):
    from mmalign.rewards import build_reward

    return build_reward(name)


def score_model(
    adapter, network, prompts, seeds, reward, *, steps: int, guidance_scale: float, batch_size: int = 128
) -> Scored:
    images = adapter.sample(
        prompts,
        seeds,
        network=network,
        steps=steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
    )
    rewards = reward(images, prompts).float().cpu()
    mistakes = reward.mistake(images, prompts).cpu() if hasattr(reward, "mistake") else None
    return Scored(prompts, seeds, rewards, mistakes, images.cpu())


def clustered_mean(values: torch.Tensor, prompts: list[str]) -> tuple[float, float]:
    """Mean and its standard error with samples clustered by prompt (equal cluster sizes)."""
    groups: dict[str, list[float]] = {}
    for value, prompt in zip(values.tolist(), prompts):
        groups.setdefault(prompt, []).append(value)
    means = torch.tensor([sum(v) / len(v) for v in groups.values()], dtype=torch.float64)
    se = float(means.std(unbiased=True) / math.sqrt(len(means))) if len(means) > 1 else float("nan")
    return float(values.double().mean()), se


def wins(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample win of a over b: 1, 0.5 on a tie, 0."""
    return (a > b).double() + 0.5 * (a == b).double()


def summarize(base: Scored, others: dict[str, Scored]) -> dict:
    """The eval.json contents: DESIGN.md keys plus intervals, z-scores and error rates."""
    mean, se = clustered_mean(base.rewards, base.prompts)
    summary = {
        "num_samples": len(base.prompts),
        "num_prompts": len(set(base.prompts)),
        "base_reward_mean": mean,
        "base_reward_ci95": 1.96 * se,
    }
    if base.mistakes is not None:
        summary["base_error_rate"] = float(base.mistakes.double().mean())
    for name, scored in others.items():
        mean, se = clustered_mean(scored.rewards, scored.prompts)
        diff, diff_se = clustered_mean(scored.rewards - base.rewards, base.prompts)
        win, win_se = clustered_mean(wins(scored.rewards, base.rewards), base.prompts)
        summary[f"{name}_reward_mean"] = mean
        summary[f"{name}_reward_ci95"] = 1.96 * se
        summary[f"{name}_reward_gain"] = diff
        summary[f"{name}_reward_gain_z"] = diff / diff_se if diff_se > 0 else float("nan")
        summary[f"{name}_win_rate" if name != "aligned" else "win_rate"] = win
        summary[f"{name}_win_rate_ci95"] = 1.96 * win_se
        if scored.mistakes is not None:
            summary[f"{name}_error_rate"] = float(scored.mistakes.double().mean())
    return summary


def format_table(summary: dict, names: list[str]) -> str:
    """The before/after table printed at the end of a run."""
    has_errors = "base_error_rate" in summary
    header = f"{'model':<9} {'reward (95% CI, by prompt)':<28} {'gain z':>7} {'win vs base':>16}"
    header += f" {'mistake rate':>13}" if has_errors else ""
    lines = [
        f"{summary['num_samples']} held-out samples ({summary['num_prompts']} prompts, same seeds for all)",
        header,
    ]
    for name in ["base", *names]:
        reward = f"{summary[f'{name}_reward_mean']:.3f} ± {summary[f'{name}_reward_ci95']:.3f}"
        if name == "base":
            z, win = "", "—"
        else:
            key = "win_rate" if name == "aligned" else f"{name}_win_rate"
            z = f"{summary[f'{name}_reward_gain_z']:+.1f}"
            win = f"{summary[key]:.3f} ± {summary[f'{name}_win_rate_ci95']:.3f}"
        line = f"{name:<9} {reward:<28} {z:>7} {win:>16}"
        if has_errors:
            line += f" {summary[f'{name}_error_rate']:>13.3f}"
        lines.append(line)
    return "\n".join(lines)


def write_grid(path: str, columns: dict[str, Scored], *, rows: int, scale: int = 4) -> None:
    """A side-by-side PNG: one row per prompt (its first seed), one column per model."""
    first = next(iter(columns.values()))
    picks = _first_sample_per_prompt(first.prompts, rows)
    height, width = first.images.shape[-2] * scale, first.images.shape[-1] * scale
    label_width, header = 220, 16
    canvas = Image.new("RGB", (label_width + width * len(columns), header + height * len(picks)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((label_width + c * width + 2, 2), name, fill="black")
    for r, index in enumerate(picks):
        draw.text((2, header + r * height + height // 2 - 5), first.prompts[index], fill="black")
        for c, scored in enumerate(columns.values()):
            pixels = (scored.images[index].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
            tile = Image.fromarray(pixels).resize((width, height), Image.NEAREST)
            canvas.paste(tile, (label_width + c * width, header + r * height))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    canvas.save(path)


def plot_validation(path: str, runs: dict[str, str]) -> None:
    """Validation reward against step for each run directory (``metrics.jsonl`` rows with val_reward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, run_dir in runs.items():
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if "val_reward" in line]
        ax.plot([r["step"] for r in rows], [r["val_reward"] for r in rows], marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation reward")
    ax.set_title("held-out (validation) reward during training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_runs(
    model_cfg,
    final_dirs: dict[str, str],
    *,
    prompts_spec: str,
    seeds_per_prompt: int,
    reward_name: str,
    steps: int,
    guidance_scale: float,
    out_dir: str,
    grid_prompts: int,
    batch_size: int = 128,
    first_seed: int = EVAL_FIRST_SEED,
    world: str = "shapes",
    control: str = "no_labels",
) -> tuple[dict, str]:
    """Sample base and each ``final/``, write eval.json and the grid; returns the summary and the grid's path.

    ``control``: what a ``control`` run among ``final_dirs`` is (``format_checks``), recorded in eval.json."""
    adapter = adapters.load(model_cfg)
    prompts, seeds = prompt_seeds(
        prompt_list(prompts_spec, key="eval.prompts", world=world), seeds_per_prompt, first_seed=first_seed
    )
    reward = build_reward_model(reward_name)
    sample_kwargs = {"steps": steps, "guidance_scale": guidance_scale, "batch_size": batch_size}
    base = score_model(adapter, adapter.network, prompts, seeds, reward, **sample_kwargs)
    others = {}
    for name, final_dir in final_dirs.items():
        network = adapter.load_aligned(final_dir)
        others[name] = score_model(adapter, network, prompts, seeds, reward, **sample_kwargs)
    summary = summarize(base, others)
    summary.update(
        {
            "prompts": prompts_spec,
            "seeds": f"{first_seed}..{first_seed + seeds_per_prompt - 1}",
            "guidance_scale": guidance_scale,
            "sampling_steps": steps,
            "reward": reward_name,
        }
    )
    if "control" in final_dirs:
        summary["control"] = control
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(summary, f, indent=2)
    columns = {"base": base, **others}
    if adapter.media == "video":
        grid = write_video_grids(os.path.join(out_dir, "samples"), columns, rows=grid_prompts)
    else:
        grid = os.path.join(out_dir, "samples", "before_after.png")
        write_grid(grid, columns, rows=grid_prompts)
    return summary, grid


def write_video_grids(samples_dir: str, columns: dict[str, Scored], *, rows: int) -> str:
    """Before/after clips side by side, one row per prompt (its first seed): an animated GIF (Pillow) and, with
    the video extra installed, an MP4; returns the GIF's path."""
    from mmalign.data.video import video_extra_installed, write_video_grid

    first = next(iter(columns.values()))
    picks = _first_sample_per_prompt(first.prompts, rows)
    videos = {name: scored.images[picks] for name, scored in columns.items()}
    labels = [first.prompts[i] for i in picks]
    extensions = ("mp4", "gif") if video_extra_installed() else ("gif",)
    for extension in extensions:
        path = os.path.join(samples_dir, f"before_after.{extension}")
        write_video_grid(path, videos, labels)
    return path


def _first_sample_per_prompt(prompts: list[str], rows: int) -> list[int]:
    picks, seen = [], set()
    for index, prompt in enumerate(prompts):
        if prompt not in seen:
            seen.add(prompt)
            picks.append(index)
        if len(picks) == rows:
            break
    return picks


def format_checks(summary: dict, *, control: str = "no_labels") -> str:
    """The toy world's acceptance checks, as lines a reader can verify against the table.

    ``control``: what the control run is. ``no_labels`` (the same data without its labels) must be no better
    than the base, and the aligned model must beat it by 0.10 in win rate; ``sft`` (TPO's baseline: supervised
    fine-tuning on the same correctly captioned images, which may well improve on the base) must be beaten by
    0.05 (TPO's claim, arXiv 2509.25771, that the mismatched caption adds signal beyond fine-tuning)."""
    checks = []
    if "aligned_error_rate" in summary and summary["base_error_rate"] > 0:
        ratio = summary["aligned_error_rate"] / summary["base_error_rate"]
        checks.append((f"mistake rate aligned / base = {ratio:.2f}", "≤ 0.60", ratio <= 0.6))
    checks.append((f"win rate vs base = {summary['win_rate']:.3f}", "≥ 0.60", summary["win_rate"] >= 0.6))
    z = summary["aligned_reward_gain_z"]
    checks.append(
        (f"reward gain = {summary['aligned_reward_gain']:+.4f} ({z:+.1f} clustered SE)", "≥ +3 SE", z >= 3)
    )
    if "control_win_rate" in summary and control == "sft":
        gap = summary["win_rate"] - summary["control_win_rate"]
        checks.append(
            (
                f"aligned − control (supervised fine-tuning) win rate = {gap:+.3f} "
                f"(control win {summary['control_win_rate']:.3f})",
                "≥ +0.05",
                gap >= 0.05,
            )
        )
    elif "control_win_rate" in summary:
        control, control_z = summary["control_win_rate"], summary["control_reward_gain_z"]
        checks.append(
            (
                f"control vs base: win {control:.3f}, reward gain {control_z:+.1f} SE",
                "no better than base (gain ≤ +2 SE)",
                control_z <= 2,
            )
        )
        gap = summary["win_rate"] - control
        checks.append((f"aligned − control win rate = {gap:+.3f}", "≥ +0.10", gap >= 0.1))
    width = max(len(text) for text, _, _ in checks)
    return "\n".join(
        f"  [{'ok' if ok else 'MISS'}] {text:<{width}}  target {target}" for text, target, ok in checks
    )
