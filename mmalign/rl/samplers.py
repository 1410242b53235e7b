"""Stochastic samplers whose every transition has a Gaussian log-density: DDIM with η > 0, the flow SDE.

Policy-gradient training of a denoiser (DDPO, Black et al., arXiv 2305.13301; B²-DiffuRL, Hu et al.,
arXiv 2503.11240; Flow-GRPO, Liu et al., arXiv 2505.05470) treats each denoising step as an action drawn from
p_θ(x_{t−1} | x_t) = N(μ_θ(x_t, t), σ_t²·I). This module computes that Gaussian for two samplers, draws from
it, and evaluates its log-density, so that a recipe can store a trajectory with its log-probabilities and later
recompute them under the updated policy for the PPO ratio (:func:`mmalign.losses.ppo.ppo_clip`):

- :func:`ddim_posterior` / :func:`ddim_step`: DDIM (Song et al., arXiv 2010.02502, Eq. 12 and 16) on a
  diffusers ``DDIMScheduler``-compatible schedule, ε- or v-prediction;
- :func:`flow_sde_posterior` / :func:`flow_sde_step`: the reverse-time SDE of a rectified flow with the
  marginals of its ODE (Flow-GRPO), discretised by Euler–Maruyama;
- :func:`log_prob_of`: the log-density of a stored x_{t−1} under a posterior (old or new model output);
- :func:`kl_to_reference`: the KL between the policy's and the reference's transitions (Flow-GRPO).

A log-density is the MEAN over all non-batch dimensions of the per-element Gaussian log-density, not the sum:
the reference code of DDPO and B²-DiffuRL averages over latent dimensions, which keeps the PPO ratio and its
clip range (1e-4 in DDPO, 0.1 in B²-DiffuRL) on the scale those papers tuned. All arithmetic is fp32. These
are functions on tensors and a scheduler object; no model is called here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmalign.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class Gaussian:
    """The distribution N(mean, std²·I) of one denoising transition x_t → x_{t−1}.

    Attributes:
        mean: (B, ...) fp32, the posterior mean μ.
        std: fp32, shape () or (B, 1, ..., 1), broadcasting against ``mean``; 0 for a deterministic step.
    """

    mean: torch.Tensor
    std: torch.Tensor


@dataclass(frozen=True)
class Transition:
    """One sampled denoising step.

    Attributes:
        prev_sample: (B, ...) fp32, x_{t−1} = μ + σ·z. Store this value (not a lower-precision copy) if the
            stored log-probability must equal a later recomputation bit for bit.
        mean: (B, ...) fp32, μ.
        std: fp32, () or (B, 1, ..., 1), σ.
        log_prob: (B,) fp32, log N(x_{t−1}; μ, σ²) averaged over the non-batch dimensions; NaN where σ = 0.
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


def _per_sample(value: torch.Tensor | float | int, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a number, a () or a (B,) tensor) on ``like``'s device, shaped to broadcast against it."""
    value = torch.as_tensor(value, device=like.device)
    if value.ndim == 0:
        return value
    if value.ndim != 1 or value.shape[0] != like.shape[0]:
        raise ValueError(f"expected a number or a ({like.shape[0]},) tensor, got shape {tuple(value.shape)}")
    return value.view(-1, *([1] * (like.ndim - 1)))


def _alpha_bar(scheduler, timestep: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """ᾱ at ``timestep``; the schedule's ``final_alpha_cumprod`` where timestep < 0 (past the last step)."""
    t = torch.as_tensor(timestep, device=like.device)
    alphas = scheduler.alphas_cumprod.to(device=like.device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=like.device, dtype=torch.float32)
    value = torch.where(t >= 0, alphas[t.clamp(min=0)], final)
    return _per_sample(value, like)


def _noise(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of ``shape``, fp32, on ``like``'s device (the generator must live there too)."""
    return torch.randn(shape, generator=generator, device=like.device, dtype=torch.float32)


def _sample(posterior: Gaussian, noise: torch.Tensor | None) -> Transition:
    """x_{t−1} = μ + σ·z (μ itself when ``noise`` is None) and its log-density."""
    prev_sample = posterior.mean if noise is None else posterior.mean + posterior.std * noise.float()
    return Transition(
        prev_sample=prev_sample,
        mean=posterior.mean,
        std=posterior.std,
        log_prob=log_prob_of(posterior, prev_sample),
    )


def ddim_prev_timestep(scheduler, timestep: torch.Tensor | int) -> torch.Tensor | int:
    """The timestep a DDIM step from ``timestep`` lands on: t − num_train_timesteps // num_inference_steps.

    The rule of ``diffusers.DDIMScheduler.step``; negative past the last step, where :func:`ddim_posterior`
    uses the schedule's ``final_alpha_cumprod``. Needs ``scheduler.set_timesteps`` to have been called.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_inference_steps) before ddim_prev_timestep")
    return timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def ddim_posterior(
    scheduler,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    prev_timestep: torch.Tensor | int,
    *,
    eta: float,
) -> Gaussian:
    """The DDIM transition N(μ, σ_t²) from x_t at ``timestep`` to x_{t−1} at ``prev_timestep``.

    Song et al., arXiv 2010.02502, Eq. 12 (the step) and Eq. 16 (its std), with ᾱ the scheduler's
    ``alphas_cumprod`` (``final_alpha_cumprod`` where prev_timestep < 0):

        x̂_0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t)
        σ_t = η · sqrt((1 − ᾱ_{t−1}) / (1 − ᾱ_t)) · sqrt(1 − ᾱ_t / ᾱ_{t−1})
        μ   = sqrt(ᾱ_{t−1})·x̂_0 + sqrt(1 − ᾱ_{t−1} − σ_t²)·ε̂

    For ``prediction_type`` "v_prediction" the model output is v and x̂_0 = sqrt(ᾱ_t)·x_t − sqrt(1 − ᾱ_t)·v,
    ε̂ = sqrt(ᾱ_t)·v + sqrt(1 − ᾱ_t)·x_t. η = 1 gives the DDPM posterior variance; η = 0 the deterministic
    DDIM (σ = 0). The same arithmetic as ``DDIMScheduler.step``; a scheduler that clips or thresholds x̂_0
    (``clip_sample``, ``thresholding``) is refused rather than followed only part of the way.

    Args:
        scheduler: a diffusers ``DDIMScheduler`` (or one with the same ``alphas_cumprod``,
            ``final_alpha_cumprod`` and ``config``).
        model_output: (B, ...) the denoiser's ε or v prediction at (x_t, t).
        sample: (B, ...) x_t.
        timestep, prev_timestep: ints, or (B,) integer tensors for a batch that mixes timesteps.
        eta: η ≥ 0.
    """
    if eta < 0:
        raise UserError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM variance), got {eta}")
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(
            f"scheduler prediction_type {prediction_type!r} is not supported; choose one of: "
            f"{', '.join(PREDICTION_TYPES)}"
        )
    if scheduler.config.clip_sample or scheduler.config.thresholding:
        raise UserError(
            "clipping or thresholding x̂_0 is not supported in the DDIM log-density; build the scheduler with "
            f"clip_sample=False and thresholding=False (got clip_sample={scheduler.config.clip_sample}, "
            f"thresholding={scheduler.config.thresholding})"
        )
    model_output = model_output.float()  # (B, ...)
    sample = sample.float()  # (B, ...)
    alpha_t = _alpha_bar(scheduler, timestep, sample)  # () or (B, 1, ..., 1)
    alpha_prev = _alpha_bar(scheduler, prev_timestep, sample)
    beta_t = 1 - alpha_t
    if prediction_type == "epsilon":
        x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()  # (B, ...)
        epsilon = model_output
    else:
        x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output  # (B, ...)
        epsilon = alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    variance = (1 - alpha_prev) / beta_t * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).sqrt() * epsilon  # (B, ...)
    return Gaussian(mean=mean, std=std)


def ddim_step(
    scheduler,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    prev_timestep: torch.Tensor | int,
    *,
    eta: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Transition:
    """One DDIM step x_{t−1} = μ + σ_t·z with its log-density; see :func:`ddim_posterior` for μ and σ_t.

    With the same z, ``prev_sample`` equals ``DDIMScheduler.step(model_output, timestep, sample, eta=eta,
    variance_noise=z).prev_sample``. ``noise`` is z, (B, ...); if None it is drawn from ``generator`` when
    η > 0 (as diffusers does). η = 0 is deterministic: no noise is drawn and ``log_prob`` is NaN, since a
    point mass has no density — a loss built on it comes out NaN rather than quietly wrong. (σ_t is also 0
    at the last step of a schedule whose ``set_alpha_to_one`` is True, whatever η.)
    """
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both")
    posterior = ddim_posterior(scheduler, model_output, sample, timestep, prev_timestep, eta=eta)
    if noise is None and eta > 0:
        noise = _noise(posterior.mean.shape, posterior.mean, generator)
    return _sample(posterior, noise)


def flow_sde_posterior(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    noise_level: float = 0.7,
    sigma_at_one: float | None = None,
) -> Gaussian:
    """The flow-SDE transition N(μ, s²) from x at noise level σ to σ_next < σ, for a velocity v.

    Flow-GRPO (Liu et al., arXiv 2505.05470, Eq. 9). A rectified flow x_σ = (1 − σ)·x_0 + σ·ε with velocity
    v = ε − x_0 has ODE dx = v·dσ; since ε = x + (1 − σ)·v, its score is ∇log p_σ(x) = −(x + (1 − σ)·v)/σ.
    The reverse-time SDE with the same marginals and diffusion coefficient σ_t, run from σ = 1 down to 0, is
    dx = [v − (σ_t²/2)·∇log p_σ]·dσ + σ_t·dw, i.e.

        dx = [v + σ_t²/(2σ)·(x + (1 − σ)·v)]·dσ + σ_t·dw,        σ_t = a·sqrt(σ/(1 − σ)).

    Euler–Maruyama with the step Δ = σ_next − σ (NEGATIVE while denoising) gives

        μ = x + [v + σ_t²/(2σ)·(x + (1 − σ)·v)]·(σ_next − σ),      s = σ_t·sqrt(|σ_next − σ|).

    Sign check: with Δ < 0 the σ_t² term adds (σ_t²/2)·∇log p·|Δ|, a move up the density, as a reverse-time
    SDE must; with a = 0 μ = x + v·(σ_next − σ), the Euler step of ``FlowMatchEulerDiscreteScheduler.step``.

    What the paper leaves open: at σ = 1 (the first step of a schedule that starts at pure noise) σ_t is
    infinite. ``sigma_at_one`` is the σ put into the denominator 1 − σ of σ_t there; Flow-GRPO's reference
    code uses the schedule's second σ (``scheduler.sigmas[1]``). None refuses σ ≥ 1 unless a = 0.

    Args:
        model_output: (B, ...) the velocity v at (x, σ).
        sample: (B, ...) x.
        sigma, sigma_next: numbers, or (B,) tensors for a batch that mixes noise levels.
        noise_level: a ≥ 0 (Flow-GRPO's default 0.7).
        sigma_at_one: the stand-in σ of σ_t's denominator where σ ≥ 1, in (0, 1).
    """
    if noise_level < 0:
        raise UserError(f"noise_level must be >= 0 (0: the deterministic Euler step), got {noise_level}")
    model_output = model_output.float()  # (B, ...)
    sample = sample.float()  # (B, ...)
    sigma = _per_sample(sigma, sample).float()  # () or (B, 1, ..., 1)
    sigma_next = _per_sample(sigma_next, sample).float()
    if noise_level == 0:
        sde_std = torch.zeros_like(sigma)
    else:
        if sigma_at_one is None and bool((sigma >= 1).any()):
            raise ValueError(
                "the flow-SDE std a·sqrt(σ/(1 − σ)) is infinite at σ = 1; pass sigma_at_one (Flow-GRPO uses "
                "the schedule's second σ, scheduler.sigmas[1]) or start the SDE below σ = 1"
            )
        denominator = sigma if sigma_at_one is None else torch.where(sigma >= 1, sigma_at_one, sigma)
        sde_std = noise_level * (sigma / (1 - denominator)).sqrt()
    dsigma = sigma_next - sigma  # < 0 while denoising
    drift = model_output + sde_std**2 / (2 * sigma) * (sample + (1 - sigma) * model_output)  # (B, ...)
    mean = sample + drift * dsigma  # (B, ...)
    return Gaussian(mean=mean, std=sde_std * dsigma.abs().sqrt())


def flow_sde_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    noise_level: float = 0.7,
    sigma_at_one: float | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Transition:
    """One flow-SDE step x_next = μ + s·z with its log-density; see :func:`flow_sde_posterior` for μ and s.

    ``noise`` is z, (B, ...); if None it is drawn from ``generator`` when a > 0. a = 0 is deterministic
    (the Euler step of the ODE), and ``log_prob`` is NaN there, as in :func:`ddim_step`.
    """
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both")
    posterior = flow_sde_posterior(
        model_output, sample, sigma, sigma_next, noise_level=noise_level, sigma_at_one=sigma_at_one
    )
    if noise is None and noise_level > 0:
        noise = _noise(posterior.mean.shape, posterior.mean, generator)
    return _sample(posterior, noise)


def log_prob_of(posterior: Gaussian, prev_sample: torch.Tensor) -> torch.Tensor:
    """log N(prev_sample; μ, σ²), averaged over all non-batch dimensions. Shape (B,), fp32.

    Per element −(x − μ)²/(2σ²) − log σ − ½·log 2π. The PPO ratio of a stored transition is
    exp(log_prob_of(posterior under the new model output, x_{t−1}) − stored log_prob); under the model output
    that sampled it this returns the stored value exactly. ``prev_sample`` is data: no gradient flows into it,
    only into μ. NaN where σ = 0 (a deterministic transition has no density).
    """
    std = posterior.std.expand_as(posterior.mean)  # (B, ...)
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    residual = prev_sample.detach().float() - posterior.mean  # (B, ...)
    log_density = -(residual**2) / (2 * safe_std**2) - safe_std.log() - _LOG_SQRT_2PI  # (B, ...)
    log_density = torch.where(positive, log_density, torch.full_like(log_density, math.nan))
    return log_density.mean(dim=tuple(range(1, log_density.ndim)))


def kl_to_reference(mean_policy: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(μ_θ, s²) ‖ N(μ_ref, s²)) per element, averaged over the non-batch dimensions. Shape (B,), fp32.

    Two Gaussians with one std s differ only in their means: KL = (μ_θ − μ_ref)²/(2s²), Flow-GRPO's KL penalty
    (arXiv 2505.05470), with ``std`` the transition std (``Transition.std``, broadcasting against the means).
    The reference's mean is a constant: only μ_θ carries a gradient. s must be > 0.
    """
    difference = mean_policy.float() - mean_ref.detach().float()  # (B, ...)
    kl = difference**2 / (2 * std.float() ** 2)  # (B, ...)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
