"""Build the toy world's missing inputs for a run: the pretrained base model and the preference pairs.

The pairs are best-vs-worst of ``samples_per_prompt`` base samples per training prompt, labelled by the
toy reward and stored as Pick-a-Pic parquet, so training reads them through the real Pick-a-Pic reader.
"""

from __future__ import annotations

import os
import time

from mmalign.adapters import diffusion
from mmalign.config import TrainConfig, toy_builds
from mmalign.data.pickapic import write_pickapic_parquet
from mmalign.errors import UserError
from mmalign.pairs import sample_best_worst_pairs
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


def ensure_pairs(cfg: TrainConfig, log=print) -> None:
    if os.path.exists(cfg.data.path):
        return
    if not toy_builds(cfg, "data.path"):
        raise UserError(
            f"`data.path` {cfg.data.path!r} not found, and the toy world builds only Pick-a-Pic pairs inside "
            f"output_dir {cfg.output_dir!r}"
        )
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
