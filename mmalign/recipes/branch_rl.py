"""Online RL on a denoiser against a (sparse) reward: B²-DiffuRL and its DDPO baseline, PPO-clip on a LoRA.

One loop for both algorithms, so that they are compared on equal terms (same prompts, seeds, sampler,
reward, advantages and loss); they differ only in which trajectories are sampled and which steps are trained:

- ``b2_diffurl`` (Hu et al., "Towards Better Alignment: Training Diffusion Models with Reinforcement Learning
  Against Sparse Rewards", CVPR 2025, arXiv 2503.11240): at stage i only the last s = split_step(i) of the T
  denoising steps are trained (backward progressive training, :func:`mmalign.rl.split_step`). Each prompt's
  trajectory is denoised ONCE down to step T − s (the shared prefix), then forks into k branches with
  independent noise. Rewards are z-scored per prompt over the current and the last ``rl.history`` stages,
  and in each branch group only the best branch (if z ≥ high) and the worst (if z < low) are trained.
- ``ddpo`` (Black et al., arXiv 2305.13301): k independent full trajectories per prompt, every step trained,
  per-prompt reward statistics.

    setup → per stage: sample (shared prefix, k branches) → reward → z-scores → select → inner epochs of
          PPO-clip on the kept transitions (ratio = exp(log p_θ − log p_old), Schulman et al. arXiv 1707.06347,
          Eq. 7) → log → validate → checkpoint → export

One run step (``optim.max_steps``) is one stage; each of its ``rl.inner_epochs`` is one optimizer step over
every kept transition, cut into ``optim.gradient_accumulation_steps`` micro-batches whose losses are scaled
so that the accumulated gradient is the mean over all of them — accumulation changes memory, not the update.
Every random draw (the stage's prompts, starting noise, each step's noise, the shuffle) is keyed by (seed,
stage, group, branch, step), so a resumed run equals an uninterrupted one. Every network forward is counted
(``denoiser_evals`` in ``metrics.jsonl``: sampling, training and reference passes, guidance counting two).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from mmalign import adapters
from mmalign.config import BranchRLTrainConfig
from mmalign.errors import UserError
from mmalign.losses import ppo_clip
from mmalign.recipes import evaluate, runtime
from mmalign.recipes.runtime import RunResult
from mmalign.rewards import build_reward
from mmalign.rl import PromptStats, is_constant, kl_to_reference, log_prob_of, select_branches, split_step

# the papers' values where rl.clip_range / rl.adv_clip / rl.min_count are null
DEFAULTS = {
    "b2_diffurl": {"clip_range": 0.1, "adv_clip": 5.0, "min_count": 1},
    "ddpo": {"clip_range": 1e-4, "adv_clip": 10.0, "min_count": 16},
}


@dataclass
class Rollout:
    """One stage's trajectories; N = prompts × branches samples, group-major, K trained steps each."""

    prompts: list[str]  # (N,)
    groups: torch.Tensor  # (N,) branch group (one per prompt)
    steps: torch.Tensor  # (K,) step indices of the trained transitions
    states: torch.Tensor  # (N, K, C, h, w) x_t
    nexts: torch.Tensor  # (N, K, C, h, w) x_{t−1} as sampled
    log_probs: torch.Tensor  # (N, K) log p_old(x_{t−1} | x_t)
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    evaluations: int  # network forwards spent sampling


class Ledger:
    """What a resume must carry besides the weights: the prompts' reward history, the evaluation count and the
    skipped stages (a checkpoint extra of ``runtime.Run``)."""

    def __init__(self, stats: PromptStats):
        self.stats = stats
        self.evaluations = {"sampling": 0, "training": 0}
        self.skipped = {"constant": 0, "nothing_kept": 0}
        self.warned: list[str] = []

    def warn_once(self, kind: str, text: str, run) -> None:
        if kind not in self.warned:
            self.warned.append(kind)
            warnings.warn(text, stacklevel=2)
            run.note(text)

    def row(self) -> dict[str, torch.Tensor]:
        counts = {
            "denoiser_evals": sum(self.evaluations.values()),
            "denoiser_evals_sampling": self.evaluations["sampling"],
            "stages_skipped_constant": self.skipped["constant"],
            "stages_skipped_nothing_kept": self.skipped["nothing_kept"],
        }
        return {key: torch.tensor([float(value)]) for key, value in counts.items()}

    def state(self) -> tuple[dict, dict]:
        meta = {"stats": self.stats.state(), "evaluations": self.evaluations, "skipped": self.skipped}
        return {}, {**meta, "warned": self.warned}

    def load_state(self, tensors: dict, meta: dict) -> None:
        self.stats.load_state(meta["stats"])
        self.evaluations, self.skipped = dict(meta["evaluations"]), dict(meta["skipped"])
        self.warned = list(meta["warned"])


def key_seed(*parts: int) -> int:
    """One 63-bit seed from integer parts (seed, stage, group, branch, step): distinct keys, distinct seeds."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part + 7) % (2**63 - 1)
    return value


def keyed_noise(keys: list[tuple[int, ...]], shape: tuple[int, ...], device) -> torch.Tensor:
    """Standard normal noise (len(keys), *shape), each row from its own key."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(key_seed(*k))) for k in keys]
    return torch.stack(rows).to(device)


def trained_span(cfg: BranchRLTrainConfig, stage: int, steps: int) -> int:
    """How many final denoising steps stage ``stage`` trains (all of them for DDPO)."""
    if cfg.rl.algorithm == "ddpo":
        return steps
    stages = cfg.rl.stages or cfg.optim.max_steps
    return split_step(stage, left=cfg.rl.left, right=cfg.rl.right, stages=stages)


@torch.no_grad()
def sample_stage(sampler, network, prompts: list[str], *, cfg, stage: int, span: int, device) -> Rollout:
    """Denoise each prompt's shared prefix once, fork it into ``rl.branches`` branches with independent noise,
    finish the branches and keep their stochastic transitions of the last ``span`` steps.

    DDPO (``span`` = T, no prefix) starts every branch from its own noise; B²-DiffuRL starts a group's branches
    from the one prefix state. Noise of a prefix step is keyed by branch −1, shared by the group."""
    seed, k, total = cfg.optim.seed, cfg.rl.branches, len(sampler.timesteps)
    first = total - span  # the first trained step: the fork
    groups = torch.arange(len(prompts)).repeat_interleave(k)  # (N,)
    branches = torch.arange(k).repeat(len(prompts))  # (N,)
    every = [p for p in prompts for _ in range(k)]  # (N,)
    evaluations = 0
    if cfg.rl.algorithm == "b2_diffurl":
        x = sampler.initial(
            [key_seed(seed, stage, g, -1) for g in range(len(prompts))], device
        )  # (P, C, h, w)
        condition = sampler.condition(prompts)
        for i in range(first):
            x = _step(
                sampler, network, x, i, condition, [(seed, stage, g, -1, i) for g in range(len(prompts))]
            )
            evaluations += len(prompts) * sampler.forwards_per_sample
        x = x.repeat_interleave(k, dim=0)  # (N, C, h, w): the fork
    else:
        x = sampler.initial([key_seed(seed, stage, int(g), int(b)) for g, b in zip(groups, branches)], device)
    condition = sampler.condition(every)
    states, nexts, log_probs, trained = [], [], [], []
    for i in range(first, total):
        keys = [(seed, stage, int(g), int(b), i) for g, b in zip(groups, branches)]
        after, log_prob = _step(sampler, network, x, i, condition, keys, with_log_prob=True)
        evaluations += len(every) * sampler.forwards_per_sample
        if sampler.stochastic[i]:  # a deterministic step has no density to train
            states.append(x)
            nexts.append(after)
            log_probs.append(log_prob)
            trained.append(i)
        x = after
    return Rollout(
        prompts=every,
        groups=groups,
        steps=torch.tensor(trained, dtype=torch.long),
        states=torch.stack(states, dim=1).cpu(),  # (N, K, C, h, w)
        nexts=torch.stack(nexts, dim=1).cpu(),
        log_probs=torch.stack(log_probs, dim=1).cpu(),  # (N, K)
        images=sampler.decode(x).cpu(),
        evaluations=evaluations,
    )


def _step(sampler, network, x, i, condition, keys, *, with_log_prob=False):
    """x_{t−1} = μ + σ·z at step ``i`` for every row of x, z keyed per row; and its log-density."""
    steps = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
    posterior = sampler.posterior(sampler.output(network, x, steps, condition), x, steps)
    after = posterior.mean + posterior.std * keyed_noise(keys, tuple(x.shape[1:]), x.device)  # (b, C, h, w)
    return (after, log_prob_of(posterior, after)) if with_log_prob else after


def advantages_of(rollout: Rollout, rewards: torch.Tensor, ledger: Ledger, cfg, stage: int):
    """Per-prompt z-scores over the history window, and which samples train: (z (N,), keep (N,) bool)."""
    z = ledger.stats.update(rollout.prompts, rewards, stage=stage)  # (N,)
    if cfg.rl.algorithm == "ddpo":
        return z, torch.ones_like(z, dtype=torch.bool)
    high, low = cfg.rl.thresholds
    return z, select_branches(z, rollout.groups, high=high, low=low)


def transitions(rollout: Rollout, z: torch.Tensor, keep: torch.Tensor) -> dict:
    """The kept samples' trained transitions, flattened to M = kept × K rows."""
    kept = keep.nonzero().flatten()  # (n,)
    count = len(rollout.steps)
    return {
        "prompts": [rollout.prompts[i] for i in kept.tolist() for _ in range(count)],
        "steps": rollout.steps.repeat(len(kept)),  # (M,)
        "states": rollout.states[kept].flatten(0, 1),  # (M, C, h, w)
        "nexts": rollout.nexts[kept].flatten(0, 1),
        "old_log_probs": rollout.log_probs[kept].flatten(),  # (M,)
        "advantages": z[kept].repeat_interleave(count),  # (M,)
    }


def ppo_step(sampler, policy, batch: dict, rows: torch.Tensor, cfg, device) -> dict[str, torch.Tensor]:
    """Per-transition PPO-clip loss (+ the KL to the reference, if weighted) of ``rows`` of ``batch``.

    No rows (fewer transitions than micro-batches): a zero loss on the trained parameters, so that the
    micro-batch still takes its turn in the accumulation."""
    if len(rows) == 0:
        return {"loss": (sum(p.sum() for p in policy.params) * 0.0).reshape(1)}
    states, nexts = batch["states"][rows].to(device), batch["nexts"][rows].to(device)  # (m, C, h, w)
    steps = batch["steps"][rows].to(device)  # (m,)
    condition = sampler.condition([batch["prompts"][i] for i in rows.tolist()])
    if cfg.rl.kl_coef > 0:
        with policy.reference() as reference:
            ref_mean = sampler.posterior(
                sampler.output(reference, states, steps, condition), states, steps
            ).mean
    posterior = sampler.posterior(sampler.output(policy.model, states, steps, condition), states, steps)
    defaults = DEFAULTS[cfg.rl.algorithm]
    out = ppo_clip(
        log_prob_of(posterior, nexts),
        batch["old_log_probs"][rows].to(device),
        batch["advantages"][rows].to(device),
        clip_range=cfg.rl.clip_range or defaults["clip_range"],
        advantage_clip=cfg.rl.adv_clip or defaults["adv_clip"],
    )
    stats = {"loss": out.loss, "ratio": out.ratio, "clipfrac": out.clipped.float()}
    if cfg.rl.kl_coef > 0:
        kl = kl_to_reference(posterior.mean, ref_mean, posterior.std)  # (m,)
        stats["loss"], stats["kl"] = out.loss + cfg.rl.kl_coef * kl, kl.detach()
    return stats


def stage_prompts(prompts: list[str], cfg, stage: int) -> list[str]:
    """``rl.prompts_per_stage`` distinct prompts, drawn anew each stage."""
    generator = torch.Generator().manual_seed(key_seed(cfg.optim.seed, stage, -2))
    order = torch.randperm(len(prompts), generator=generator)[: cfg.rl.prompts_per_stage]
    return [prompts[i] for i in order.tolist()]


def check(cfg: BranchRLTrainConfig, accelerator: Accelerator, prompts: list[str], sampler) -> None:
    """What the schema alone cannot check; each a one-line error naming the key."""
    rl, steps = cfg.rl, cfg.sampling.steps
    if accelerator.num_processes != 1:
        raise UserError(
            f"recipe branch_rl runs on one process, got {accelerator.num_processes}; launch without accelerate"
        )
    if len(rl.thresholds) != 2 or rl.thresholds[0] < rl.thresholds[1]:
        raise UserError(f"`rl.thresholds` must be [high, low] with high >= low, got {rl.thresholds}")
    if rl.algorithm == "b2_diffurl" and not rl.left <= rl.right <= steps:
        raise UserError(
            f"`rl.left` <= `rl.right` <= sampling.steps ({steps}) must hold, got left {rl.left}, right {rl.right}"
        )
    if rl.stages is not None and rl.stages < cfg.optim.max_steps:
        raise UserError(
            f"`rl.stages` must be null or >= optim.max_steps ({cfg.optim.max_steps}), got {rl.stages}"
        )
    if rl.prompts_per_stage > len(prompts):
        raise UserError(
            f"`rl.prompts_per_stage` must be <= the {len(prompts)} prompts of rl.prompts ({rl.prompts!r}), "
            f"got {rl.prompts_per_stage}"
        )
    if cfg.lora.dropout > 0:
        raise UserError(
            f"`lora.dropout` must be 0 for recipe branch_rl (the PPO ratio compares the sampling policy with "
            f"itself), got {cfg.lora.dropout}"
        )
    if not any(sampler.stochastic):
        raise UserError(f"`rl.eta` leaves no stochastic step to train, got {rl.eta}")


def select_stage(rollout: Rollout, rewards: torch.Tensor, ledger: Ledger, cfg, stage: int, run):
    """(z, keep) of a stage's samples: their advantages and which ones train. A stage whose rewards are all equal,
    or whose thresholds keep nothing, keeps nothing; each kind is counted and warned about once."""
    rl = cfg.rl
    if is_constant(rewards):
        ledger.skipped["constant"] += 1
        ledger.warn_once(
            "constant",
            f"stage {stage}: every reward of the stage is {rewards[0].item():g} ({rl.reward or cfg.eval.reward}), "
            "so its z-scores carry no signal; the stage is skipped (counted as stages_skipped_constant in "
            "metrics.jsonl; warned once)",
            run,
        )
        return None, torch.zeros(len(rewards), dtype=torch.bool)
    z, keep = advantages_of(rollout, rewards, ledger, cfg, stage)
    if not keep.any():
        ledger.skipped["nothing_kept"] += 1
        ledger.warn_once(
            "nothing_kept",
            f"stage {stage}: `rl.thresholds` {rl.thresholds} kept no branch (z from {z.min().item():.2f} to "
            f"{z.max().item():.2f}); the stage is skipped (counted as stages_skipped_nothing_kept in "
            "metrics.jsonl; warned once); thresholds nearer 0 keep more",
            run,
        )
    return z, keep


def train(
    cfg: BranchRLTrainConfig, *, base_val_reward: float | None = None, accelerator: Accelerator | None = None
) -> RunResult:
    """Run the recipe (see ``preference.train`` for ``base_val_reward`` and ``accelerator``)."""
    # 1. setup: launch, model, sampler, reward, prompts, reward history --------------------------------------
    accelerator = runtime.build_accelerator(cfg, accelerator)
    device, rl = accelerator.device, cfg.rl
    adapter = adapters.load(cfg.model, timesteps=cfg.timesteps)
    sampler = adapter.stochastic_sampler(
        steps=cfg.sampling.steps,
        noise=rl.eta,
        guidance_scale=rl.guidance_scale or cfg.sampling.guidance_scale,
    )
    prompts = evaluate.prompt_list(rl.prompts, key="rl.prompts", world=cfg.toy.world)
    check(cfg, accelerator, prompts, sampler)
    reward = build_reward(rl.reward or cfg.eval.reward)
    policy = runtime.Policy(adapter, cfg, accelerator)
    min_count = rl.min_count or DEFAULTS[rl.algorithm]["min_count"]
    ledger = Ledger(PromptStats(window=rl.history, min_count=min_count))
    trained = f"LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else "full fine-tuning"
    run = runtime.Run(
        cfg,
        adapter,
        policy,
        describe=f"branch_rl ({rl.algorithm}, {rl.prompts_per_stage} prompts × {rl.branches} branches per stage) "
        f"on {adapter.describe()}, {trained}",
        base_val_reward=base_val_reward,
        extras={"rl": ledger},
        metrics_label=rl.algorithm,
    )
    micro = cfg.optim.gradient_accumulation_steps
    for stage in run.steps():
        # 2. sample: shared prefixes fork into branches at the split; the policy itself samples (no fused
        #    copy), so that the stored log-densities are the ones the first inner step recomputes
        span = trained_span(cfg, stage, len(sampler.timesteps))
        network = policy.network.eval()
        rollout = sample_stage(
            sampler,
            network,
            stage_prompts(prompts, cfg, stage),
            cfg=cfg,
            stage=stage,
            span=span,
            device=device,
        )
        network.train()
        ledger.evaluations["sampling"] += rollout.evaluations
        # 3. reward; the no-label control shuffles the rewards within the stage
        rewards = reward(rollout.images, rollout.prompts).float().cpu()  # (N,)
        if cfg.data.labels == "random":
            rewards = rewards[
                torch.randperm(
                    len(rewards), generator=torch.Generator().manual_seed(key_seed(cfg.optim.seed, stage, -3))
                )
            ]
        run.record({"reward": rewards, "split": torch.tensor([float(span)])})
        # 4. advantages and selection; a stage without signal trains nothing (warned once, counted)
        z, keep = select_stage(rollout, rewards, ledger, cfg, stage, run)
        run.record({"kept": keep.float()})
        # 5. inner epochs: PPO-clip on the kept transitions, one optimizer step each
        if keep.any():
            batch = transitions(rollout, z, keep)
            rows = len(batch["steps"])
            for epoch in range(rl.inner_epochs):
                order = torch.randperm(
                    rows, generator=torch.Generator().manual_seed(key_seed(cfg.optim.seed, stage, epoch, -4))
                )
                for chunk in order.tensor_split(micro):
                    with run.accumulate():
                        stats = ppo_step(sampler, policy, batch, chunk, cfg, device)
                        # mean over all rows of the step, whatever the split into micro-batches (accelerate
                        # divides each micro-batch's loss by their number)
                        run.backward_and_step(stats["loss"].sum() * micro / rows)
                    if len(chunk):
                        run.record(stats)
                    passes = sampler.forwards_per_sample * (2 if rl.kl_coef > 0 else 1)
                    ledger.evaluations["training"] += len(chunk) * passes
        # 6. log (with the evaluation count so far), 7. validate and keep the best, 8. checkpoint
        if (stage + 1) % cfg.log.every == 0 or stage + 1 == cfg.optim.max_steps:
            run.record(ledger.row())
        run.end_step(stage + 1)

    # 9. export the best (or last) weights to final/
    return run.finish(loss_name=rl.algorithm)
