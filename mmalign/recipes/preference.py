"""Preference training of a text-to-image or text-to-video model: Diffusion-DPO, Flow-DPO and their loss family.

One readable loop (Wallace et al., arXiv 2311.12908, Alg. 1 with the loss of Eq. 14; Liu et al., arXiv
2501.13918, Flow-DPO), whatever the modality behind ``model.kind``:

    setup → pairs (offline data, or online best-vs-worst samples) → score reference and policy (same t, ε,
    caption) → loss → step → log → validate → checkpoint → export

Determinism that resume and multi-process runs rely on: the k-th pair of the global data stream, its noise,
its timestep and its caption dropout are functions of (seed, k) alone. A resumed run, a run with gradient
accumulation and a run split over several processes therefore see exactly the same pairs with the same noise
as a single uninterrupted run with the same global batch.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from mmalign import adapters
from mmalign.adapters import Adapter, score_of
from mmalign.config import TrainConfig
from mmalign.data import PairDataset, read_pairs, validate_media
from mmalign.errors import UserError
from mmalign.losses import LossSpec, get_loss, names_for
from mmalign.pairs import OnlinePool
from mmalign.recipes import runtime
from mmalign.recipes.runtime import PairStream, RunResult

# the `loss.name` values this recipe trains with, read from mmalign.losses.LOSSES
OBJECTIVES = names_for("preference")

__all__ = [
    "OBJECTIVES",
    "LatentCache",
    "PairStream",
    "RewardShift",
    "RunResult",
    "build_batch",
    "preference_step",
    "train",
]


class LatentCache:
    """Model-space latents of each offline pair, computed once (VAE encode, or pixels for pixel-space models).

    An offline source never changes: ``generation`` is 0 and it is never ``due`` for a rebuild."""

    generation = 0

    def __init__(self, dataset: PairDataset, adapter: Adapter, enabled: bool):
        self.dataset, self.adapter, self.enabled = dataset, adapter, enabled
        self._latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def due(self, step: int) -> bool:
        return False

    def get(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor, float]:
        record = self.dataset.records[index]
        if index not in self._latents:
            item = self.dataset[index]  # decodes the two images or clips
            pixels = torch.stack([item["chosen"], item["rejected"]])  # (2, 3, H, W) or (2, 3, F, H, W)
            # a seeded draw from the VAE posterior, so a resumed run encodes exactly as the first one did
            generator = torch.Generator(self.adapter.network.device).manual_seed(index)
            chosen, rejected = self.adapter.encode_media(pixels, generator=generator).cpu()
            if not self.enabled:
                return record.caption, chosen, rejected, record.label
            self._latents[index] = (chosen, rejected)
        chosen, rejected = self._latents[index]
        return record.caption, chosen, rejected, record.label


class RewardShift:
    """BCO's reward shift δ (Jung et al., arXiv 2404.04656): the running mean of the implicit rewards β·r of
    every chosen and every rejected sample trained on so far, over all processes.

    The choices the paper leaves open, made here: δ is 0 for the first optimizer step; each step's whole
    global batch joins the mean once that step's micro-batches are done, so step k trains with the mean over
    the pairs of steps 1 … k − 1 (under accumulation a batch's mean is known only after its last micro-batch,
    and this way accumulation and several processes give exactly the δ of one process); every pair weighs
    the same (a cumulative mean, not an exponential one, which would add a decay the paper does not give).
    Checkpoints carry δ (``state`` / ``load_state``), so a resumed run continues with the same δ.
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.value, self.count = 0.0, 0  # δ, and how many pairs it averages
        self._sum, self._count = 0.0, 0  # this process's rewards of the current optimizer step

    def observe(self, implicit_reward: torch.Tensor) -> None:
        """Add one micro-batch's per-pair implicit rewards (β·r_w + β·r_l) / 2, shape (B,)."""
        self._sum += float(implicit_reward.detach().double().sum())
        self._count += implicit_reward.numel()

    def step(self) -> None:
        """Fold the current optimizer step's global batch into δ (collective: every process calls it).

        A step whose rewards are not finite (its loss is not either: the run stops, or skips the step under
        ``optim.skip_nonfinite``) leaves δ as it was."""
        totals = torch.tensor([self._sum, self._count], dtype=torch.float64, device=self.accelerator.device)
        total, count = self.accelerator.reduce(totals, reduction="sum").tolist()  # over all processes
        self._sum, self._count = 0.0, 0
        if not math.isfinite(total):
            return
        self.count += int(count)
        self.value += (total - count * self.value) / self.count

    # --- checkpoints
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {"value": torch.tensor([self.value], dtype=torch.float64)}, {"count": self.count}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.value, self.count = float(tensors["value"][0]), meta["count"]


def build_batch(stream: PairStream, source, positions: list[int], cfg: TrainConfig, adapter: Adapter, device):
    """Stack the pairs at ``positions`` of ``source`` with their shared noise, timesteps and text condition."""
    captions, chosen, rejected, labels, noises, timesteps = [], [], [], [], [], []
    for position in positions:
        caption, lat_w, lat_l, label = source.get(stream.pair_index(position))
        noise, t, drop, swap = stream.randomness(position, adapter, lat_w.shape, cfg.data.caption_dropout)
        if cfg.data.labels == "random" and swap:
            lat_w, lat_l = lat_l, lat_w
        captions.append("" if drop else caption)
        chosen.append(lat_w)
        rejected.append(lat_l)
        labels.append(label)
        noises.append(noise)
        timesteps.append(t)
    return {
        "captions": captions,
        "chosen": torch.stack(chosen).to(device),  # (B, C, H, W) or (B, C, F, H, W)
        "rejected": torch.stack(rejected).to(device),  # like chosen
        "label": torch.tensor(labels, device=device),  # (B,)
        "noise": torch.stack(noises).to(device),  # like chosen
        "timesteps": torch.stack(timesteps).to(device),  # (B,)
    }


def preference_step(
    adapter: Adapter, model, reference, batch, cfg: TrainConfig, *, delta: float = 0.0
) -> dict[str, torch.Tensor]:
    """Per-pair loss and diagnostics for one micro-batch.

    ``model``: the policy network (or its DDP wrapper); ``reference``: a callable giving a context in which
    the reference network is available without gradients (``runtime.Policy.reference``); ``delta``: the
    running reward shift (``RewardShift.value``), for the losses that take one (bco_pair).
    """
    size = len(batch["captions"])
    spec = get_loss(cfg.loss.name)
    if spec.inputs == "chosen":
        condition = adapter.encode_prompts(batch["captions"])  # (B, L, D) and friends
        errors = adapter.errors(model, batch["chosen"], batch["noise"], batch["timesteps"], condition)  # (B,)
        return {"loss": spec.fn(errors), "policy_err_w": errors.detach()}
    # Both members in one forward: same noise, same timestep, same caption within a pair — or, for TPO's
    # text-perturbation pairs (``rejected_captions``), the same image under the caption and a mismatched one.
    latents = torch.cat([batch["chosen"], batch["rejected"]])  # (2B, C, [F,] H, W)
    noise = torch.cat([batch["noise"], batch["noise"]])  # (2B, C, [F,] H, W)
    timesteps = torch.cat([batch["timesteps"], batch["timesteps"]])  # (2B,)
    if "rejected_captions" in batch:
        condition2 = adapter.encode_prompts(batch["captions"] + batch["rejected_captions"])
    else:
        condition2 = adapter.repeat_condition(adapter.encode_prompts(batch["captions"]), 2)
    # The reference runs first, so its activations are freed before the policy's are held for backward.
    with reference() as ref_network:
        ref = adapter.errors(ref_network, latents, noise, timesteps, condition2)  # (2B,)
    policy = adapter.errors(model, latents, noise, timesteps, condition2)  # (2B,)
    pw, pl = score_of(policy[:size]), score_of(policy[size:])
    rw, rl = score_of(ref[:size]), score_of(ref[size:])
    beta = _beta(adapter, batch["timesteps"], cfg)
    loss_fn, options = spec.fn, _loss_options(cfg, spec, delta)
    out = loss_fn(pw, pl, rw, rl, beta=beta, **options)
    per_pair = out.loss
    label = batch["label"]
    if bool((label < 1).any()):
        # Ties (label 0.5) are soft labels: label · L(w, l) + (1 − label) · L(l, w).
        reverse = loss_fn(pl, pw, rl, rw, beta=beta, **options).loss
        per_pair = label * per_pair + (1 - label) * reverse
    margin = out.chosen_rewards - out.rejected_rewards
    stats = {
        "loss": per_pair,
        "implicit_acc": (margin > 0).float() + 0.5 * (margin == 0).float(),
        "reward_margin": margin,
        # the mean of both members' β·r, symmetric in the pair (what BCO's δ averages)
        "implicit_reward": 0.5 * (out.chosen_rewards + out.rejected_rewards),
        "policy_err_w": policy[:size].detach(),
        "policy_err_l": policy[size:].detach(),
        "ref_err_w": ref[:size],
        "ref_err_l": ref[size:],
    }
    if "delta" in spec.state:
        stats["reward_shift"] = torch.full((size,), float(delta), device=per_pair.device)  # δ used
    return stats


def _beta(adapter: Adapter, timesteps: torch.Tensor, cfg: TrainConfig):
    """β, or Flow-DPO's timestep-weighted β_t = β·(1 − t)² per pair (arXiv 2501.13918; the paper finds the
    constant form better: the weighted one over-fits high-noise steps)."""
    if cfg.loss.beta_schedule == "constant":
        return cfg.loss.beta
    level = adapter.noise_level(timesteps).float()  # (B,) t in [0, 1]
    return cfg.loss.beta * (1 - level) ** 2


def _loss_options(cfg: TrainConfig, spec: LossSpec, delta: float) -> dict:
    """The keyword arguments ``spec`` takes: its ``loss.*`` config keys and its running state."""
    options = {key: getattr(cfg.loss, key) for key in spec.options}
    if "delta" in spec.state:
        options["delta"] = delta
    return options


def check_objective(cfg: TrainConfig) -> None:
    if cfg.loss.name not in OBJECTIVES:
        raise UserError(
            f"`loss.name` {cfg.loss.name!r} is not an objective of the preference recipe "
            f"(accepted: {', '.join(OBJECTIVES)})"
        )


def offline_pairs(cfg: TrainConfig, adapter: Adapter) -> LatentCache:
    """The preference pairs of ``data``, decoded and checked up front; their latents are cached (``Run.encode_ahead``)."""
    if cfg.data.format == "scored_jsonl":
        raise UserError("`data.format` scored_jsonl holds scored samples, not pairs: use it with recipe: rwr")
    dataset = pair_dataset(cfg, adapter)
    validate_media(dataset)
    return LatentCache(dataset, adapter, cfg.data.cache_latents)


def pair_dataset(cfg, adapter: Adapter) -> PairDataset:
    """The pairs ``data`` names (format, path, ties, preference dimension or weights), read at the model's size."""
    records = read_pairs(
        cfg.data.format,
        cfg.data.path,
        ties=cfg.data.ties,
        image_root=cfg.data.image_root,
        dimension=cfg.data.dimension,
        weights=cfg.data.weights,
    )
    return PairDataset(records, **media_options(cfg, adapter))


def media_options(cfg, adapter: Adapter) -> dict:
    """How the data's images or clips are brought to the model's size: resolution, frames, stride."""
    shape = adapter.media_shape()  # (H, W) or (F, H, W)
    options = {"resolution": cfg.data.resolution or shape[-1]}
    if adapter.media == "video":
        options.update(num_frames=cfg.data.num_frames or shape[0], frame_stride=cfg.data.frame_stride)
    return options


def train(
    cfg: TrainConfig, *, base_val_reward: float | None = None, accelerator: Accelerator | None = None
) -> RunResult:
    """Run the recipe.

    ``base_val_reward``: the base model's validation reward, when another run already measured it with the
    same model, prompts, seeds and sampler (the control does); step 0 reuses it. ``accelerator``: one built
    by the caller (with its own plugins); by default the recipe builds it from the launch environment. Its
    gradient accumulation must be the config's.
    """
    # 1. setup: launch, model (policy and reference), optimizer -------------------------------------------
    accelerator = runtime.build_accelerator(cfg, accelerator)
    check_objective(cfg)
    adapter = adapters.load(cfg.model, timesteps=cfg.timesteps)
    if cfg.online.enabled:
        source = OnlinePool(cfg, adapter, accelerator)  # sampled below, once the policy exists
    else:
        source = offline_pairs(cfg, adapter)
    policy = runtime.Policy(adapter, cfg, accelerator)
    # BCO's δ, for the losses that take it; like an online pool, checkpoints carry it
    shift = RewardShift(accelerator) if "delta" in get_loss(cfg.loss.name).state else None
    extras = {}
    if cfg.online.enabled:
        extras["pool"] = source
    if shift is not None:
        extras["reward_shift"] = shift
    trained = f"LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else "full fine-tuning"
    pairs = "online pairs" if cfg.online.enabled else f"{len(source)} pairs"
    run = runtime.Run(
        cfg,
        adapter,
        policy,
        describe=f"{cfg.loss.name} on {pairs} ({adapter.describe()}), {trained}",
        base_val_reward=base_val_reward,
        extras=extras,
        metrics_label=cfg.loss.name,
    )
    if not cfg.online.enabled:
        run.encode_ahead(source)  # every pair the steps will read, decoded and encoded once, before step 0

    stream = None
    for step in run.steps():
        # 2. pairs: the stream over the offline data or the current online pool (rebuilt when due)
        stream = runtime.stream_at(step, source, stream, policy, run)
        for micro_step in range(cfg.optim.gradient_accumulation_steps):
            batch = build_batch(
                stream, source, run.positions(step, micro_step), cfg, adapter, accelerator.device
            )
            with run.accumulate():
                # 3. score reference and policy, 4. loss (mean over pairs, outside the log-sigmoid)
                delta = shift.value if shift is not None else 0.0
                stats = preference_step(adapter, policy.model, policy.reference, batch, cfg, delta=delta)
                # 5. backward and step
                run.backward_and_step(stats["loss"].mean())
            run.record(stats)
            if shift is not None:
                shift.observe(stats["implicit_reward"])
        if shift is not None:
            shift.step()  # the step's whole global batch joins δ, for the steps after it
        # 6. log, 7. validate and keep the best, 8. checkpoint
        run.end_step(step + 1)

    # 9. export the best (or last) weights to final/ in the ecosystem's own format
    return run.finish(loss_name=cfg.loss.name)
