"""Reward-guided sampling at inference time: Flow-NRG on a latent reward model, and pixel-space guidance.

Flow-NRG (Liu et al., arXiv 2501.13918, Sec. 4.3): a frozen generator is steered at sampling time, without
training it, by the gradient of a weighted sum of reward dimensions taken on the noisy latent,

    g = w · clip(∇_{x_t} Σ_k λ_k r_k(x_t, t, y)),        v_guided = v_θ(x_t, t, y) − g

(the paper's exact scale and sign convention are not given; the sign here makes each Euler step
x_{σ'} = x_σ + (σ' − σ)·v, σ' < σ, move x up the reward). Diffusion models get the same g as classifier guidance
on ε (``Adapter.sample``). λ_k are chosen per run; ``scale`` is w; the guidance is active on the steps i with
``start`` ≤ i / steps < ``end``; ``max_grad_norm`` clips each sample's gradient (0: no clipping).
Classifier-free guidance applies first, as usual.

- ``LatentGuide``: r_k from a :class:`~mmalign.rewards.latent.LatentRewardModel` on x_t itself — one small
  forward and backward per step, no decode.
- ``PixelGuide``, the baseline: r_k of the media decoded from the predicted x0 (x0 = x_t − σ·v for flow),
  back-propagated through the decoder and the generator's own forward.

``run`` is what ``mmalign guide`` does: the same prompts and seeds unguided and guided, the rewards of both by the
true reward, a side-by-side grid and ``guide.json``.
"""

from __future__ import annotations

import json
import os
import time

import torch

from mmalign import adapters
from mmalign.errors import UserError
from mmalign.recipes import evaluate
from mmalign.rewards.latent import CleanLatentReward, LatentRewardModel


class _Schedule:
    """Scale, step range and clipping shared by both guides."""

    def __init__(self, *, scale: float, start: float, end: float, max_grad_norm: float) -> None:
        self.scale, self.start, self.end, self.max_grad_norm = scale, start, end, max_grad_norm

    def active(self, step: int, steps: int) -> bool:
        return self.start <= step / steps < self.end

    def ascent(self, gradient: torch.Tensor) -> torch.Tensor:
        """w · gradient, each sample's gradient first clipped to norm ``max_grad_norm``; (b, …)."""
        if self.max_grad_norm > 0:
            norms = gradient.flatten(1).norm(dim=1).clamp(min=1e-12)  # (b,)
            factor = (self.max_grad_norm / norms).clamp(max=1.0)
            gradient = gradient * factor.view(-1, *([1] * (gradient.dim() - 1)))
        return self.scale * gradient


class LatentGuide(_Schedule):
    """Flow-NRG: the ascent direction of Σ λ_k r_k(x_t, t, y) from a latent reward model."""

    uses_prediction = False

    def __init__(self, model: LatentRewardModel, weights: torch.Tensor, **schedule) -> None:
        super().__init__(**schedule)
        self.model, self.weights = model, weights.float()

    def __call__(self, step, latents, noise_level, prompts, prediction) -> torch.Tensor:
        with torch.enable_grad():
            x = latents.detach().float().requires_grad_(True)
            rewards = self.model(x, noise_level, prompts)  # (b, D)
            total = (rewards * self.weights.to(rewards.device)).sum()
            (gradient,) = torch.autograd.grad(total, x)
        return self.ascent(gradient)


class PixelGuide(_Schedule):
    """The pixel-space baseline: Σ λ_k r_k of the media decoded from the predicted x0, back-propagated."""

    uses_prediction = True

    def __init__(self, adapter, reward, weights: torch.Tensor, **schedule) -> None:
        super().__init__(**schedule)
        self.adapter, self.reward, self.weights = adapter, reward, weights.float()

    def __call__(self, step, latents, noise_level, prompts, prediction) -> torch.Tensor:
        with torch.enable_grad():
            media = self.adapter.decode(prediction, differentiable=True)  # (b, 3, [F,] H, W) in [0, 1]
            rewards = self.reward(media, prompts)  # (b, D) or (b,)
            if rewards.dim() == 1:
                rewards = rewards[:, None]
            total = (rewards * self.weights.to(rewards.device)).sum()
            (gradient,) = torch.autograd.grad(total, latents)
        return self.ascent(gradient)


def load_reward_model(path: str, adapter, *, key: str = "reward_model") -> LatentRewardModel:
    """The latent reward model at ``path``, checked to read ``adapter``'s latents."""
    model = LatentRewardModel.load(path, key=key)
    model.check_fits(
        kind=adapter.kind,
        latent_space=adapter.latent_space(),
        latent_shape=adapter.latent_shape(),
        where=f"`{key}` {path}",
    )
    return model


def build_guide(cfg, adapter, model: LatentRewardModel):
    """The guide of ``cfg.guidance`` (mode latent or pixel) with ``cfg.weights``."""
    g = cfg.guidance
    schedule = {"scale": g.scale, "start": g.start, "end": g.end, "max_grad_norm": g.max_grad_norm}
    weights = model.weight_vector(cfg.weights, key="weights")
    if g.mode == "latent":
        return LatentGuide(model, weights, **schedule)
    return PixelGuide(adapter, pixel_reward(cfg, model), weights, **schedule)


def pixel_reward(cfg, model: LatentRewardModel):
    """The differentiable pixel-space reward of ``guidance.mode: pixel``."""
    name = cfg.guidance.pixel_reward
    if name == "clean_latent":
        if model.config["latent_space"] != "pixels":
            raise UserError(
                f"`guidance.pixel_reward` clean_latent needs a pixel-space model, but {cfg.model.path} has "
                f"latents of {model.config['latent_space']}; accepted here: guidance.mode=latent"
            )
        return CleanLatentReward(model)
    from mmalign.rewards import REWARDS

    reward = evaluate.build_reward_model(name)
    if not getattr(reward, "differentiable", False):
        raise UserError(
            f"`guidance.pixel_reward` {name!r} has no differentiable path (a programmatic reward); accepted: "
            f"clean_latent or guidance.mode=latent (rewards here: {', '.join(REWARDS)})"
        )
    return reward


def check(cfg) -> None:
    """What the schema cannot check: the step range and that the input folders exist."""
    g = cfg.guidance
    if not g.start < g.end:
        raise UserError(f"`guidance.start` must be < `guidance.end`, got {g.start} and {g.end}")
    if not os.path.isdir(cfg.model.path):
        raise UserError(f"`model.path` must be a pipeline folder, got {cfg.model.path!r}: not found")


def run(cfg) -> dict:
    """Sample unguided and guided from the same prompts and seeds, score both, write the grid and guide.json."""
    # 1. setup: the frozen generator, the latent reward model, the guide, the true reward
    check(cfg)
    adapter = adapters.load(cfg.model)
    model = load_reward_model(cfg.reward_model, adapter)
    guide = build_guide(cfg, adapter, model)
    reward = evaluate.build_reward_model(cfg.eval.reward)
    if cfg.prompt is not None:
        prompts, seeds = evaluate.prompt_seeds(
            [cfg.prompt], cfg.eval.seeds_per_prompt, first_seed=cfg.eval.first_seed
        )
    else:
        spec = evaluate.prompt_list(cfg.eval.prompts, key="eval.prompts", world=cfg.world)
        prompts, seeds = evaluate.prompt_seeds(
            spec, cfg.eval.seeds_per_prompt, first_seed=cfg.eval.first_seed
        )
    options = {
        "steps": cfg.sampling.steps,
        "guidance_scale": cfg.sampling.guidance_scale,
        "batch_size": cfg.sampling.batch_size,
    }
    # 2. sample both from the same seeds, timing each
    start = time.perf_counter()
    unguided, unguided_latents = _scored(adapter, prompts, seeds, reward, options, guide=None)
    unguided_s = time.perf_counter() - start
    start = time.perf_counter()
    guided, guided_latents = _scored(adapter, prompts, seeds, reward, options, guide=guide)
    guided_s = time.perf_counter() - start
    # 3. compare with the evaluation's paired statistics, per reward term too
    summary = evaluate.summarize(unguided, {"guided": guided})
    summary = {key.replace("base_", "unguided_"): value for key, value in summary.items()}
    summary.update(_components(reward, unguided, guided, prompts))
    summary.update(_latent_rewards(model, {"unguided": unguided_latents, "guided": guided_latents}, prompts))
    summary.update(
        {
            "weights": dict(cfg.weights),
            "mode": cfg.guidance.mode,
            "scale": cfg.guidance.scale,
            "steps": cfg.sampling.steps,
            "unguided_seconds": unguided_s,
            "guided_seconds": guided_s,
            "prompts": cfg.prompt if cfg.prompt is not None else cfg.eval.prompts,
            "seeds": f"{cfg.eval.first_seed}..{cfg.eval.first_seed + cfg.eval.seeds_per_prompt - 1}",
        }
    )
    # 4. write the side-by-side samples and guide.json
    os.makedirs(cfg.output_dir, exist_ok=True)
    columns = {"unguided": unguided, "guided": guided}
    if adapter.media == "video":
        summary["grid"] = evaluate.write_video_grids(
            os.path.join(cfg.output_dir, "samples"), columns, rows=cfg.eval.grid_prompts
        )
    else:
        summary["grid"] = os.path.join(cfg.output_dir, "samples", "guided_unguided.png")
        evaluate.write_grid(summary["grid"], columns, rows=cfg.eval.grid_prompts)
    with open(os.path.join(cfg.output_dir, "guide.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _scored(adapter, prompts, seeds, reward, options, *, guide) -> tuple[evaluate.Scored, torch.Tensor]:
    """Samples scored by the true reward, and the final latents they decode from."""
    media, latents = adapter.sample(prompts, seeds, return_latents=True, guide=guide, **options)
    rewards = reward(media, prompts).float().cpu()
    mistakes = reward.mistake(media, prompts).cpu() if hasattr(reward, "mistake") else None
    return evaluate.Scored(prompts, seeds, rewards, mistakes, media.cpu()), latents.cpu()


def _components(reward, unguided, guided, prompts) -> dict:
    """Mean of each term of the true reward (``components``), unguided and guided."""
    if not hasattr(reward, "components"):
        return {}
    out = {}
    for name, scored in (("unguided", unguided), ("guided", guided)):
        for term, values in reward.components(scored.images, prompts).items():
            if term != "reward":
                out[f"{name}_{term}_mean"] = float(values.mean())
    return out


def _latent_rewards(model, latents: dict[str, torch.Tensor], prompts) -> dict:
    """The latent reward model's own dimensions on the final (clean) latents, unguided and guided."""
    out = {}
    with torch.no_grad():
        for name, final in latents.items():
            values = model(final, torch.zeros(len(prompts)), prompts).mean(dim=0)
            for dim, value in zip(model.dimensions, values.tolist()):
                out[f"{name}_latent_{dim}"] = value
    return out


def format_summary(summary: dict, dimensions: tuple[str, ...]) -> str:
    """The printed comparison: rewards, win rate and mistake rate, each true reward term, the latent model's
    dimensions, and the time guidance took."""
    lines = [
        f"{summary['num_samples']} samples ({summary['num_prompts']} prompts), guided and unguided from the same seeds",
        f"{'':<9} {'reward (95% CI, by prompt)':<28} {'gain z':>7} {'win vs unguided':>16} {'mistake rate':>13}",
    ]
    for name in ("unguided", "guided"):
        reward = f"{summary[f'{name}_reward_mean']:.3f} ± {summary[f'{name}_reward_ci95']:.3f}"
        z, win = "", "—"
        if name == "guided":
            z = f"{summary['guided_reward_gain_z']:+.1f}"
            win = f"{summary['guided_win_rate']:.3f} ± {summary['guided_win_rate_ci95']:.3f}"
        mistake = summary.get(f"{name}_error_rate")
        mistake = "—" if mistake is None else f"{mistake:.3f}"
        lines.append(f"{name:<9} {reward:<28} {z:>7} {win:>16} {mistake:>13}")
    terms = [
        key[len("guided_") : -len("_mean")]
        for key in summary
        if key.startswith("guided_") and key.endswith("_mean")
    ]
    terms = [term for term in terms if term != "reward" and f"unguided_{term}_mean" in summary]
    if terms:
        changes = [
            f"{t} {summary[f'unguided_{t}_mean']:.3f} → {summary[f'guided_{t}_mean']:.3f}" for t in terms
        ]
        lines.append("true reward terms, unguided → guided: " + ", ".join(changes))
    changes = [
        f"{d} {summary[f'unguided_latent_{d}']:.3f} → {summary[f'guided_latent_{d}']:.3f}" for d in dimensions
    ]
    lines.append("latent reward model at t = 0, unguided → guided: " + ", ".join(changes))
    lines.append(
        f"weights {summary['weights']}, scale {summary['scale']}; sampling took {summary['unguided_seconds']:.0f} s "
        f"unguided (with one-time warm-up), {summary['guided_seconds']:.0f} s guided"
    )
    return "\n".join(lines)
