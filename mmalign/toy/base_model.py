"""The toy world's text-to-image base model: a pixel-space UNet, a tiny CLIP text encoder, a word-level tokenizer.

``pretrain`` trains UNet and text encoder jointly on ``shapes.pretraining_captions`` (30% of captions name the
wrong colour), with a constant learning rate, then cosine decay to 0, and keeps an EMA of the weights, so the
shipped base is converged — more training without preferences does not improve it — yet inherits a measurable
wrong-colour mistake that preferences can remove.

    python -m mmalign.toy.base_model --out assets/toy-t2i --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import PreTrainedTokenizerFast

from mmalign.adapters.diffusion import Components, denoising_errors, load_components, sample, save_components
from mmalign.rewards.toy import ShapesReward
from mmalign.toy import shapes
from mmalign.toy.text import clip_text_encoder, word_tokenizer

MAX_TOKENS = 10  # [BOS] + 7 words of the longest caption + [EOS], and one to spare
TEXT_DIM = 64
GUIDANCE_SCALES = (1.0, 1.5, 2.0)
EVAL_SEED_BASE = 1000  # sample k of every prompt uses seed 1000 + k


def build_tokenizer(words: list[str] | None = None, max_length: int = MAX_TOKENS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``words`` (default: the shapes grammar's vocabulary); wraps every caption in
    [BOS] … [EOS]."""
    words = shapes.vocabulary() if words is None else words
    return word_tokenizer(words, max_length=max_length, wrap=True, lowercase=True)


def build_untrained(seed: int = 0) -> Components:
    """Fresh, randomly initialised toy pipeline (pixel space: no VAE)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = clip_text_encoder(tokenizer, hidden=TEXT_DIM, layers=2, heads=4)
    unet = UNet2DConditionModel(
        sample_size=shapes.SIZE,
        in_channels=3,
        out_channels=3,
        # Down to 2×2: there zero padding tells every cell which quadrant it is, so cross-attention can put
        # "on the left" where the left is; a 3-level (…, 4×4) UNet of this size never learnt position.
        down_block_types=(
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
        ),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 48, 48, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TEXT_DIM,
        # A pooled text embedding added to the timestep embedding (as DeepFloyd IF's pixel-space UNet does)
        # gives every block the caption's global attributes; cross-attention alone left colour unused.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        # v-prediction: at high noise the target is ≈ −x0, so the steps that decide colour and layout carry
        # a real training signal (Salimans & Ho, arXiv 2202.00512); ε-prediction left them near zero loss
        # and the base ignored colour and position words when sampling.
        prediction_type="v_prediction",
        clip_sample=False,
    )
    return Components(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


def _lr_factor(step: int, steps: int, constant_share: float) -> float:
    """1 for the first ``constant_share`` of the steps, then cosine decay to 0 at the last step."""
    decay_start = int(constant_share * steps)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, steps - decay_start)
    return 0.5 * (1 + math.cos(math.pi * progress))


class LossLog:
    """The mean training loss of every ``every`` steps, printed as one JSON line and kept in ``history``."""

    def __init__(self, steps: int, every: int):
        self.steps, self.every = steps, every
        self.history: list[dict] = []
        self.window: list[float] = []
        self.start = time.time()

    def add(self, step: int, loss: float, lr: float) -> None:
        self.window.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            entry = {
                "step": step + 1,
                "loss": float(np.mean(self.window)),
                "lr": lr,
                "elapsed_s": round(time.time() - self.start, 1),
            }
            self.history.append(entry)
            self.window = []
            print(json.dumps(entry), flush=True)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.lerp_(p, 1 - decay)


def pretrain(
    out_dir: str,
    *,
    seed: int = 0,
    wrong_colour_share: float = 0.3,
    steps: int = 2400,
    batch_size: int = 32,
    lr: float = 2e-3,
    constant_share: float = 0.6,
    ema_decay: float = 0.999,
    caption_dropout: float = 0.1,
    train_text_encoder: bool = False,
    threads: int = 1,
    log_every: int = 100,
) -> dict:
    """Pretrain the toy base on the shapes world and save its EMA weights (fp16) to ``out_dir``.

    v-prediction MSE at uniform timesteps, fresh renders every step, captions dropped to "" with probability
    ``caption_dropout`` so classifier-free guidance works; AdamW at ``lr`` for ``constant_share`` of the steps,
    then cosine decay to 0. Returns the training metrics.

    The text encoder stays at its seeded random initialisation unless ``train_text_encoder``: trained jointly
    (same recipe), it collapsed "left" / "right" — and, in a second run, the colour words — onto nearly the same
    embedding early on, after which the UNet could not learn them; a random encoder keeps every word distinct.
    """
    # 1. setup: seeds, threads, model, optimiser, EMA copies
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    components = build_untrained(seed)
    unet, text_encoder, scheduler = components.unet, components.text_encoder, components.scheduler
    unet.train()
    text_encoder.train(train_text_encoder).requires_grad_(train_text_encoder)
    params = [*unet.parameters(), *text_encoder.parameters()] if train_text_encoder else [*unet.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    log = LossLog(steps, log_every)
    for step in range(steps):
        # 2. data: fresh renders, wrong-colour captions, caption dropout
        images, captions, _ = shapes.pretraining_captions(
            batch_size, rng, wrong_colour_share=wrong_colour_share
        )
        drop = rng.random(batch_size) < caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, 16, 16) in [-1, 1]
        ids = components.tokenizer(
            captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids  # (B, L)
        noise = torch.randn_like(pixels)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        # 3. loss: denoising MSE (v target) of the UNet under the frozen text encoder
        hidden = text_encoder(ids).last_hidden_state  # (B, L, D)
        loss = denoising_errors(unet, scheduler, pixels, noise, timesteps, hidden).mean()
        # 4. step with the scheduled learning rate, then the EMA
        for group in optimizer.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, constant_share)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # short warm-up so early EMA is not the init
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        # 5. log
        log.add(step, loss.item(), optimizer.param_groups[0]["lr"])
    wall = time.time() - log.start
    # 6. save the EMA model in fp16
    shipped = Components(
        unet=ema_unet.to(torch.float16),
        scheduler=scheduler,
        text_encoder=ema_text.to(torch.float16),
        tokenizer=components.tokenizer,
    )
    save_components(shipped, out_dir)
    return {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "constant_share": constant_share,
        "ema_decay": ema_decay,
        "caption_dropout": caption_dropout,
        "train_text_encoder": train_text_encoder,
        "wrong_colour_share": wrong_colour_share,
        "threads": threads,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
        "wall_time_s": round(wall, 1),
        "final_loss": log.history[-1]["loss"],
        "history": log.history,
    }


def evaluate_base(
    components: Components,
    *,
    split: str = "test",
    seeds_per_prompt: int = 8,
    guidance_scale: float = 1.5,
    steps: int = 20,
) -> dict:
    """Mean reward and wrong-colour rate over every prompt of ``split`` × seeds 1000 … 1000 + k − 1.

    ``reward_se`` is the prompt-clustered standard error (samples of one prompt are not independent).
    """
    prompt_list = shapes.prompts(split)
    prompts_rep = [p for p in prompt_list for _ in range(seeds_per_prompt)]
    seeds = [EVAL_SEED_BASE + k for _ in prompt_list for k in range(seeds_per_prompt)]
    images = sample(
        components, prompts_rep, seeds, steps=steps, guidance_scale=guidance_scale
    )  # (N, 3, H, W)
    reward = ShapesReward()
    terms = reward.components(images, prompts_rep)
    wrong = reward.mistake(images, prompts_rep).float()
    per_prompt = terms["reward"].view(len(prompt_list), seeds_per_prompt).mean(dim=1)  # (P,)
    result = {
        "split": split,
        "guidance_scale": guidance_scale,
        "num_samples": len(prompts_rep),
        "reward_mean": terms["reward"].mean().item(),
        "reward_se": (per_prompt.std() / math.sqrt(len(prompt_list))).item(),
        "wrong_colour_rate": wrong.mean().item(),
    }
    for name in ("colour", "position", "shape", "size"):
        result[f"{name}_mean"] = terms[name].mean().item()
    return result


def _render_ceiling(split: str, seeds_per_prompt: int = 8) -> float:
    """Mean reward of true renders of the split's scenes: the ceiling a perfect model would reach."""
    rng = np.random.default_rng(EVAL_SEED_BASE)
    scenes = [scene for scene in shapes.SPLITS[split] for _ in range(seeds_per_prompt)]
    images = np.stack([shapes.render(scene, rng) for scene in scenes])  # (N, 16, 16, 3)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return ShapesReward()(pixels, [shapes.caption(scene) for scene in scenes]).mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain and evaluate the toy text-to-image base model.")
    parser.add_argument("--out", required=True, help="pipeline folder to write (e.g. assets/toy-t2i)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--wrong-colour-share", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    metrics = pretrain(
        args.out,
        seed=args.seed,
        steps=args.steps,
        wrong_colour_share=args.wrong_colour_share,
        threads=args.threads,
    )
    components = load_components(args.out, dtype=torch.float32)
    evaluation = {}
    for scale in GUIDANCE_SCALES:
        for split in ("val", "test"):
            result = evaluate_base(components, split=split, guidance_scale=scale)
            evaluation[f"{split}@{scale}"] = result
            print(json.dumps(result), flush=True)
    # chosen on validation, so the test numbers stay an unbiased report
    val_rewards = {scale: evaluation[f"val@{scale}"]["reward_mean"] for scale in GUIDANCE_SCALES}
    best = max(val_rewards, key=val_rewards.get)
    metrics.update(
        {
            "evaluation": evaluation,
            "guidance_scale": best,
            "render_ceiling": {split: _render_ceiling(split) for split in ("val", "test")},
            "command": f"python -m mmalign.toy.base_model --out {args.out} --seed {args.seed}",
        }
    )
    with open(os.path.join(args.out, "pretrain_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps({"guidance_scale": best, **evaluation[f"test@{best}"]}), flush=True)


if __name__ == "__main__":
    main()
