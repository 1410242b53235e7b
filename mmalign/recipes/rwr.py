"""Reward-weighted regression (Flow-RWR): the denoising or velocity loss weighted by each sample's reward.

Liu et al., arXiv 2501.13918 (Flow-RWR): L = E[ w(r) · ‖v − v_θ(x_t, t, y)‖² ], here with w = G·softmax(r/τ)
over the global batch of G samples (``losses.rwr_weights``). No reference model is involved. The samples are
scored data (``data.format: scored_jsonl``) or, with ``online.enabled``, N samples per prompt drawn from the
reference (then the policy, every ``online.refresh_every`` steps) and scored by the reward.

    setup → samples → weights over the global batch → score policy → weighted loss → step → log → validate
          → checkpoint → export

The weights are normalised over the whole global batch, not the micro-batch: the rewards of every position of
an optimizer step are known before any forward, so accumulation and multi-process runs equal one process.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from mmalign import adapters
from mmalign.adapters import Adapter
from mmalign.config import RWRTrainConfig
from mmalign.data.scored import ScoredDataset, read_scored_jsonl
from mmalign.errors import UserError
from mmalign.losses import rwr_weights
from mmalign.pairs import OnlineSamples
from mmalign.recipes import runtime
from mmalign.recipes.preference import media_options
from mmalign.recipes.runtime import PairStream, RunResult


class ScoredCache:
    """Latents of each offline scored sample, computed once (VAE encode, or pixels in pixel space); like every
    offline source it never changes (``generation`` 0, never ``due``)."""

    generation = 0

    def __init__(self, dataset: ScoredDataset, adapter: Adapter, enabled: bool):
        self.dataset, self.adapter, self.enabled = dataset, adapter, enabled
        self._latents: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def due(self, step: int) -> bool:
        return False

    def reward(self, index: int) -> float:
        return self.dataset.records[index].reward

    def get(self, index: int) -> tuple[str, torch.Tensor, float]:
        record = self.dataset.records[index]
        if index not in self._latents:
            pixels = self.dataset.load(index)[None]  # (1, 3, [F,] H, W)
            generator = torch.Generator(self.adapter.network.device).manual_seed(index)
            latents = self.adapter.encode_media(pixels, generator=generator)[0].cpu()
            if not self.enabled:
                return record.caption, latents, record.reward
            self._latents[index] = latents
        return record.caption, self._latents[index], record.reward


def step_weights(
    stream: PairStream, source, positions: list[int], cfg: RWRTrainConfig, step: int
) -> torch.Tensor:
    """w = G·softmax(r/τ) over the G samples of the global batch at ``positions`` (G,).

    With ``data.labels: random`` (the no-label control) the rewards are permuted within the batch first, so the
    weights keep their spread but no longer follow the samples."""
    rewards = torch.tensor([_reward(source, stream.pair_index(p)) for p in positions])  # (G,)
    if cfg.data.labels == "random":
        order = torch.randperm(
            len(rewards), generator=torch.Generator().manual_seed(cfg.optim.seed * 7919 + step)
        )
        rewards = rewards[order]
    return rwr_weights(rewards, temperature=cfg.rwr.temperature)


def _reward(source, index: int) -> float:
    return source.reward(index) if isinstance(source, ScoredCache) else float(source.rewards[index])


def build_batch(
    stream: PairStream, source, positions: list[int], weights: torch.Tensor, cfg, adapter, device
):
    """Stack the samples at ``positions`` with their noise, timesteps, condition and weights."""
    captions, latents, noises, timesteps = [], [], [], []
    for position in positions:
        caption, sample, _ = source.get(stream.pair_index(position))
        noise, t, drop, _ = stream.randomness(position, adapter, sample.shape, cfg.data.caption_dropout)
        captions.append("" if drop else caption)
        latents.append(sample)
        noises.append(noise)
        timesteps.append(t)
    return {
        "captions": captions,
        "latents": torch.stack(latents).to(device),  # (B, C, [F,] H, W)
        "noise": torch.stack(noises).to(device),  # like latents
        "timesteps": torch.stack(timesteps).to(device),  # (B,)
        "weights": weights.to(device),  # (B,)
    }


def rwr_step(adapter: Adapter, model, batch) -> dict[str, torch.Tensor]:
    """Per-sample weighted loss w·e and diagnostics for one micro-batch."""
    condition = adapter.encode_prompts(batch["captions"])
    errors = adapter.errors(model, batch["latents"], batch["noise"], batch["timesteps"], condition)  # (B,)
    loss = batch["weights"] * errors.float()
    return {"loss": loss, "policy_err": errors.detach(), "weight_max": batch["weights"].max().reshape(1)}


def offline_samples(cfg: RWRTrainConfig, adapter: Adapter) -> ScoredCache:
    if cfg.data.format != "scored_jsonl":
        raise UserError(
            f"`data.format` {cfg.data.format!r} does not hold scored samples; recipe rwr reads scored_jsonl "
            "(caption, path, reward) or online samples (online.enabled=true)"
        )
    records = read_scored_jsonl(
        cfg.data.path, image_root=cfg.data.image_root, reward_column=cfg.data.reward_column
    )
    dataset = ScoredDataset(records, **media_options(cfg, adapter))
    for index in range(len(dataset)):
        dataset.load(index)  # decode everything once, so bad data fails before training
    return ScoredCache(dataset, adapter, cfg.data.cache_latents)


def train(
    cfg: RWRTrainConfig, *, base_val_reward: float | None = None, accelerator: Accelerator | None = None
) -> RunResult:
    """Run the recipe (see ``preference.train`` for ``base_val_reward`` and ``accelerator``)."""
    # 1. setup: launch, model, optimizer -----------------------------------------------------------------
    accelerator = runtime.build_accelerator(cfg, accelerator)
    adapter = adapters.load(cfg.model, timesteps=cfg.timesteps)
    source = OnlineSamples(cfg, adapter, accelerator) if cfg.online.enabled else offline_samples(cfg, adapter)
    policy = runtime.Policy(adapter, cfg, accelerator)
    samples = "online samples" if cfg.online.enabled else f"{len(source)} scored samples"
    trained = f"LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else "full fine-tuning"
    run = runtime.Run(
        cfg,
        adapter,
        policy,
        describe=f"rwr (τ {cfg.rwr.temperature}) on {samples} ({adapter.describe()}), {trained}",
        base_val_reward=base_val_reward,
        extras={"pool": source} if cfg.online.enabled else None,
        metrics_label="rwr",
    )
    if not cfg.online.enabled:
        run.encode_ahead(source)  # every sample the steps will read, encoded once, before step 0
    stream, micro = None, cfg.optim.batch_size
    for step in run.steps():
        # 2. samples: the current pool (rebuilt when due), the weights of the whole global batch
        stream = runtime.stream_at(step, source, stream, policy, run)
        first = step * run.global_batch
        weights = step_weights(
            stream, source, list(range(first, first + run.global_batch)), cfg, step
        )  # (G,)
        for micro_step in range(cfg.optim.gradient_accumulation_steps):
            positions = run.positions(step, micro_step)
            mine = weights[positions[0] - first : positions[0] - first + micro]
            batch = build_batch(stream, source, positions, mine, cfg, adapter, accelerator.device)
            with run.accumulate():
                # 3. score the policy, 4. the weighted loss (mean over the micro-batch)
                stats = rwr_step(adapter, policy.model, batch)
                # 5. backward and step
                run.backward_and_step(stats["loss"].mean())
            run.record(stats)
        # 6. log, 7. validate and keep the best, 8. checkpoint
        run.end_step(step + 1)

    # 9. export the best (or last) weights to final/
    return run.finish(loss_name="rwr")
