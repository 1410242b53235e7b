"""Build the toy world's missing inputs for a run: the pretrained base model and its training data.

- recipe preference: best-vs-worst of ``samples_per_prompt`` base samples per training prompt, labelled by the
  toy reward and stored as Pick-a-Pic parquet, so training reads them through the real Pick-a-Pic reader;
- recipe tpo: correctly captioned true renders of the training scenes (captions parquet): no reward, no pairs;
- recipe kto: base samples of the training prompts with a thumbs-up / thumbs-down label from the toy reward
  (captions parquet with a label column).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from mmalign.adapters import diffusion
from mmalign.config import TrainConfig, toy_builds, toy_own
from mmalign.data.captioned import CaptionedRecord, write_captioned_parquet
from mmalign.data.pickapic import write_pickapic_parquet
from mmalign.errors import UserError
from mmalign.pairs import sample_best_worst_pairs
from mmalign.pairs.best_worst import png_bytes
from mmalign.rewards import build_reward
from mmalign.toy import shapes

PAIR_FIRST_SEED = 100_000  # far from the evaluation (1000+) and validation (2000+) seeds


def ensure_base(cfg, log=print) -> None:
    """Pretrain the toy world's base model where ``model.path`` does not hold one yet."""
    path = cfg.model.path
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return
    if not toy_builds(cfg, "model.path"):
        raise UserError(
            f"`model.path` {path!r} holds no pipeline, and it is not the toy world's own base to build"
        )
    log(f"toy base model missing at {path}: pretraining it (about 10 minutes on a CPU)")
    if cfg.model.kind == "flow":
        from mmalign.toy import flow_base

        flow_base.main(["--world", cfg.toy.world, "--out", path, "--seed", "0"])
    else:
        from mmalign.toy import base_model

        base_model.main(["--out", path, "--seed", "0"])


def ensure_data(cfg, log=print) -> None:
    """Build the run's training data where ``data.path`` does not exist yet (see the module docstring)."""
    if os.path.exists(cfg.data.path):
        return
    if not toy_builds(cfg, "data.path"):
        raise UserError(
            f"`data.path` {cfg.data.path!r} not found, and the toy world builds only "
            f"{toy_own(cfg, 'data.path')}"
        )
    if cfg.recipe in ("tpo", "kto") and cfg.toy.world != "shapes":
        raise UserError(
            f"the toy world builds captioned data for recipe {cfg.recipe} in toy.world shapes only, got "
            f"{cfg.toy.world!r}"
        )
    if cfg.recipe == "kto" and cfg.model.kind != "diffusion":
        raise UserError(
            "the toy world samples recipe kto's thumbs-up / thumbs-down data from the diffusion base "
            f"(assets/toy-t2i) only, got model.kind {cfg.model.kind!r}"
        )
    if cfg.recipe == "tpo":
        build_true_renders(cfg, log)
    elif cfg.recipe == "kto":
        build_feedback(cfg, log)
    else:
        build_pairs(cfg, log)


def build_true_renders(cfg, log=print) -> None:
    """``toy.images_per_prompt`` jittered true renders of every training scene, with its own caption."""
    rng = np.random.default_rng(cfg.optim.seed)
    records = []
    for scene in shapes.SPLITS["train"]:
        for _ in range(cfg.toy.images_per_prompt):
            image = (
                torch.from_numpy(shapes.render(scene, rng)).permute(2, 0, 1) / 255.0
            )  # (3, H, W) in [0, 1]
            records.append(CaptionedRecord(shapes.caption(scene), png_bytes(image), len(records), "toy"))
    write_captioned_parquet(cfg.data.path, records)
    log(f"built {len(records)} correctly captioned true renders of the training scenes -> {cfg.data.path}")


def build_feedback(cfg, log=print) -> None:
    """``toy.images_per_prompt`` base samples per training prompt, thumbs-up when the toy reward reaches
    ``toy.feedback_threshold``."""
    start = time.perf_counter()
    components = diffusion.load_components(cfg.model.path)
    captions = [p for p in shapes.prompts("train") for _ in range(cfg.toy.images_per_prompt)]
    seeds = [PAIR_FIRST_SEED + i for i in range(len(captions))]
    images = diffusion.sample(
        components,
        captions,
        seeds,
        steps=cfg.sampling.steps,
        guidance_scale=cfg.toy.guidance_scale or cfg.sampling.guidance_scale,
        batch_size=cfg.sampling.batch_size,
    )
    rewards = build_reward(cfg.eval.reward)(images, captions).float()
    records = [
        CaptionedRecord(
            caption, png_bytes(image), row, "toy", label=bool(reward >= cfg.toy.feedback_threshold)
        )
        for row, (caption, image, reward) in enumerate(zip(captions, images, rewards))
    ]
    write_captioned_parquet(cfg.data.path, records, label_column=cfg.data.label_column)
    up = sum(record.label for record in records)
    log(
        f"built {len(records)} base samples with toy-reward feedback ({up} thumbs-up at reward ≥ "
        f"{cfg.toy.feedback_threshold}) in {time.perf_counter() - start:.0f} s -> {cfg.data.path}"
    )


def build_pairs(cfg: TrainConfig, log=print) -> None:
    """Best-vs-worst pairs of base samples of the training prompts, as Pick-a-Pic parquet."""
    start = time.perf_counter()
    components = diffusion.load_components(cfg.model.path)
    rows = sample_best_worst_pairs(
        components,
        shapes.prompts("train"),
        build_reward(cfg.eval.reward),
        samples_per_group=cfg.toy.samples_per_prompt,
        groups_per_prompt=cfg.toy.pairs_per_prompt,
        first_seed=PAIR_FIRST_SEED,
        steps=cfg.sampling.steps,
        guidance_scale=cfg.toy.guidance_scale or cfg.sampling.guidance_scale,
        batch_size=cfg.sampling.batch_size,
        seed=cfg.optim.seed,
    )
    os.makedirs(os.path.dirname(os.path.abspath(cfg.data.path)), exist_ok=True)
    write_pickapic_parquet(cfg.data.path, rows)
    log(
        f"built {len(rows)} best-vs-worst-of-{cfg.toy.samples_per_prompt} pairs from base samples "
        f"in {time.perf_counter() - start:.0f} s -> {cfg.data.path}"
    )
