"""Train a latent reward model (``recipe: latent_reward``): rewards on the generator's noisy latents.

The model (``mmalign.rewards.latent``) learns, for every noise level, the reward of the clean sample a noisy
latent came from: each step draws per sample a noise ε and a timestep with the adapter's own ``draw`` and
builds x_t with the adapter's own ``noisy`` — exactly the inputs the generator is trained on — so the model
is accurate where guidance reads it. Two kinds of data:

- scored samples, by regression (``losses.reward_regression``) on each named dimension: ``online.enabled``
  samples ``online.samples_per_prompt`` clips or images per prompt of ``online.prompts`` from the frozen base
  and scores them with ``online.reward`` (default ``eval.reward``), whose ``components`` give the
  dimensions (the toy rewards: colour, shape, motion …; ``reward`` is the weighted total);
- offline scored samples (``data.format: scored_jsonl``, the ``data.reward_column`` key), by regression on
  one dimension;
- preference pairs (``data.format`` a pair format), by Bradley–Terry (``losses.bradley_terry``) on one
  dimension, ties kept (``data.ties: keep``) as soft labels or with Rao–Kupper's margin
  (``reward_model.tie_margin``).

    setup → data as latents → per step: x_t per sample → rewards → loss → AdamW step → log → save final/

A short loop, not the preference runtime: no LoRA, no reference, no accelerate launch; the model is small.
Randomness is keyed by (optim.seed, step) for the batch and by (optim.seed, sample index, step) for ε and t.
"""

from __future__ import annotations

import json
import os
import time

import torch

from mmalign import adapters
from mmalign.config import to_yaml
from mmalign.errors import UserError
from mmalign.losses.reward_model import A_PREFERRED, TIE, bradley_terry, reward_regression
from mmalign.recipes import evaluate
from mmalign.rewards.latent import LatentRewardModel, vocabulary_of


class LatentData:
    """Latents (N, C, …) with prompts, and either targets (N, D) or pair members and outcomes."""

    def __init__(self, latents, prompts, *, targets=None, other=None, outcomes=None):
        self.latents, self.prompts = latents, prompts
        self.targets, self.other, self.outcomes = targets, other, outcomes

    @property
    def paired(self) -> bool:
        return self.other is not None

    def __len__(self) -> int:
        return self.latents.shape[0]


def scored_samples(cfg, adapter, dimensions: list[str]) -> LatentData:
    """The frozen base's samples of the online prompts, scored by each dimension of the reward."""
    online = cfg.online
    spec = evaluate.prompt_list(online.prompts, key="online.prompts", world=cfg.toy.world)
    prompts, _ = evaluate.prompt_seeds(spec, online.samples_per_prompt)
    seeds = [online.first_seed + i for i in range(len(prompts))]
    reward = evaluate.build_reward_model(online.reward or cfg.eval.reward)
    media, latents = adapter.sample(
        prompts,
        seeds,
        steps=cfg.sampling.steps,
        guidance_scale=online.guidance_scale or cfg.sampling.guidance_scale,
        batch_size=cfg.sampling.batch_size,
        return_latents=True,
    )
    terms = (
        reward.components(media, prompts)
        if hasattr(reward, "components")
        else {"reward": reward(media, prompts)}
    )
    unknown = [name for name in dimensions if name not in terms]
    if unknown:
        raise UserError(
            f"`reward_model.dimensions` names {', '.join(unknown)}, which reward "
            f"{online.reward or cfg.eval.reward!r} does not give (accepted: {', '.join(terms)})"
        )
    targets = torch.stack([terms[name].float().cpu() for name in dimensions], dim=1)  # (N, D)
    return LatentData(latents.cpu(), prompts, targets=targets)


def scored_file(cfg, adapter, dimensions: list[str]) -> LatentData:
    """Offline scored samples (``data.format: scored_jsonl``) as latents, the reward column as one dimension."""
    from mmalign.data.scored import ScoredDataset, read_scored_jsonl
    from mmalign.recipes.preference import media_options

    if len(dimensions) != 1:
        raise UserError(
            f"`reward_model.dimensions` must name one dimension for scored_jsonl data (its "
            f"{cfg.data.reward_column!r} key), got {dimensions}"
        )
    records = read_scored_jsonl(
        cfg.data.path, image_root=cfg.data.image_root, reward_column=cfg.data.reward_column
    )
    dataset = ScoredDataset(records, **media_options(cfg, adapter))
    latents = []
    for index in range(len(records)):
        generator = torch.Generator().manual_seed(index)
        latents.append(adapter.encode_media(dataset.load(index)[None], generator=generator)[0].cpu())
    targets = torch.tensor([[record.reward] for record in records])  # (N, 1)
    return LatentData(torch.stack(latents), [record.caption for record in records], targets=targets)


def preference_pairs(cfg, adapter, dimensions: list[str]) -> LatentData:
    """The data's pairs as latents, outcome +1 (first member preferred) or 0 (a kept tie)."""
    from mmalign.recipes.preference import pair_dataset

    if len(dimensions) != 1:
        raise UserError(
            f"`reward_model.dimensions` must name one dimension for preference pairs, got {dimensions}"
        )
    dataset = pair_dataset(cfg, adapter)
    records = dataset.records
    chosen, rejected, outcomes = [], [], []
    for index, record in enumerate(records):
        generator = torch.Generator().manual_seed(index)
        for side, out in (("chosen", chosen), ("rejected", rejected)):
            pixels = dataset.load(record, side)[None]  # (1, 3, [F,] H, W)
            out.append(adapter.encode_media(pixels, generator=generator)[0].cpu())
        outcomes.append(TIE if record.label == 0.5 else A_PREFERRED)
    return LatentData(
        torch.stack(chosen),
        [record.caption for record in records],
        other=torch.stack(rejected),
        outcomes=torch.tensor(outcomes)[:, None],  # (N, 1)
    )


def _noisy(adapter, latents: torch.Tensor, keys: list[int], seed: int, step: int):
    """x_t of each latent with its own ε and t from ``adapter.draw``, keyed by (seed, sample, step)."""
    noises, timesteps = [], []
    for key in keys:
        generator = torch.Generator().manual_seed((seed << 40) + (key << 20) + step)
        noise, timestep = adapter.draw(generator, latents.shape[1:])
        noises.append(noise)
        timesteps.append(timestep)
    noise, timesteps = torch.stack(noises), torch.stack(timesteps)  # (b, C, …), (b,)
    return adapter.noisy(latents, noise, timesteps), adapter.noise_level(timesteps)


def train(cfg) -> dict:
    """Train, write ``output_dir/final`` (the model) and ``metrics.jsonl``; returns the final metrics."""
    # 1. setup: the frozen generator, the data as latents, the model and its optimizer
    start = time.perf_counter()
    torch.manual_seed(cfg.optim.seed)
    adapter = adapters.load(cfg.model, timesteps=cfg.timesteps)
    rm = cfg.reward_model
    if cfg.online.enabled:
        data = scored_samples(cfg, adapter, rm.dimensions)
    elif cfg.data.format == "scored_jsonl":
        data = scored_file(cfg, adapter, rm.dimensions)
    else:
        data = preference_pairs(cfg, adapter, rm.dimensions)
    model = LatentRewardModel(
        latent_shape=list(data.latents.shape[1:]),
        dimensions=list(rm.dimensions),
        vocabulary=vocabulary_of(data.prompts),
        kind=adapter.kind,
        latent_space=adapter.latent_space(),
        width=rm.width,
        embed_dim=rm.embed_dim,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    metrics = os.path.join(cfg.output_dir, "metrics.jsonl")
    open(metrics, "w").close()
    sampled_s = time.perf_counter() - start
    batch = min(cfg.optim.batch_size, len(data))
    window: list[float] = []
    for step in range(1, cfg.optim.max_steps + 1):
        # 2. a batch keyed by (seed, step); x_t per sample as the adapter builds it
        order = torch.randperm(
            len(data), generator=torch.Generator().manual_seed(cfg.optim.seed * 7919 + step)
        )
        picks = order[:batch].tolist()
        prompts = [data.prompts[i] for i in picks]
        noisy, level = _noisy(adapter, data.latents[picks], picks, cfg.optim.seed, step)
        # 3. rewards and loss: regression on scores, or Bradley–Terry on the pair (same t for both members)
        predicted = model(noisy, level, prompts)  # (b, D)
        if data.paired:
            other, _ = _noisy(adapter, data.other[picks], picks, cfg.optim.seed, step)
            loss = bradley_terry(
                predicted, model(other, level, prompts), data.outcomes[picks], tie_margin=rm.tie_margin
            ).mean()
        else:
            loss = reward_regression(predicted, data.targets[picks]).mean()
        # 4. step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        # 5. log
        window.append(loss.item())
        if step % cfg.log.every == 0 or step == cfg.optim.max_steps:
            with open(metrics, "a") as log:
                log.write(json.dumps({"step": step, "loss": sum(window) / len(window)}) + "\n")
            window = []
    # 6. save
    final = os.path.join(cfg.output_dir, "final")
    model.save(final)
    return {
        "final_dir": final,
        "samples": len(data),
        "steps": cfg.optim.max_steps,
        "data_seconds": sampled_s,
        "seconds": time.perf_counter() - start,
        "dimensions": list(rm.dimensions),
    }
