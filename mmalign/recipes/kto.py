"""Diffusion-KTO / Flow-KTO on unpaired feedback: each image is desirable or undesirable on its own.

Li et al., arXiv 2404.04465 (Diffusion-KTO), the KTO loss of Ethayarajh et al., arXiv 2402.01306, Eq. 8, on
the per-sample scores s = −½·error of the adapter: implicit reward r = s_θ − s_ref, reference point z (batch
mean of r, or mismatched captions), loss λ_y·(1 − σ(sign_y·β·(r − z))).

    setup → captioned images with thumbs-up / thumbs-down labels → score reference and policy (same t, ε)
          → [mismatched captions for z] → loss → step → log → validate → checkpoint → export

The k-th sample of the global stream, its noise and its timestep are functions of (seed, k) alone, as in the
preference recipe, so accumulation, resume and several processes equal one process. (The batch-mean reference
point is a mean over the micro-batch on every process, averaged over processes: under gradient accumulation it
is the micro-batch's, as in Diffusion-KTO's training.)
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from mmalign import adapters
from mmalign.adapters import Adapter, score_of
from mmalign.config import KTOTrainConfig
from mmalign.data.captioned import CaptionedRecord, load_media, read_captioned
from mmalign.errors import UserError
from mmalign.losses import kto, mismatched_reference_point
from mmalign.recipes import runtime
from mmalign.recipes.preference import media_options
from mmalign.recipes.runtime import PairStream, RunResult


class CaptionedCache:
    """Model-space latents of each captioned image (VAE encode, or pixels), computed once, with its caption,
    its mismatched caption (recipe tpo) and its label (recipe kto). An offline source: never ``due``."""

    generation = 0

    def __init__(
        self, records: list[CaptionedRecord], adapter: Adapter, options: dict, *, enabled: bool = True
    ):
        self.records, self.adapter, self.options, self.enabled = records, adapter, options, enabled
        self._latents: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def due(self, step: int) -> bool:
        return False

    def validate(self) -> None:
        """Decode every image once, so bad data fails before training."""
        for record in self.records:
            load_media(record, **self.options)

    def get(self, index: int) -> tuple[str, torch.Tensor, str | None, bool | None]:
        """(caption, latent, mismatched caption or None, label or None) of sample ``index``."""
        record = self.records[index]
        latent = self._latents.get(index)
        if latent is None:
            pixels = load_media(record, **self.options)[None]  # (1, 3, [F,] H, W)
            # a seeded draw from the VAE posterior, so a resumed run encodes exactly as the first one did
            generator = torch.Generator(self.adapter.network.device).manual_seed(index)
            latent = self.adapter.encode_media(pixels, generator=generator)[0].cpu()
            if self.enabled:
                self._latents[index] = latent
        return record.caption, latent, record.perturbed, record.label


def kto_step(adapter: Adapter, model, reference, batch, cfg) -> dict[str, torch.Tensor]:
    """Per-sample KTO loss and diagnostics for one micro-batch of N samples.

    ``batch``: ``latents`` (N, C, [F,] H, W), ``captions`` (N), ``desirable`` (N,) bool, ``noise`` like latents,
    ``timesteps`` (N,). With ``kto.reference_point: mismatched`` the policy and the reference also score every
    sample under the caption of the sample before it (captions rolled by one), without gradients, and
    z = max(0, mean(s_θ − s_ref)) over those mismatched samples (``losses.mismatched_reference_point``)."""
    latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
    condition = adapter.encode_prompts(batch["captions"])
    mismatched = cfg.kto.reference_point == "mismatched"
    if mismatched:
        rolled = adapter.encode_prompts(batch["captions"][-1:] + batch["captions"][:-1])
    # the reference first, so its activations are freed before the policy's are held for backward
    with reference() as ref_network:
        ref = adapter.errors(ref_network, latents, noise, timesteps, condition)  # (N,)
        if mismatched:
            ref_mismatched = adapter.errors(ref_network, latents, noise, timesteps, rolled)
    z = None
    if mismatched:
        with torch.no_grad():
            policy_mismatched = adapter.errors(model, latents, noise, timesteps, rolled)
        z = mismatched_reference_point(score_of(policy_mismatched), score_of(ref_mismatched))
    policy = adapter.errors(model, latents, noise, timesteps, condition)  # (N,)
    beta = cfg.loss.beta
    if cfg.loss.beta_schedule == "weighted":
        beta = beta * (1 - adapter.noise_level(timesteps).float()) ** 2
    out = kto(
        score_of(policy),
        score_of(ref),
        batch["desirable"],
        beta=beta,
        desirable_weight=cfg.kto.desirable_weight,
        undesirable_weight=cfg.kto.undesirable_weight,
        reference_point=z,
    )
    desirable = batch["desirable"]
    size = len(desirable)
    return {
        "loss": out.loss,
        "implicit_reward": out.rewards,
        "reference_point": out.reference_point.reshape(1).expand(size),
        # the implicit-reward sign agrees with the label (desirable up, undesirable down)
        "implicit_acc": ((out.rewards > out.reference_point) == desirable).float(),
        "desirable_share": desirable.float(),
        "policy_err": policy.detach(),
        "ref_err": ref,
    }


def build_batch(stream: PairStream, source: CaptionedCache, positions: list[int], cfg, adapter, device):
    """Stack the samples at ``positions`` with their noise and timesteps. With ``data.labels: random`` (the
    no-label control) each sample's label is a coin flip keyed by its position."""
    captions, latents, desirable, noises, timesteps = [], [], [], [], []
    for position in positions:
        caption, latent, _, label = source.get(stream.pair_index(position))
        noise, t, drop, coin = stream.randomness(position, adapter, latent.shape, cfg.data.caption_dropout)
        captions.append("" if drop else caption)
        latents.append(latent)
        desirable.append(coin if cfg.data.labels == "random" else bool(label))
        noises.append(noise)
        timesteps.append(t)
    return {
        "captions": captions,
        "latents": torch.stack(latents).to(device),  # (B, C, [F,] H, W)
        "desirable": torch.tensor(desirable, device=device),  # (B,) bool
        "noise": torch.stack(noises).to(device),  # like latents
        "timesteps": torch.stack(timesteps).to(device),  # (B,)
    }


def read_captioned_data(cfg, *, require_label: bool) -> list[CaptionedRecord]:
    """The run's captioned images (``data.format`` captions_parquet or captions_jsonl)."""
    if cfg.data.format not in ("captions_parquet", "captions_jsonl"):
        raise UserError(
            f"`data.format` {cfg.data.format!r} does not hold captioned images; recipe {cfg.recipe} reads "
            "captions_parquet or captions_jsonl (caption, image" + (", label)" if require_label else ")")
        )
    return read_captioned(
        cfg.data.format,
        cfg.data.path,
        image_root=cfg.data.image_root,
        label_column=cfg.data.label_column,
        require_label=require_label,
    )


def train(
    cfg: KTOTrainConfig, *, base_val_reward: float | None = None, accelerator: Accelerator | None = None
) -> RunResult:
    """Run the recipe (see ``preference.train`` for ``base_val_reward`` and ``accelerator``)."""
    # 1. setup: launch, model (policy and reference), optimizer -------------------------------------------
    accelerator = runtime.build_accelerator(cfg, accelerator)
    adapter = adapters.load(cfg.model, timesteps=cfg.timesteps)
    records = read_captioned_data(cfg, require_label=True)
    source = CaptionedCache(records, adapter, media_options(cfg, adapter), enabled=cfg.data.cache_latents)
    source.validate()
    up = sum(record.label for record in records)
    policy = runtime.Policy(adapter, cfg, accelerator)
    trained = f"LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else "full fine-tuning"
    run = runtime.Run(
        cfg,
        adapter,
        policy,
        describe=f"kto ({cfg.kto.reference_point} z) on {len(records)} images, {up} thumbs-up "
        f"({adapter.describe()}), {trained}",
        base_val_reward=base_val_reward,
        metrics_label="kto",
    )
    run.encode_ahead(source)  # every image the steps will read, encoded once, before step 0
    stream = PairStream(len(source), cfg.optim.seed)
    for step in run.steps():
        for micro_step in range(cfg.optim.gradient_accumulation_steps):
            # 2. samples with their noise and timesteps
            batch = build_batch(
                stream, source, run.positions(step, micro_step), cfg, adapter, accelerator.device
            )
            with run.accumulate():
                # 3. score reference and policy, 4. the KTO loss (mean over the samples)
                stats = kto_step(adapter, policy.model, policy.reference, batch, cfg)
                # 5. backward and step
                run.backward_and_step(stats["loss"].mean())
            run.record(stats)
        # 6. log, 7. validate and keep the best, 8. checkpoint
        run.end_step(step + 1)

    # 9. export the best (or last) weights to final/
    return run.finish(loss_name="kto")
