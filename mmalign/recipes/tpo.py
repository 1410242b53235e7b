"""TPO: alignment from captioned images alone — TDPO and TKTO on text-perturbation pairs.

"Free Lunch Alignment of Text-to-Image Diffusion Models without Preference Image Pairs" (arXiv 2509.25771):
for an (image, caption) example the caption is chosen and a mismatched caption (``pairs.tpo``: content,
attributes, relations or context perturbed) is rejected, so no preference image pairs and no reward are needed.

- TDPO (``loss.name`` dpo, ipo, hinge, robust): the Diffusion-DPO / Flow-DPO loss on one image latent, one
  noise, one timestep and two text conditions — the preference recipe's ``preference_step`` with the image as
  both members and the mismatched caption as the rejected member's condition. Each image is encoded once.
- TKTO (``kto``): (image, caption) desirable and (image, mismatched caption) undesirable, with shared noise
  and timestep, through ``kto.kto_step``.
- ``sft``: plain fine-tuning on the captioned images — the control the paper compares against.

    setup → mismatched captions (rules, a local LLM, or a data column) → image latents (once) → score reference
          and policy under both captions → loss → step → log → validate → checkpoint → export
"""

from __future__ import annotations

import dataclasses

import torch
from accelerate import Accelerator

from mmalign import adapters
from mmalign.adapters import Adapter
from mmalign.config import TPOTrainConfig
from mmalign.data.captioned import CaptionedRecord
from mmalign.errors import UserError
from mmalign.pairs.tpo import FAMILIES, LLMPerturber, RulePerturber
from mmalign.recipes import runtime
from mmalign.recipes.kto import CaptionedCache, kto_step, read_captioned_data
from mmalign.recipes.preference import media_options, preference_step
from mmalign.recipes.runtime import PairStream, RunResult


def mismatched_captions(
    cfg: TPOTrainConfig, records: list[CaptionedRecord], log=print
) -> list[CaptionedRecord]:
    """The records that have a mismatched caption, with it (``perturbed``) and its family filled in.

    ``tpo.perturber``: rules, llm (with the rules as fallback) or column (the data's own); each caption's
    perturbation is a function of (``optim.seed``, its row in the data). A caption nothing can perturb is
    skipped, with its row reported, or fails the run (``tpo.unperturbable``)."""
    if cfg.tpo.perturber == "column":
        missing = [record for record in records if not record.perturbed]
        if missing:
            raise UserError(
                f"{missing[0].where('perturbed_caption')}: no mismatched caption ({len(missing)} rows lack one); "
                "tpo.perturber: column needs perturbed_caption in every row (`mmalign pairs tpo` writes it)"
            )
        return records
    perturber = build_perturber(cfg)
    kept, skipped = [], []
    for key, record in enumerate(records):
        perturbation = perturber.perturb(record.caption, key)
        if perturbation is None:
            if cfg.tpo.unperturbable == "fail":
                raise UserError(
                    f"{record.where('caption')}: caption {record.caption!r} cannot be perturbed by the families "
                    f"{', '.join(cfg.tpo.families)} (tpo.unperturbable: fail; use skip to leave such rows out)"
                )
            skipped.append(record)
            continue
        kept.append(dataclasses.replace(record, perturbed=perturbation.text, family=perturbation.family))
    if skipped:
        first = skipped[0]
        log(
            f"skipped {len(skipped)} of {len(records)} captions no rule of {', '.join(cfg.tpo.families)} can "
            f"perturb (first: {first.where('caption')}: {first.caption!r})"
        )
    if not kept:
        raise UserError(
            f"data.path: none of the {len(records)} captions can be perturbed by the families "
            f"{', '.join(cfg.tpo.families)} (tpo.families)"
        )
    return kept


def family_counts(records: list[CaptionedRecord]) -> str:
    """``"attributes 170, content 160, relations 174"``: how many mismatched captions each family gave."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record.family or "unrecorded"] = counts.get(record.family or "unrecorded", 0) + 1
    return ", ".join(f"{family} {count}" for family, count in sorted(counts.items()))


def build_perturber(cfg: TPOTrainConfig):
    rules = RulePerturber(cfg.tpo.families, seed=cfg.optim.seed)
    if cfg.tpo.perturber == "rules":
        return rules
    if cfg.tpo.llm_path is None:
        raise UserError("`tpo.llm_path` must be a local causal LM folder when tpo.perturber is llm, got null")
    return LLMPerturber(cfg.tpo.llm_path, cfg.tpo.families, seed=cfg.optim.seed, fallback=rules)


def build_batch(stream: PairStream, source: CaptionedCache, positions: list[int], cfg, adapter, device):
    """The examples at ``positions``: one latent, one noise and one timestep each, two captions."""
    captions, rejected, latents, noises, timesteps = [], [], [], [], []
    for position in positions:
        caption, latent, mismatched, _ = source.get(stream.pair_index(position))
        noise, t, drop, _ = stream.randomness(position, adapter, latent.shape, cfg.data.caption_dropout)
        captions.append("" if drop else caption)
        rejected.append(mismatched)
        latents.append(latent)
        noises.append(noise)
        timesteps.append(t)
    latents = torch.stack(latents).to(device)  # (B, C, [F,] H, W)
    return {
        "captions": captions,
        "rejected_captions": rejected,
        "chosen": latents,
        "rejected": latents,  # the same image: TPO's pairs differ in the caption only
        "label": torch.ones(len(positions), device=device),  # (B,)
        "noise": torch.stack(noises).to(device),  # like latents
        "timesteps": torch.stack(timesteps).to(device),  # (B,)
    }


def tpo_step(adapter: Adapter, model, reference, batch, cfg: TPOTrainConfig) -> dict[str, torch.Tensor]:
    """TDPO and sft through ``preference_step``; TKTO through ``kto_step`` on the 2B (image, caption) samples,
    the first B desirable, the last B undesirable, each image's two samples sharing noise and timestep."""
    if cfg.loss.name != "kto":
        return preference_step(adapter, model, reference, batch, cfg)
    size = len(batch["captions"])
    samples = {
        "latents": torch.cat([batch["chosen"], batch["chosen"]]),
        "captions": batch["captions"] + batch["rejected_captions"],
        "desirable": torch.arange(2 * size, device=batch["chosen"].device) < size,
        "noise": torch.cat([batch["noise"], batch["noise"]]),
        "timesteps": torch.cat([batch["timesteps"], batch["timesteps"]]),
    }
    return kto_step(adapter, model, reference, samples, cfg)


def check(cfg: TPOTrainConfig) -> None:
    unknown = [family for family in cfg.tpo.families if family not in FAMILIES]
    if unknown or not cfg.tpo.families:
        raise UserError(
            f"`tpo.families` must be a non-empty list of {', '.join(FAMILIES)}, got {cfg.tpo.families!r}"
        )
    if cfg.data.caption_dropout > 0 and cfg.loss.name != "sft":
        raise UserError(
            f"`data.caption_dropout` {cfg.data.caption_dropout} applies to loss sft only in recipe tpo: a dropped "
            "caption leaves nothing for the mismatched caption to be contrasted with (set it to 0)"
        )


def train(
    cfg: TPOTrainConfig, *, base_val_reward: float | None = None, accelerator: Accelerator | None = None
) -> RunResult:
    """Run the recipe (see ``preference.train`` for ``base_val_reward`` and ``accelerator``)."""
    # 1. setup: launch, data and mismatched captions, model (policy and reference), optimizer --------------
    accelerator = runtime.build_accelerator(cfg, accelerator)
    check(cfg)
    adapter = adapters.load(cfg.model, timesteps=cfg.timesteps)
    records = read_captioned_data(cfg, require_label=False)
    log = print if accelerator.is_main_process else (lambda text: None)
    if cfg.loss.name != "sft":  # plain fine-tuning needs no mismatched caption
        records = mismatched_captions(cfg, records, log)
    source = CaptionedCache(records, adapter, media_options(cfg, adapter), enabled=cfg.data.cache_latents)
    source.validate()
    policy = runtime.Policy(adapter, cfg, accelerator)
    objective = {"kto": "TKTO", "sft": "sft"}.get(cfg.loss.name, f"TDPO ({cfg.loss.name})")
    perturbed = family_counts(records) if cfg.loss.name != "sft" else ""
    trained = f"LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else "full fine-tuning"
    run = runtime.Run(
        cfg,
        adapter,
        policy,
        describe=f"{objective} on {len(records)} captioned images"
        + (f" (mismatched: {perturbed})" if perturbed else "")
        + f" ({adapter.describe()}), {trained}",
        base_val_reward=base_val_reward,
        metrics_label=cfg.loss.name,
    )
    run.encode_ahead(source)  # every image the steps will read, encoded once, before step 0
    stream = PairStream(len(source), cfg.optim.seed)
    for step in run.steps():
        for micro_step in range(cfg.optim.gradient_accumulation_steps):
            # 2. examples: image latent, noise, timestep, caption and mismatched caption
            batch = build_batch(
                stream, source, run.positions(step, micro_step), cfg, adapter, accelerator.device
            )
            with run.accumulate():
                # 3. score reference and policy under both captions, 4. loss (mean over the examples)
                stats = tpo_step(adapter, policy.model, policy.reference, batch, cfg)
                # 5. backward and step
                run.backward_and_step(stats["loss"].mean())
            run.record(stats)
        # 6. log, 7. validate and keep the best, 8. checkpoint
        run.end_step(step + 1)

    # 9. export the best (or last) weights to final/
    return run.finish(loss_name=cfg.loss.name)
