"""The toy worlds' rectified-flow base models: pixel-space ``WanTransformer3DModel`` s trained by flow matching.

A ``WanPipeline`` folder without a VAE (``model_index.json`` lists it as null; load it with
``WanPipeline.from_pretrained(path, vae=None)``): a tiny Wan transformer over pixels in [-1, 1], a frozen,
randomly initialised ``UMT5EncoderModel`` with a word-level tokenizer over the world's grammar, and a
``FlowMatchEulerDiscreteScheduler``. Two worlds:

- ``moving_shapes`` (video): (3, 4, 16, 16) clips, pretrained on ``moving.pretraining_clips``, where 30% of the
  clips move the opposite way of their caption;
- ``shapes`` (text-to-image): one-frame clips (3, 1, 16, 16) — Wan generates images as single frames — pretrained
  on ``shapes.pretraining_captions``, where 30% of the captions name the wrong colour.

``pretrain`` uses the flow-matching loss, a constant learning rate, then cosine decay to 0, and keeps an EMA of
the weights, so the shipped base is converged yet inherits a measurable mistake that preferences can remove.

    python -m mmalign.toy.flow_base --world moving_shapes --out assets/toy-video --seed 0
    python -m mmalign.toy.flow_base --world shapes --out assets/toy-flow-t2i --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from mmalign.adapters.flow import FlowAdapter, load_pipeline
from mmalign.rewards.toy import ShapesReward
from mmalign.rewards.toy_video import MovingShapesReward
from mmalign.toy import moving, shapes
from mmalign.toy.base_model import LossLog, _ema_update, _lr_factor, build_tokenizer

MAX_TOKENS = 10  # [BOS] + up to 7 words of a caption + [EOS], and one to spare
TEXT_DIM = 32
GUIDANCE_SCALES = (1.0, 1.5, 2.0, 3.0)
EVAL_SEED_BASE = 1000


@dataclass(frozen=True)
class World:
    """What the builder needs of a toy world: its grammar, training data, media size, reward and mistake."""

    module: object  # mmalign.toy.shapes or mmalign.toy.moving
    frames: int
    reward: type
    mistake: str  # the name of the targeted mistake in the metrics
    patch: tuple[int, int, int]  # the transformer's (frames, height, width) patch
    heads: int  # attention heads of 32 channels each

    @property
    def media_shape(self) -> tuple[int, int, int]:
        return (self.frames, shapes.SIZE, shapes.SIZE)

    def batch(self, n: int, rng: np.random.Generator, wrong_share: float) -> tuple[torch.Tensor, list[str]]:
        """``n`` fresh training samples (n, 3, F, 16, 16) in [-1, 1] and their (partly wrong) captions."""
        if self.module is moving:
            clips, captions, _ = moving.pretraining_clips(n, rng, wrong_direction_share=wrong_share)
            return moving.clips_to_tensor(clips) * 2 - 1, captions
        images, captions, _ = shapes.pretraining_captions(n, rng, wrong_colour_share=wrong_share)
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, 16, 16)
        return pixels[:, :, None], captions  # one frame


WORLDS = {
    # One token per 2×2 pixels of each frame (256 tokens a clip), Wan's own (1, 2, 2) patch. Neither this base
    # nor ones with 4-frame tubes ((4, 2, 2), (4, 4, 4)) learnt the direction words (the denoising error is the
    # same for all four, docs/toy_world.md): Wan's only positional signal is its relative rotary embedding.
    "moving_shapes": World(moving, moving.FRAMES, MovingShapesReward, "wrong_direction_rate", (1, 2, 2), 2),
    "shapes": World(shapes, 1, ShapesReward, "wrong_colour_rate", (1, 2, 2), 2),
}


def build_untrained(
    seed: int = 0, *, world: str = "moving_shapes", heads: int | None = None, layers: int = 4
) -> WanPipeline:
    """Fresh, randomly initialised toy pipeline of ``world`` (pixel space: no VAE); ``heads`` defaults to the
    world's."""
    torch.manual_seed(seed)
    heads = heads or WORLDS[world].heads
    tokenizer = build_tokenizer(WORLDS[world].module.vocabulary(), max_length=MAX_TOKENS)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=2 * TEXT_DIM,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = WanTransformer3DModel(
        patch_size=WORLDS[world].patch,
        num_attention_heads=heads,
        # Wan's rotary embedding splits each head into frame / height / width parts (2·⌊d/6⌋ for each spatial
        # axis): at head size 16 that is 2 frequencies, too few to tell the 8 token positions of a 16-pixel side
        # apart (the first toy base ignored position and motion words); 32 gives 5 per axis.
        attention_head_dim=32,
        in_channels=3,
        out_channels=3,
        text_dim=TEXT_DIM,
        freq_dim=64,
        ffn_dim=64 * heads,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=None, scheduler=scheduler
    )


def pretrain(
    out_dir: str,
    *,
    world: str = "moving_shapes",
    seed: int = 0,
    wrong_share: float = 0.3,
    steps: int = 3000,
    batch_size: int = 32,
    lr: float = 1e-3,
    constant_share: float = 0.6,
    ema_decay: float = 0.999,
    caption_dropout: float = 0.1,
    threads: int = 1,
    log_every: int = 100,
) -> dict:
    """Pretrain the toy base of ``world`` and save its EMA weights to ``out_dir``.

    Flow matching (x_t = (1 − σ)·x0 + σ·ε, target ε − x0) with σ uniform in [0, 1] — a tiny model needs the
    high-noise steps that decide colour, shape and direction as much as the low-noise ones — fresh renders
    every step, captions dropped to "" with probability ``caption_dropout`` so classifier-free guidance
    works; AdamW at ``lr`` for ``constant_share`` of the steps, then cosine decay to 0.
    """
    # 1. setup: seeds, threads, model, optimiser, EMA copy
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    spec = WORLDS[world]
    pipe = build_untrained(seed, world=world)
    adapter = FlowAdapter(pipe, out_dir, media_shape=spec.media_shape, density={"name": "uniform"})
    transformer = pipe.transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    log = LossLog(steps, log_every)
    for step in range(steps):
        # 2. data: fresh samples, the world's known share of wrong captions, caption dropout
        x0, captions = spec.batch(batch_size, rng, wrong_share)  # (B, 3, F, 16, 16) in [-1, 1]
        drop = rng.random(batch_size) < caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        noise = torch.randn_like(x0)
        timesteps = torch.rand(batch_size) * 1000  # σ·N, σ uniform
        # 3. loss: velocity MSE under the frozen text encoder
        loss = adapter.errors(transformer, x0, noise, timesteps, adapter.encode_prompts(captions)).mean()
        # 4. step with the scheduled learning rate, then the EMA
        for group in optimizer.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, constant_share)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        _ema_update(ema, transformer, min(ema_decay, (1 + step) / (10 + step)))
        # 5. log
        log.add(step, loss.item(), optimizer.param_groups[0]["lr"])
    wall = time.time() - log.start
    # 6. save the EMA model
    pipe.transformer = ema
    pipe.register_modules(transformer=ema)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return {
        "world": world,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "constant_share": constant_share,
        "ema_decay": ema_decay,
        "caption_dropout": caption_dropout,
        "wrong_share": wrong_share,
        "threads": threads,
        "transformer_parameters": sum(p.numel() for p in ema.parameters()),
        "wall_time_s": round(wall, 1),
        "final_loss": log.history[-1]["loss"],
        "history": log.history,
    }


def evaluate_base(
    adapter: FlowAdapter,
    world: str,
    *,
    split: str,
    seeds_per_prompt: int = 8,
    guidance_scale: float,
    steps: int = 20,
) -> dict:
    """Mean reward and the targeted mistake's rate over every prompt of ``split`` × seeds 1000 … 1000 + k − 1."""
    spec = WORLDS[world]
    prompt_list = spec.module.prompts(split)
    prompts = [p for p in prompt_list for _ in range(seeds_per_prompt)]
    seeds = [EVAL_SEED_BASE + k for _ in prompt_list for k in range(seeds_per_prompt)]
    media = adapter.sample(prompts, seeds, steps=steps, guidance_scale=guidance_scale, batch_size=64)
    reward = spec.reward()
    terms = reward.components(media, prompts)
    per_prompt = terms["reward"].view(len(prompt_list), seeds_per_prompt).mean(dim=1)  # (P,)
    result = {
        "split": split,
        "guidance_scale": guidance_scale,
        "num_samples": len(prompts),
        "reward_mean": terms["reward"].mean().item(),
        "reward_se": (per_prompt.std() / math.sqrt(len(prompt_list))).item(),
        spec.mistake: reward.mistake(media, prompts).float().mean().item(),
    }
    for name, value in terms.items():
        if name != "reward":
            result[f"{name}_mean"] = value.mean().item()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain and evaluate a toy rectified-flow base model.")
    parser.add_argument("--world", choices=sorted(WORLDS), default="moving_shapes")
    parser.add_argument("--out", required=True, help="pipeline folder to write (e.g. assets/toy-video)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--wrong-share", type=float, default=0.3, help="share of wrong captions / motions")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    metrics = pretrain(
        args.out,
        world=args.world,
        seed=args.seed,
        steps=args.steps,
        lr=args.lr,
        wrong_share=args.wrong_share,
        threads=args.threads,
    )
    adapter = FlowAdapter(load_pipeline(args.out), args.out, media_shape=WORLDS[args.world].media_shape)
    evaluation = {}
    for scale in GUIDANCE_SCALES:
        for split in ("val", "test"):
            result = evaluate_base(adapter, args.world, split=split, guidance_scale=scale)
            evaluation[f"{split}@{scale}"] = result
            print(json.dumps(result), flush=True)
    # chosen on validation, so the test numbers stay an unbiased report
    val_rewards = {scale: evaluation[f"val@{scale}"]["reward_mean"] for scale in GUIDANCE_SCALES}
    best = max(val_rewards, key=val_rewards.get)
    metrics.update(
        {
            "evaluation": evaluation,
            "guidance_scale": best,
            "command": f"python -m mmalign.toy.flow_base --world {args.world} --out {args.out} --seed {args.seed}",
        }
    )
    with open(os.path.join(args.out, "pretrain_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps({"guidance_scale": best, **evaluation[f"test@{best}"]}), flush=True)


if __name__ == "__main__":
    main()
