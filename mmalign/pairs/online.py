"""Online preference pairs: sample N per prompt, score them with a reward, prefer the best over the worst.

Flow-DPO's online variant (Liu et al., arXiv 2501.13918, Sec. 4): the pool is sampled from the reference at
step 0 and, every ``online.refresh_every`` steps, again from the current policy (or the reference, with new
seeds). Groups whose best and worst rewards tie are skipped. Pairs are kept as model-space latents — the
sampler's own output — so they are never decoded and re-encoded, and the pool travels in checkpoints, which
makes a resumed run train on exactly the pairs the uninterrupted one did.

Under several processes each rank samples an equal, contiguous share of the (prompt, seed) list and the
shares are gathered in order, so every rank holds the pool a single process would have built.

A pool sampled from the reference is a function of the base weights, prompts, seeds, sampler and reward
alone, so the last one is kept in memory and reused by the next run of the process that asks for the same
(the no-label control after the aligned run) instead of being sampled again.
"""

from __future__ import annotations

import os
import time

import torch

from mmalign import distributed
from mmalign.errors import UserError
from mmalign.pairs.best_worst import best_and_worst
from mmalign.rewards import build_reward


class OnlinePool:
    """The current pool of (caption, chosen latents, rejected latents) pairs and when to rebuild it.

    ``get``/``__len__`` are what the recipe's pair stream reads; ``state``/``load_state`` are what checkpoints
    carry; ``generation`` numbers the pools (0: sampled at step 0 from the reference).
    """

    def __init__(self, cfg, adapter, accelerator):
        from mmalign.recipes.evaluate import prompt_list

        self.cfg, self.adapter, self.accelerator = cfg, adapter, accelerator
        online = cfg.online
        self.prompts = prompt_list(online.prompts, key="online.prompts", world=cfg.toy.world)
        self.reward = build_reward(online.reward or cfg.eval.reward)
        self.per_group = online.samples_per_prompt
        self.groups = len(self.prompts) * online.groups_per_prompt
        self.generation: int | None = None
        self.captions: list[str] = []
        self.chosen = self.rejected = None  # (P, C, [F,] h, w) each
        self.reward_gap = float("nan")

    def __len__(self) -> int:
        return len(self.captions)

    def get(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor, float]:
        return self.captions[index], self.chosen[index], self.rejected[index], 1.0

    def due(self, step: int) -> bool:
        """True when the pool must be (re)built before optimizer step ``step + 1``."""
        if self.generation is None:
            return True
        every = self.cfg.online.refresh_every
        return every > 0 and step % every == 0 and step // every != self.generation

    def refresh(self, step: int, policy, *, log=print) -> None:
        """Build pool ``step // refresh_every`` (0 at the start) from the reference or the current policy;
        ``log`` gets one line on what was built."""
        every = self.cfg.online.refresh_every
        generation = step // every if every else 0
        start = time.perf_counter()
        if generation == 0 or self.cfg.online.refresh_from == "reference":
            key = self._reference_key(generation)
            reused = _last_reference_pool.get("key") == key
            if reused:
                latents, rewards, prompts = _last_reference_pool["samples"]
            else:
                with policy.reference() as network:
                    latents, rewards, prompts = self._sample(network, generation, relayout=not policy.owned)
                _last_reference_pool.update(key=key, samples=(latents, rewards, prompts))
        else:
            reused = False
            with policy.sampling() as network:
                latents, rewards, prompts = self._sample(network, generation, relayout=not policy.owned)
        self._select(latents, rewards, prompts, generation)
        if self.accelerator.is_main_process:
            source = (
                "reference" if generation == 0 or self.cfg.online.refresh_from == "reference" else "policy"
            )
            how = "the previous run's samples of the same" if reused else "sampled from the"
            log(
                f"online pool {generation} at step {step}: {self.summary()}, {how} {source} "
                f"in {time.perf_counter() - start:.0f} s"
            )

    def summary(self) -> str:
        return f"{len(self)} best-vs-worst-of-{self.per_group} pairs (mean reward gap {self.reward_gap:.3f})"

    def _sample(self, network, generation: int, *, relayout: bool):
        """Latents (G·N, C, [F,] h, w), rewards (G·N,) and prompts of pool ``generation``, gathered over the
        ranks."""
        online, sampling = self.cfg.online, self.cfg.sampling
        prompts = [p for p in self.prompts for _ in range(online.groups_per_prompt * self.per_group)]
        first = online.first_seed + generation * len(prompts)
        seeds = [first + i for i in range(len(prompts))]
        accelerator = self.accelerator
        share = distributed.rank_chunk(len(prompts), accelerator.process_index, accelerator.num_processes)
        mine = [prompts[i] for i in share]
        media, latents = self.adapter.sample(
            mine,
            [seeds[i] for i in share],
            network=network,
            relayout=relayout,
            steps=sampling.steps,
            guidance_scale=online.guidance_scale or sampling.guidance_scale,
            batch_size=sampling.batch_size,
            return_latents=True,
        )
        rewards = self.reward(media, mine).float().to(accelerator.device)  # (share,)
        latents = accelerator.gather(latents.to(accelerator.device))[: len(prompts)].cpu()
        rewards = accelerator.gather(rewards)[: len(prompts)].cpu()
        return latents, rewards, prompts

    def _reference_key(self, generation: int) -> tuple:
        """What a reference pool is a function of: the base's files (path, size, modification time), the
        prompts and seeds, the sampler, the reward, the media size and the launch."""
        path = os.path.abspath(self.cfg.model.path)
        files = tuple(
            (file, stat.st_size, stat.st_mtime_ns)
            for root, _, names in sorted(os.walk(path))
            for file in (os.path.join(root, name) for name in sorted(names))
            for stat in (os.stat(file),)
        )
        online, sampling = self.cfg.online, self.cfg.sampling
        return (
            files,
            tuple(self.prompts),
            online.groups_per_prompt,
            self.per_group,
            online.first_seed,
            generation,
            sampling.steps,
            online.guidance_scale or sampling.guidance_scale,
            sampling.batch_size,
            online.reward or self.cfg.eval.reward,
            self.adapter.media_shape(),
            str(self.adapter.network.dtype),
            self.accelerator.num_processes,
            self.accelerator.process_index,
        )

    def _select(
        self, latents: torch.Tensor, rewards: torch.Tensor, prompts: list[str], generation: int
    ) -> None:
        """Best vs worst of each group of N; ties skipped."""
        n = self.per_group
        grouped = rewards.reshape(-1, n)  # (G, N)
        best, worst, distinct = best_and_worst(grouped)
        keep = distinct.nonzero().flatten()
        if len(keep) == 0:
            raise UserError(
                f"online pool {generation}: the reward ({self.cfg.online.reward or self.cfg.eval.reward}) "
                f"tied within every group of {n} samples, so no pair is left; raise online.samples_per_prompt"
            )
        latents = latents.reshape(grouped.shape[0], n, *latents.shape[1:])  # (G, N, C, [F,] h, w)
        self.chosen = latents[keep, best[keep]].contiguous()
        self.rejected = latents[keep, worst[keep]].contiguous()
        self.captions = [prompts[int(g) * n] for g in keep]
        self.reward_gap = float((grouped.max(dim=1).values - grouped.min(dim=1).values)[keep].mean())
        self.generation = generation

    # --- checkpoints
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"chosen": self.chosen, "rejected": self.rejected}
        return tensors, {
            "captions": self.captions,
            "generation": self.generation,
            "reward_gap": self.reward_gap,
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.chosen, self.rejected = tensors["chosen"], tensors["rejected"]
        self.captions, self.generation = list(meta["captions"]), meta["generation"]
        self.reward_gap = meta["reward_gap"]


# The last reference pool sampled in this process: {"key": OnlinePool._reference_key(...), "samples": (...)}.
_last_reference_pool: dict = {}


class OnlineSamples(OnlinePool):
    """Every sample of the pool with its reward, for reward-weighted regression (Flow-RWR's online variant):
    ``get`` gives (caption, latents, reward)."""

    def get(self, index: int) -> tuple[str, torch.Tensor, float]:
        return self.captions[index], self.latents[index], float(self.rewards[index])

    def _select(self, latents, rewards, prompts, generation) -> None:
        self.latents, self.rewards, self.captions = latents.contiguous(), rewards, list(prompts)
        self.reward_gap = float(rewards.std())
        self.generation = generation

    def state(self):
        tensors = {"latents": self.latents, "rewards": self.rewards}
        return tensors, {
            "captions": self.captions,
            "generation": self.generation,
            "reward_gap": self.reward_gap,
        }

    def summary(self) -> str:
        return f"{len(self)} scored samples (reward std {self.reward_gap:.3f})"

    def load_state(self, tensors, meta) -> None:
        self.latents, self.rewards = tensors["latents"], tensors["rewards"]
        self.captions, self.generation = list(meta["captions"]), meta["generation"]
        self.reward_gap = meta["reward_gap"]
