"""Hand-derived numbers and properties of mmalign.losses.

Notation: s = score (log-likelihood surrogate); for diffusion s = −½·e with e the per-sample mean squared error.
r = s_θ − s_ref, Δ = r_w − r_l, and L(x) := −log σ(x) = log(1 + e^(−x)). Values used: L(0) = ln 2 = 0.693147, L(0.25) = 0.575939, L(−0.25) = 0.825939,
L(0.5) = 0.474077, L(1) = 0.313262, L(−1) = 1.313262, L(2) = 0.126928, L(−2) = 2.126928,
σ(0.5) = 0.622459, σ(1) = 0.731059, σ(2) = 0.880797.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmalign.config import LossConfig
from mmalign.errors import UserError
from mmalign.losses import (
    LOSSES,
    PAIRWISE,
    bco_pair,
    dpo,
    get_loss,
    hinge,
    ipo,
    kto,
    mismatched_reference_point,
    robust,
    rwr,
    rwr_weights,
    sft,
)

TOL = 1e-6


def scores_from_errors(*errors: list[float], requires_grad: bool = False):
    """Per-sample errors → (scores s = −½·e, error leaf tensors). fp64 leaves; the losses cast to fp32."""
    leaves = [torch.tensor(e, dtype=torch.float64, requires_grad=requires_grad) for e in errors]
    return [-0.5 * e for e in leaves], leaves


# ---------------------------------------------------------------- DPO (Diffusion-DPO, Flow-DPO)


@pytest.mark.parametrize("beta", [0.1, 1.0, 100.0, 2500.0, 5000.0])
def test_dpo_is_ln2_at_policy_equals_reference(beta):
    """Policy = reference ⇒ r_w = r_l = 0 ⇒ Δ = 0 ⇒ loss = −log σ(0) = ln 2 = 0.693147 for every β."""
    torch.manual_seed(0)
    chosen, rejected = torch.randn(5), torch.randn(5)
    out = dpo(chosen, rejected, chosen.clone(), rejected.clone(), beta=beta)
    assert out.loss.shape == (5,)
    torch.testing.assert_close(out.loss, torch.full((5,), math.log(2.0)), atol=TOL, rtol=0)


def test_dpo_gradient_at_reference_is_quarter_beta():
    """With s = −½e: βΔ = −½β·((e_θ,w − e_θ,l) − (e_ref,w − e_ref,l)) =: −½β·x, loss = L(−½β·x).

    d loss / dx = −(1 − σ(−½βx))·(−½β) = ½β·σ(½βx); at x = 0 that is ½β·½ = ¼β = 1250 for β = 5000.
    So d loss / d e_θ,w = +1250 and d loss / d e_θ,l = −1250.
    """
    (pw, pl, rw, rl), (e_pw, e_pl, _, _) = scores_from_errors(
        [0.0123], [0.0456], [0.0123], [0.0456], requires_grad=True
    )
    dpo(pw, pl, rw, rl, beta=5000.0).loss.sum().backward()
    assert e_pw.grad.item() == pytest.approx(1250.0, rel=1e-6)
    assert e_pl.grad.item() == pytest.approx(-1250.0, rel=1e-6)


@pytest.mark.parametrize(
    ("error_gap", "expected"),
    [(-1e-4, 0.575939), (1e-4, 0.825939), (-4e-4, 0.313262)],
)
def test_diffusion_dpo_numbers(error_gap, expected):
    """β = 5000, x = (e_θ,w − e_θ,l) − (e_ref,w − e_ref,l). βΔ = −½·5000·x = −2500·x.

    x = −1e-4 → βΔ = 0.25 → L(0.25) = log(1 + e^−0.25) = log(1.778801) = 0.575939;
    x = +1e-4 → βΔ = −0.25 → L(−0.25) = log(2.284025) = 0.825939;
    x = −4e-4 → βΔ = 1 → L(1) = log(1.367879) = 0.313262.
    Built as e_ref,w = e_ref,l = 5e-4, e_θ,l = 5e-4, e_θ,w = 5e-4 + x.
    """
    (pw, pl, rw, rl), _ = scores_from_errors([5e-4 + error_gap], [5e-4], [5e-4], [5e-4])
    out = dpo(pw, pl, rw, rl, beta=5000.0)
    assert out.loss.item() == pytest.approx(expected, abs=TOL)


def test_flow_dpo_number():
    """Flow-DPO, β = 100, (e_θ,w − e_ref,w) − (e_θ,l − e_ref,l) = −0.01.

    βΔ = −½·100·(−0.01) = 0.5 → L(0.5) = log(1 + e^−0.5) = log(1.606531) = 0.474077.
    Built as e_θ,w = 0.02, e_ref,w = 0.03 (gap −0.01), e_θ,l = e_ref,l = 0.04.
    """
    (pw, pl, rw, rl), _ = scores_from_errors([0.02], [0.04], [0.03], [0.04])
    assert dpo(pw, pl, rw, rl, beta=100.0).loss.item() == pytest.approx(0.474077, abs=TOL)


def test_dpo_sign_flip():
    """Swapping chosen and rejected negates Δ: dpo(l, w) = L(−βΔ).

    L(x) − L(−x) = log(1 + e^−x) − log(1 + e^x) = log(e^−x) = −x, so dpo(w, l) − dpo(l, w) = −βΔ exactly.
    With β = 2, Δ = (0.3 − 0.1) − (−0.2 − 0.1) = 0.5: βΔ = 1, dpo(w,l) = L(1) = 0.313262, dpo(l,w) = L(−1) = 1.313262.
    """
    pw, pl = torch.tensor([0.3, 1.0, -2.0]), torch.tensor([-0.2, 0.5, 0.7])
    rw, rl = torch.tensor([0.1, 0.9, -1.0]), torch.tensor([0.1, 0.8, 0.4])
    beta = 2.0
    forward = dpo(pw, pl, rw, rl, beta=beta).loss
    swapped = dpo(pl, pw, rl, rw, beta=beta).loss
    delta = (pw - rw) - (pl - rl)
    torch.testing.assert_close(forward - swapped, -beta * delta, atol=TOL, rtol=0)
    assert forward[0].item() == pytest.approx(0.313262, abs=TOL)
    assert swapped[0].item() == pytest.approx(1.313262, abs=TOL)


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_batch_order_independence(name):
    """Permuting the batch permutes the per-pair losses and rewards; the mean is unchanged."""
    torch.manual_seed(1)
    pw, pl, rw, rl = (torch.randn(6) for _ in range(4))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    loss_fn = LOSSES[name].fn
    out = loss_fn(pw, pl, rw, rl, beta=0.7)
    permuted = loss_fn(pw[perm], pl[perm], rw[perm], rl[perm], beta=0.7)
    torch.testing.assert_close(permuted.loss, out.loss[perm])
    torch.testing.assert_close(permuted.chosen_rewards, out.chosen_rewards[perm])
    torch.testing.assert_close(permuted.loss.mean(), out.loss.mean())


def test_mean_taken_outside_logsigmoid():
    """βΔ = [2, −2] (β = 1): per-pair L(2) = 0.126928, L(−2) = 2.126928, mean = 1.126928.

    A mean inside the log-sigmoid would give L(mean βΔ) = L(0) = ln 2 = 0.693147 instead.
    """
    pw, pl = torch.tensor([2.0, -2.0]), torch.zeros(2)
    out = dpo(pw, pl, torch.zeros(2), torch.zeros(2), beta=1.0)
    assert out.loss.shape == (2,)
    torch.testing.assert_close(out.loss, torch.tensor([0.126928, 2.126928]), atol=TOL, rtol=0)
    assert out.loss.mean().item() == pytest.approx(1.126928, abs=TOL)


def test_dpo_rewards_are_beta_log_ratios_and_detached():
    """chosen_rewards = β·(s_θ,w − s_ref,w) = 3·(1.5 − 0.5) = 3; rejected_rewards = 3·(0.25 − 1) = −2.25."""
    pw = torch.tensor([1.5], requires_grad=True)
    out = dpo(pw, torch.tensor([0.25]), torch.tensor([0.5]), torch.tensor([1.0]), beta=3.0)
    assert out.chosen_rewards.item() == pytest.approx(3.0)
    assert out.rejected_rewards.item() == pytest.approx(-2.25)
    assert not out.chosen_rewards.requires_grad
    assert not out.rejected_rewards.requires_grad
    assert out.loss.requires_grad


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_losses_compute_in_fp32(name):
    """bf16 / fp16 inputs give fp32 losses and rewards."""
    pw, pl, rw, rl = (torch.randn(3).to(dtype) for dtype in (torch.bfloat16, torch.float16) * 2)
    out = LOSSES[name].fn(pw, pl, rw, rl, beta=1.0)
    assert out.loss.dtype == torch.float32
    assert out.chosen_rewards.dtype == torch.float32


def test_dpo_label_smoothing_hand_number():
    """βΔ = 1, ε = 0.1: (1 − ε)·L(1) + ε·L(−1) = 0.9·0.313262 + 0.1·1.313262 = 0.281936 + 0.131326 = 0.413262.

    (Equivalently L(x) + ε·x, since L(−x) = L(x) + x: 0.313262 + 0.1 = 0.413262.)
    """
    out = dpo(
        torch.tensor([1.0]), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0, label_smoothing=0.1
    )
    assert out.loss.item() == pytest.approx(0.413262, abs=TOL)


def test_dpo_tie_label_is_symmetric_with_minimum_at_zero():
    """ε = 0.5 (a tie): ½L(x) + ½L(−x) is even in x, so swapping the pair changes nothing, and its gradient
    at Δ = 0 is ½·(−σ(0)) + ½·σ(0) = 0. At βΔ = 1: 0.313262 + 0.5 = 0.813262."""
    pw = torch.tensor([1.0, -1.0, 0.0], requires_grad=True)
    zeros = torch.zeros(3)
    out = dpo(pw, zeros, zeros, zeros, beta=1.0, label_smoothing=0.5)
    torch.testing.assert_close(out.loss, torch.tensor([0.813262, 0.813262, math.log(2.0)]), atol=TOL, rtol=0)
    out.loss.sum().backward()
    assert pw.grad[2].item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("eps", [-0.1, 0.6])
def test_dpo_rejects_label_smoothing_out_of_range(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0, label_smoothing=eps)


# ---------------------------------------------------------------- IPO, hinge, robust, BCO


def test_ipo_hand_numbers():
    """β = 0.1 ⇒ target 1/(2β) = 5. Δ = 7 → (7 − 5)² = 4; Δ = 5 → 0; Δ = 0 (policy = ref) → 25 = 1/(4β²)."""
    pw = torch.tensor([7.0, 5.0, 0.0])
    zeros = torch.zeros(3)
    out = ipo(pw, zeros, zeros, zeros, beta=0.1)
    torch.testing.assert_close(out.loss, torch.tensor([4.0, 0.0, 25.0]), atol=1e-5, rtol=0)


def test_hinge_hand_numbers():
    """β = 2: Δ = 0.25 → relu(1 − 0.5) = 0.5; Δ = 1 → relu(−1) = 0; Δ = −0.5 → relu(2) = 2; Δ = 0 → 1."""
    pw = torch.tensor([0.25, 1.0, -0.5, 0.0])
    zeros = torch.zeros(4)
    out = hinge(pw, zeros, zeros, zeros, beta=2.0)
    torch.testing.assert_close(out.loss, torch.tensor([0.5, 0.0, 2.0, 1.0]), atol=TOL, rtol=0)


def test_robust_hand_number():
    """ε = 0.1, βΔ = 1: [0.9·L(1) − 0.1·L(−1)] / 0.8 = [0.281936 − 0.131326] / 0.8 = 0.150610 / 0.8 = 0.188262.

    (Check: L(1) − ε·1/(1 − 2ε) = 0.313262 − 0.125 = 0.188262.)
    """
    out = robust(
        torch.tensor([1.0]), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0, label_noise=0.1
    )
    assert out.loss.item() == pytest.approx(0.188262, abs=TOL)


def test_robust_without_noise_is_dpo():
    torch.manual_seed(2)
    pw, pl, rw, rl = (torch.randn(4) for _ in range(4))
    expected = dpo(pw, pl, rw, rl, beta=1.5).loss
    torch.testing.assert_close(robust(pw, pl, rw, rl, beta=1.5, label_noise=0.0).loss, expected)
    torch.testing.assert_close(robust(pw, pl, rw, rl, beta=1.5, label_noise=1e-7).loss, expected)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_rejects_noise_at_or_above_half(eps):
    with pytest.raises(ValueError, match="label_noise"):
        robust(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0, label_noise=eps)


def test_bco_pair_hand_numbers():
    """β = 1, r_w = 1, r_l = −1.

    δ = 0: L(1) + L(−(−1)) = 2·0.313262 = 0.626523.
    δ = 1: L(1 − 1) + L(−(−1 − 1)) = L(0) + L(2) = 0.693147 + 0.126928 = 0.820075.
    policy = reference, δ = 0: 2·ln 2 = 1.386294.
    """
    one, zero = torch.ones(1), torch.zeros(1)
    assert bco_pair(one, -one, zero, zero, beta=1.0).loss.item() == pytest.approx(0.626523, abs=TOL)
    assert bco_pair(one, -one, zero, zero, beta=1.0, delta=1.0).loss.item() == pytest.approx(
        0.820075, abs=TOL
    )
    assert bco_pair(one, one, one, one, beta=1.0).loss.item() == pytest.approx(1.386294, abs=TOL)


# ---------------------------------------------------------------- KTO (Diffusion-KTO)


def test_kto_diffusion_kto_numbers():
    """Diffusion-KTO writes g = e_ref − e_θ and loss_D = 1 − σ(β_p·(g − z_p)), β_p = 1000.

    Here r = s_θ − s_ref = −½e_θ + ½e_ref = g/2, so β·(r − z) = β_p·(g − z_p) needs β = 2·β_p = 2000 and
    z = z_p/2. Take e_θ = 1e-3, e_ref = 2e-3: g = 1e-3, r = 5e-4.
      z_p = 0:    β·r = 2000·5e-4 = 1 → desirable 1 − σ(1) = 0.268941, undesirable 1 − σ(−1) = 0.731059.
      z_p = 5e-4: z = 2.5e-4, β·(r − z) = 2000·2.5e-4 = 0.5 → desirable 1 − σ(0.5) = 0.377541.
    """
    (policy, ref), _ = scores_from_errors([1e-3, 1e-3], [2e-3, 2e-3])
    desirable = torch.tensor([True, False])
    out = kto(policy, ref, desirable, beta=2000.0, reference_point=torch.tensor(0.0))
    torch.testing.assert_close(out.loss, torch.tensor([0.268941, 0.731059]), atol=TOL, rtol=0)
    out = kto(policy, ref, desirable, beta=2000.0, reference_point=torch.tensor(2.5e-4))
    assert out.loss[0].item() == pytest.approx(0.377541, abs=TOL)


def test_kto_batch_reference_point_matches_paper():
    """z from the batch: g = [1e-3, 0] ⇒ z_p = mean g = 5e-4; r = g/2 = [5e-4, 0] ⇒ z = 2.5e-4 = z_p/2.

    Both desirable, β = 2000: sample 0 → 1 − σ(2000·2.5e-4) = 1 − σ(0.5) = 0.377541;
    sample 1 → 1 − σ(−0.5) = σ(0.5) = 0.622459.
    """
    (policy, ref), _ = scores_from_errors([1e-3, 2e-3], [2e-3, 2e-3])
    out = kto(policy, ref, torch.tensor([True, True]), beta=2000.0)
    assert out.reference_point.item() == pytest.approx(2.5e-4, rel=1e-5)
    torch.testing.assert_close(out.loss, torch.tensor([0.377541, 0.622459]), atol=TOL, rtol=0)


def test_kto_half_at_policy_equals_reference():
    """r = 0 ⇒ z = max(0, 0) = 0 ⇒ loss = 1 − σ(0) = 0.5 for desirable and undesirable alike."""
    torch.manual_seed(3)
    scores = torch.randn(4)
    out = kto(scores, scores.clone(), torch.tensor([True, False, True, False]), beta=2000.0)
    torch.testing.assert_close(out.loss, torch.full((4,), 0.5), atol=TOL, rtol=0)


def test_kto_reference_point_clamped_at_zero():
    """r = [−1e-3, −2e-3] ⇒ mean −1.5e-3 ⇒ z = 0. β = 1000, desirable:
    1 − σ(−1) = σ(1) = 0.731059 and 1 − σ(−2) = σ(2) = 0.880797.
    Without the clamp z = −1.5e-3 would give 1 − σ(0.5) = 0.377541 for sample 0.
    """
    out = kto(torch.tensor([-1e-3, -2e-3]), torch.zeros(2), torch.tensor([True, True]), beta=1000.0)
    assert out.reference_point.item() == 0.0
    torch.testing.assert_close(out.loss, torch.tensor([0.731059, 0.880797]), atol=TOL, rtol=0)


def test_kto_reference_point_is_detached():
    """No gradient flows through z: d loss_0 / d s_1 = 0 although s_1 enters the batch mean.

    r = [1e-3, 3e-3], z = 2e-3, β = 1000, desirable: loss_0 = 1 − σ(β(r_0 − z)) = 1 − σ(−1);
    d loss_0 / d s_0 = −β·σ(−1)·(1 − σ(−1)) = −1000·0.268941·0.731059 = −196.612.
    (If z carried gradient, d loss_0 / d s_0 would be halved and d loss_0 / d s_1 = +98.306.)
    """
    policy = torch.tensor([1e-3, 3e-3], requires_grad=True)
    out = kto(policy, torch.zeros(2), torch.tensor([True, True]), beta=1000.0)
    assert not out.reference_point.requires_grad
    assert not out.rewards.requires_grad
    out.loss[0].backward()
    assert policy.grad[1].item() == 0.0
    assert policy.grad[0].item() == pytest.approx(-196.612, rel=1e-4)


def test_kto_explicit_reference_point_is_detached():
    policy = torch.tensor([1e-3], requires_grad=True)
    z = torch.tensor(5e-4, requires_grad=True)
    kto(policy, torch.zeros(1), torch.tensor([True]), beta=1000.0, reference_point=z).loss.sum().backward()
    assert z.grad is None


def test_kto_desirable_and_undesirable_weights():
    """At policy = reference each sample is λ_y·0.5: λ_D = 2 → 1.0, λ_U = 3 → 1.5."""
    scores = torch.tensor([0.3, -0.4])
    out = kto(
        scores,
        scores.clone(),
        torch.tensor([True, False]),
        beta=1.0,
        desirable_weight=2.0,
        undesirable_weight=3.0,
    )
    torch.testing.assert_close(out.loss, torch.tensor([1.0, 1.5]), atol=TOL, rtol=0)


def test_kto_rejects_non_bool_desirable():
    with pytest.raises(ValueError, match="bool"):
        kto(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, 0.0]), beta=1.0)


def test_mismatched_reference_point():
    """mean([0.4, 0.1, −0.2] − 0.1) = (0.3 + 0 − 0.3)/3 = 0 → 0; mean([0.5, 0.2] − 0) = 0.35;
    mean([−0.5, 0.1]) = −0.2 → clamped to 0. Always detached."""
    policy = torch.tensor([0.4, 0.1, -0.2], requires_grad=True)
    z = mismatched_reference_point(policy, torch.full((3,), 0.1))
    assert z.item() == pytest.approx(0.0, abs=1e-7)
    assert not z.requires_grad
    assert mismatched_reference_point(torch.tensor([0.5, 0.2]), torch.zeros(2)).item() == pytest.approx(0.35)
    assert mismatched_reference_point(torch.tensor([-0.5, 0.1]), torch.zeros(2)).item() == 0.0


def _kto_rank(rank: int, world_size: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    rewards = torch.tensor([1e-3, 1e-3]) if rank == 0 else torch.tensor([3e-3, 5e-3])
    out = kto(rewards, torch.zeros(2), torch.tensor([True, False]), beta=1.0)
    mismatched = mismatched_reference_point(rewards, torch.zeros(2))
    torch.save({"kto": out.reference_point, "mismatched": mismatched}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_kto_reference_point_averaged_across_ranks(tmp_path):
    """Rank means 1e-3 and 4e-3 ⇒ z = (1e-3 + 4e-3)/2 = 2.5e-3 on both ranks (sum / world size)."""
    mp.spawn(_kto_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["kto"].item() == pytest.approx(2.5e-3, rel=1e-5)
        assert result["mismatched"].item() == pytest.approx(2.5e-3, rel=1e-5)


# ---------------------------------------------------------------- Flow-RWR


def test_rwr_weights_sum_to_batch_size():
    torch.manual_seed(4)
    weights = rwr_weights(torch.randn(7), temperature=0.5)
    assert weights.sum().item() == pytest.approx(7.0, rel=1e-6)
    assert weights.dtype == torch.float32


def test_rwr_weights_monotone_in_reward():
    weights = rwr_weights(torch.tensor([0.1, -1.0, 2.0, 0.5]))
    order = torch.argsort(weights)
    assert order.tolist() == [1, 0, 3, 2]


def test_rwr_weights_equal_for_equal_rewards():
    torch.testing.assert_close(rwr_weights(torch.full((5,), 3.7)), torch.ones(5))


def test_rwr_weights_large_temperature_is_uniform():
    weights = rwr_weights(torch.tensor([0.0, 1.0, -2.0]), temperature=1e6)
    torch.testing.assert_close(weights, torch.ones(3), atol=1e-5, rtol=0)


def test_rwr_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        rwr_weights(torch.zeros(2), temperature=0.0)


def test_rwr_loss_hand_number():
    """r = [0, ln 3], τ = 1: softmax = [1/4, 3/4], weights = 2·softmax = [0.5, 1.5].
    e = [0.2, 0.4] ⇒ w·e = [0.1, 0.6]. Gradient flows into e (d/de = w), never into r."""
    errors = torch.tensor([0.2, 0.4], requires_grad=True)
    rewards = torch.tensor([0.0, math.log(3.0)], requires_grad=True)
    loss = rwr(errors, rewards)
    torch.testing.assert_close(loss, torch.tensor([0.1, 0.6]), atol=TOL, rtol=0)
    loss.sum().backward()
    torch.testing.assert_close(errors.grad, torch.tensor([0.5, 1.5]), atol=TOL, rtol=0)
    assert rewards.grad is None


# ---------------------------------------------------------------- name lookup


def test_get_loss_returns_registered_function():
    assert get_loss("dpo").fn is dpo
    assert get_loss("kto").fn is kto
    assert get_loss("sft").fn is sft
    assert PAIRWISE == ("dpo", "ipo", "hinge", "robust", "bco_pair")
    assert {name for name, spec in LOSSES.items() if spec.inputs == "pairs"} == set(PAIRWISE)


def test_get_loss_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as excinfo:
        get_loss("dpp")
    assert str(excinfo.value) == (
        "unknown loss 'dpp'; choose one of: bco_pair, dpo, hinge, ipo, kto, robust, sft"
    )


def test_registered_options_are_config_keys_the_function_takes():
    """Each loss's ``options`` are ``loss.*`` config keys and keyword arguments of its function; its ``state``
    (δ) is a keyword argument but never a config key: the recipe keeps it."""
    config_keys = {f.name for f in dataclasses.fields(LossConfig)}
    for name, spec in LOSSES.items():
        parameters = inspect.signature(spec.fn).parameters
        for key in (*spec.options, *spec.state):
            assert parameters[key].kind is inspect.Parameter.KEYWORD_ONLY, (name, key)
        assert set(spec.options) <= config_keys, name
        assert not set(spec.state) & config_keys, name
    assert LOSSES["dpo"].options == ("label_smoothing",)
    assert LOSSES["robust"].options == ("label_noise",)
    assert LOSSES["bco_pair"].state == ("delta",)
    assert all(not LOSSES[name].options for name in ("ipo", "hinge", "bco_pair"))


def test_sft_is_the_chosen_error_in_fp32():
    """sft(e) = e per sample, not reduced: errors [0.25, 1.5] in bf16 give [0.25, 1.5] in fp32 (both exact)."""
    out = sft(torch.tensor([0.25, 1.5], dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.25, 1.5]), atol=0, rtol=0)
