"""The online-RL building blocks: samplers with log-probabilities, the stage schedule, advantages, PPO.

Samplers are checked against the real diffusers schedulers (``DDIMScheduler``, ``FlowMatchEulerDiscreteScheduler``)
on fixed random "model outputs" — no model is needed, since a step only sees the model's output tensor — and
their log-densities against ``torch.distributions.Normal``. Numbers in the docstrings are derived by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal, kl_divergence

from mmalign.errors import UserError
from mmalign.losses import ppo_clip
from mmalign.rl import (
    PromptStats,
    ddim_posterior,
    ddim_prev_timestep,
    ddim_step,
    flow_sde_posterior,
    flow_sde_step,
    is_constant,
    kl_to_reference,
    log_prob_of,
    select_branches,
    split_step,
)

SHAPE = (3, 4, 8, 8)  # (B, C, H, W)


def sd_ddim(prediction_type: str = "epsilon", **overrides) -> DDIMScheduler:
    """A DDIM schedule as Stable Diffusion 1.x configures it, at 20 inference steps."""
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    scheduler = DDIMScheduler(**{**config, **overrides})
    scheduler.set_timesteps(20)
    return scheduler


def tensors(count: int, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def mean_over_dims(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------- DDIM


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_equals_diffusers_for_the_same_noise(prediction_type, eta):
    """Bit for bit, at every step of a 20-step schedule, the last one (prev timestep < 0 → final ᾱ) included."""
    scheduler = sd_ddim(prediction_type)
    for index, t in enumerate(scheduler.timesteps):
        model_output, sample, noise = tensors(3, seed=index)
        ours = ddim_step(
            scheduler, model_output, sample, t, ddim_prev_timestep(scheduler, t), eta=eta, noise=noise
        )
        theirs = scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
        assert torch.equal(ours.prev_sample, theirs), f"step {index} (t = {int(t)})"
        if eta == 0.0:
            assert torch.isnan(ours.log_prob).all(), "a deterministic step has no density"
            assert torch.equal(ours.prev_sample, ours.mean)
        else:
            assert torch.isfinite(ours.log_prob).all() and ours.log_prob.shape == (SHAPE[0],)


def test_ddim_std_is_the_eq16_std():
    """σ_t = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_prev), here at t = 501 → 451, η = 0.5."""
    scheduler = sd_ddim()
    model_output, sample = tensors(2)
    posterior = ddim_posterior(scheduler, model_output, sample, 501, 451, eta=0.5)
    a_t, a_prev = scheduler.alphas_cumprod[501].double(), scheduler.alphas_cumprod[451].double()
    expected = 0.5 * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    assert posterior.std.item() == pytest.approx(expected, rel=1e-5)


def test_ddim_batch_of_mixed_timesteps_equals_one_step_per_sample():
    scheduler = sd_ddim()
    model_output, sample, noise = tensors(3)
    timesteps = scheduler.timesteps[[0, 7, 19]]  # (B,)
    batched = ddim_step(
        scheduler,
        model_output,
        sample,
        timesteps,
        ddim_prev_timestep(scheduler, timesteps),
        eta=1.0,
        noise=noise,
    )
    for i, t in enumerate(timesteps):
        one = ddim_step(
            scheduler,
            model_output[i : i + 1],
            sample[i : i + 1],
            int(t),
            int(ddim_prev_timestep(scheduler, t)),
            eta=1.0,
            noise=noise[i : i + 1],
        )
        torch.testing.assert_close(batched.prev_sample[i : i + 1], one.prev_sample, rtol=0, atol=1e-6)
        torch.testing.assert_close(batched.log_prob[i : i + 1], one.log_prob, rtol=0, atol=1e-6)


def test_ddim_last_step_with_alpha_one_is_deterministic():
    """set_alpha_to_one: ᾱ_prev = 1 at the last step ⇒ σ_t = 0 for any η ⇒ log-prob NaN."""
    scheduler = sd_ddim(set_alpha_to_one=True)
    model_output, sample = tensors(2)
    t = scheduler.timesteps[-1]
    step = ddim_step(scheduler, model_output, sample, t, ddim_prev_timestep(scheduler, t), eta=1.0)
    assert torch.isnan(step.log_prob).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_log_prob_is_the_normal_log_density_averaged_over_dims(prediction_type):
    scheduler = sd_ddim(prediction_type)
    model_output, sample = tensors(2)
    t = scheduler.timesteps[5]
    step = ddim_step(
        scheduler,
        model_output,
        sample,
        t,
        ddim_prev_timestep(scheduler, t),
        eta=1.0,
        generator=torch.Generator(),
    )
    expected = mean_over_dims(Normal(step.mean, step.std).log_prob(step.prev_sample))
    torch.testing.assert_close(step.log_prob, expected, rtol=0, atol=1e-5)


def test_ddim_refuses_unsupported_schedulers_and_eta():
    model_output, sample = tensors(2)
    with pytest.raises(UserError, match="prediction_type 'sample'.*epsilon, v_prediction"):
        ddim_posterior(sd_ddim("sample"), model_output, sample, 501, 451, eta=1.0)
    with pytest.raises(UserError, match="clip_sample=False"):
        ddim_posterior(sd_ddim(clip_sample=True), model_output, sample, 501, 451, eta=1.0)
    with pytest.raises(UserError, match="eta must be >= 0"):
        ddim_posterior(sd_ddim(), model_output, sample, 501, 451, eta=-0.1)


# ---------------------------------------------------------------- flow SDE


def test_flow_sde_without_noise_is_the_euler_step_of_diffusers():
    """a = 0 ⇒ μ = x + v·(σ_next − σ), FlowMatchEulerDiscreteScheduler.step, from σ = 1 on."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    assert scheduler.sigmas[0] == 1.0
    for index, t in enumerate(scheduler.timesteps):
        velocity, sample = tensors(2, seed=index)
        sigma, sigma_next = scheduler.sigmas[index], scheduler.sigmas[index + 1]
        ours = flow_sde_step(velocity, sample, sigma, sigma_next, noise_level=0.0)
        theirs = scheduler.step(velocity, t, sample).prev_sample
        assert torch.equal(ours.prev_sample, theirs)
        assert torch.isnan(ours.log_prob).all()


def test_flow_sde_mean_and_std_by_hand():
    """σ = 0.5 → 0.4, a = 0.7: σ_t² = 0.49·0.5/0.5 = 0.49, Δ = −0.1, x = 1, v = 2 (one element):
    μ = 1 + [2 + 0.49/(2·0.5)·(1 + 0.5·2)]·(−0.1) = 1 − 0.1·(2 + 0.98) = 0.702; s = 0.7·sqrt(0.1) = 0.221359."""
    posterior = flow_sde_posterior(
        torch.full((1, 1), 2.0), torch.full((1, 1), 1.0), 0.5, 0.4, noise_level=0.7
    )
    assert posterior.mean.item() == pytest.approx(0.702, abs=1e-6)
    assert posterior.std.item() == pytest.approx(0.7 * math.sqrt(0.1), abs=1e-6)


def test_flow_sde_keeps_the_marginals_of_the_flow():
    """Pins the sign of the score term: for data at one point c the exact velocity is v = (x − c)/σ and
    x_σ ~ N((1 − σ)·c, σ²). Running the SDE (a = 0.7) from σ = 0.8 to 0.2 must land on N(0.8·c, 0.2²);
    with the score term's sign flipped the spread grows instead (about 0.5 here)."""
    generator = torch.Generator().manual_seed(0)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0])
    x = 0.2 * c + 0.8 * torch.randn(4000, 4, generator=generator)  # (N, D) at σ = 0.8
    sigmas = torch.linspace(0.8, 0.2, 301)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        velocity = (x - c) / sigma
        x = flow_sde_step(velocity, x, sigma, sigma_next, noise_level=0.7, generator=generator).prev_sample
    torch.testing.assert_close(x.mean(0), 0.8 * c, rtol=0, atol=0.02)
    torch.testing.assert_close(x.std(0), torch.full((4,), 0.2), rtol=0.05, atol=0)


def test_flow_sde_log_prob_is_the_normal_log_density_averaged_over_dims():
    velocity, sample = tensors(2)
    sigma = torch.tensor([0.9, 0.6, 0.3])  # (B,) mixed noise levels
    step = flow_sde_step(velocity, sample, sigma, sigma - 0.1, generator=torch.Generator())
    assert step.std.shape == (3, 1, 1, 1)
    expected = mean_over_dims(Normal(step.mean, step.std).log_prob(step.prev_sample))
    torch.testing.assert_close(step.log_prob, expected, rtol=0, atol=1e-5)


def test_flow_sde_at_sigma_one_needs_a_stand_in():
    """σ_t = a·sqrt(σ/(1 − σ)) is infinite at σ = 1; Flow-GRPO puts the schedule's second σ in the denominator."""
    velocity, sample = tensors(2)
    with pytest.raises(ValueError, match="sigma_at_one"):
        flow_sde_posterior(velocity, sample, 1.0, 0.9, noise_level=0.7)
    posterior = flow_sde_posterior(velocity, sample, 1.0, 0.9, noise_level=0.7, sigma_at_one=0.9)
    assert posterior.std.item() == pytest.approx(0.7 * math.sqrt(1 / 0.1) * math.sqrt(0.1), rel=1e-5)
    with pytest.raises(UserError, match="noise_level must be >= 0"):
        flow_sde_posterior(velocity, sample, 0.5, 0.4, noise_level=-1.0)


# ---------------------------------------------------------------- recomputation and KL


def test_recomputed_log_prob_equals_the_sampled_one_and_moves_with_the_output():
    scheduler = sd_ddim()
    model_output, sample, other = tensors(3)
    t = scheduler.timesteps[3]
    prev = ddim_prev_timestep(scheduler, t)
    step = ddim_step(scheduler, model_output, sample, t, prev, eta=1.0, generator=torch.Generator())
    again = log_prob_of(ddim_posterior(scheduler, model_output, sample, t, prev, eta=1.0), step.prev_sample)
    assert torch.equal(again, step.log_prob)
    new_output = (model_output + 0.1 * other).requires_grad_()
    moved = log_prob_of(ddim_posterior(scheduler, new_output, sample, t, prev, eta=1.0), step.prev_sample)
    assert not torch.isclose(moved, step.log_prob, rtol=0, atol=1e-6).any()
    moved.sum().backward()
    assert new_output.grad.abs().sum() > 0

    velocity, x, other = tensors(3, seed=1)
    flow = flow_sde_step(velocity, x, 0.7, 0.6, generator=torch.Generator())
    assert torch.equal(
        log_prob_of(flow_sde_posterior(velocity, x, 0.7, 0.6), flow.prev_sample), flow.log_prob
    )
    moved = log_prob_of(flow_sde_posterior(velocity + 0.1 * other, x, 0.7, 0.6), flow.prev_sample)
    assert not torch.isclose(moved, flow.log_prob, rtol=0, atol=1e-6).any()


def test_kl_to_reference_is_the_gaussian_kl_averaged_over_dims():
    mean_policy, mean_ref = tensors(2)
    std = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1, 1)
    expected = mean_over_dims(kl_divergence(Normal(mean_policy, std), Normal(mean_ref, std)))
    torch.testing.assert_close(kl_to_reference(mean_policy, mean_ref, std), expected, rtol=1e-5, atol=0)
    assert torch.equal(kl_to_reference(mean_ref, mean_ref, std), torch.zeros(3))


# ---------------------------------------------------------------- backward progressive schedule


@pytest.mark.parametrize(
    ("stage", "expected"), [(0, 14), (14, 14), (15, 15), (57, 17), (85, 19), (86, 20), (99, 20)]
)
def test_split_step_reference_values(stage, expected):
    """left 14, right 20, S 100: 14 + floor(stage·7/100), e.g. 57·7 = 399 → 3 → 17; 86·7 = 602 → 6 → 20."""
    assert split_step(stage, left=14, right=20, stages=100) == expected


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (dict(stage=0, left=14, right=20, stages=0), "stages"),
        (dict(stage=100, left=14, right=20, stages=100), "stage"),
        (dict(stage=-1, left=14, right=20, stages=100), "stage"),
        (dict(stage=0, left=0, right=20, stages=100), "left"),
        (dict(stage=0, left=14, right=13, stages=100), "right"),
    ],
)
def test_split_step_names_the_bad_argument(arguments, named):
    stage = arguments.pop("stage")
    with pytest.raises(UserError, match=f"^{named} must"):
        split_step(stage, **arguments)


# ---------------------------------------------------------------- PPO


def test_ppo_at_ratio_one_is_minus_the_advantage():
    """ρ = 1 ⇒ loss = −A: A = (1, −2, 0.5) → (−1, 2, −0.5), mean = −mean(A) = 0.5/3 = 0.166667."""
    log_prob = torch.tensor([-1.0, -0.5, 0.3])
    advantages = torch.tensor([1.0, -2.0, 0.5])
    out = ppo_clip(log_prob, log_prob.clone(), advantages, clip_range=0.1, advantage_clip=5.0)
    torch.testing.assert_close(out.loss, torch.tensor([-1.0, 2.0, -0.5]))
    assert out.loss.mean().item() == pytest.approx(-advantages.mean().item())
    assert torch.equal(out.ratio, torch.ones(3)) and not out.clipped.any()


def test_ppo_clipping_bounds_and_their_gradients():
    """ε = 0.2. ρ = 1.5: A = +1 → max(−1.5, −1.2) = −1.2, clipped, d/dlog p = 0; A = −1 → max(1.5, 1.2) = 1.5,
    d/dlog p = −A·ρ = 1.5. ρ = 0.5: A = −1 → max(0.5, 0.8) = 0.8, gradient 0; A = +1 → max(−0.5, −0.8) = −0.5,
    d/dlog p = −A·ρ = −0.5."""
    old = torch.zeros(4)
    log_prob = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    out = ppo_clip(log_prob, old, advantages, clip_range=0.2, advantage_clip=10.0)
    torch.testing.assert_close(out.loss, torch.tensor([-1.2, 1.5, 0.8, -0.5]))
    out.loss.sum().backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, 1.5, 0.0, -0.5]))
    assert out.clipped.all() and not out.ratio.requires_grad


def test_ppo_clamps_the_advantage_and_ignores_batch_order():
    """At ρ = 1 with c = 5: A = 12 → −5, A = −7 → 5, A = 3 → −3."""
    log_prob = torch.tensor([0.1, 0.2, 0.3])
    out = ppo_clip(
        log_prob, log_prob.clone(), torch.tensor([12.0, -7.0, 3.0]), clip_range=0.1, advantage_clip=5.0
    )
    torch.testing.assert_close(out.loss, torch.tensor([-5.0, 5.0, -3.0]))
    order = torch.tensor([2, 0, 1])
    new, old, advantages = (
        torch.tensor([0.3, -0.2, 0.05]),
        torch.tensor([0.0, 0.1, 0.0]),
        torch.tensor([1.0, -2.0, 3.0]),
    )
    first = ppo_clip(new, old, advantages, clip_range=0.1, advantage_clip=5.0).loss
    permuted = ppo_clip(new[order], old[order], advantages[order], clip_range=0.1, advantage_clip=5.0).loss
    torch.testing.assert_close(permuted, first[order])
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        ppo_clip(new, old, advantages, clip_range=0.0, advantage_clip=5.0)


# ---------------------------------------------------------------- per-prompt statistics


def test_prompt_stats_z_scores_over_a_window_of_stages():
    """window 1 keeps the current and the previous stage. Population std throughout.
    stage 0: a ← (1, 3): mean 2, std 1 → z = (−1, 1).
    stage 1: a ← 5: kept (1, 3, 5), mean 3, std sqrt(8/3) = 1.632993 → z = 2/1.632993 = 1.224745.
    stage 2: a ← 0: stage 0 drops out, kept (5, 0), mean 2.5, std 2.5 → z = −1."""
    stats = PromptStats(window=1, min_count=2)
    torch.testing.assert_close(
        stats.update(["a", "a"], torch.tensor([1.0, 3.0]), stage=0), torch.tensor([-1.0, 1.0])
    )
    torch.testing.assert_close(stats.update(["a"], torch.tensor([5.0]), stage=1), torch.tensor([1.224745]))
    torch.testing.assert_close(stats.update(["a"], torch.tensor([0.0]), stage=2), torch.tensor([-1.0]))
    assert [s for s, _ in stats.history["a"]] == [1, 2]


def test_prompt_stats_fall_back_to_the_batch_for_rare_prompts():
    """min_count 2: a has 2 rewards (own stats, z = ∓1); b has 1 → the call's rewards (1, 3, 8):
    mean 4, std sqrt(26/3) = 2.943920 → z_b = 4/2.943920 = 1.358732."""
    stats = PromptStats(window=8, min_count=2)
    z = stats.update(["a", "b", "a"], torch.tensor([1.0, 8.0, 3.0]), stage=0)
    torch.testing.assert_close(z, torch.tensor([-1.0, 1.358732, 1.0]))


def test_prompt_stats_state_round_trip():
    stats = PromptStats(window=2, min_count=2)
    generator = torch.Generator().manual_seed(0)
    for stage in range(3):
        stats.update(["a", "b", "a", "b"], torch.rand(4, generator=generator), stage=stage)
    restored = PromptStats(window=2, min_count=2)
    restored.load_state(json.loads(json.dumps(stats.state())))
    rewards = torch.rand(4, generator=generator)
    torch.testing.assert_close(
        restored.update(["a", "b", "b", "c"], rewards, stage=3),
        stats.update(["a", "b", "b", "c"], rewards, stage=3),
    )
    with pytest.raises(ValueError, match="stage must not decrease"):
        stats.update(["a"], torch.tensor([1.0]), stage=2)
    with pytest.raises(UserError, match="window must be >= 0"):
        PromptStats(window=-1, min_count=2)


# ---------------------------------------------------------------- branch selection, constant rewards


def test_select_branches_keeps_the_best_and_the_worst_past_the_thresholds():
    """Group 0: best 0.7 ≥ 0.5 kept, worst −0.9 < −0.5 kept. Group 1: nothing passes, nothing kept.
    Group 2: best exactly 0.5 kept (≥), worst exactly −0.5 dropped (<). Groups interleave in the batch."""
    z = torch.tensor([0.7, 0.3, 0.5, 0.1, 0.2, -0.5, -0.9, -0.4, 0.0])
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    keep = select_branches(z, groups)
    assert keep.tolist() == [True, False, True, False, False, False, True, False, False]
    with pytest.raises(UserError, match="low must be <= high"):
        select_branches(z, groups, high=-1.0, low=1.0)


def test_is_constant():
    assert is_constant(torch.zeros(6))
    assert not is_constant(torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError):
        is_constant(torch.tensor([]))
