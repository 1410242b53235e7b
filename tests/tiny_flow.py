"""Tiny instances of the real rectified-flow pipelines (SD3, Flux, Wan, LTX), saved to disk with
``save_pretrained`` so tests load them through the same path a user's local weights take."""

from __future__ import annotations

import os

import numpy as np
import torch
from conftest import WORDS, text_encoder, tiny_vae, word_tokenizer
from diffusers import (
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextModel,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

VOCAB = len(WORDS) + 2
# the media each family is trained and sampled at in tests: (H, W) or (F, H, W)
MEDIA = {"sd3": (16, 16), "flux": (16, 16), "wan": (5, 32, 32), "ltx": (9, 32, 32)}
PIPELINES = {
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
    "wan": WanPipeline,
    "ltx": LTXPipeline,
}
# attention projections of each family's transformer blocks (what a user would put a LoRA on)
LORA_TARGETS = {
    "sd3": ["to_q", "to_k", "to_v", "to_out.0"],
    "flux": ["to_q", "to_k", "to_v", "to_out.0"],
    "wan": ["to_q", "to_k", "to_v", "to_out.0"],
    "ltx": ["to_q", "to_k", "to_v", "to_out.0"],
}


def _clip(projection: bool) -> CLIPTextModel:
    return text_encoder(word_tokenizer(), hidden=16, projection_dim=16 if projection else None)


def _t5(model_class=T5EncoderModel, config_class=T5Config):
    config = config_class(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return model_class(config)


def build(family: str):
    """A freshly initialised tiny pipeline of ``family`` (seeded)."""
    torch.manual_seed(0)
    if family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            out_channels=4,
        )
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=tiny_vae(),
            text_encoder=_clip(True),
            tokenizer=word_tokenizer(),
            text_encoder_2=_clip(True),
            tokenizer_2=word_tokenizer(),
            text_encoder_3=None,
            tokenizer_3=None,
        )
    if family == "flux":
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            axes_dims_rope=[4, 4, 8],
        )
        return FluxPipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
            vae=tiny_vae(),
            text_encoder=_clip(False),
            tokenizer=word_tokenizer(),
            text_encoder_2=_t5(),
            tokenizer_2=word_tokenizer(),
        )
    if family == "wan":
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
        return WanPipeline(
            tokenizer=word_tokenizer(),
            text_encoder=_t5(UMT5EncoderModel, UMT5Config),
            transformer=transformer,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    if family == "ltx":
        transformer = LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=4,
            attention_head_dim=8,
            cross_attention_dim=32,
            num_layers=1,
            caption_channels=32,
        )
        scaling = (True, True, False, False)
        vae = AutoencoderKLLTXVideo(
            latent_channels=8,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=scaling,
            decoder_spatio_temporal_scaling=scaling,
            patch_size=1,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
        )
        return LTXPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
            vae=vae,
            text_encoder=_t5(),
            tokenizer=word_tokenizer(),
            transformer=transformer,
        )
    raise ValueError(family)


def save(family: str, path) -> str:
    build(family).save_pretrained(str(path))
    return str(path)


def media_overrides(family: str) -> list[str]:
    """The ``model`` keys that size the tiny family's samples and training media."""
    shape = MEDIA[family]
    overrides = ["model.kind=flow", f"model.resolution={shape[-1]}", "model.prediction_type=null"]
    if len(shape) == 3:
        overrides.append(f"model.num_frames={shape[0]}")
    return overrides


def moving_square(frames: int, size: int, *, colour, step: int, seed: int) -> np.ndarray:
    """A clip (F, H, W, 3) uint8: a square of ``colour`` moving ``step`` px right per frame, on noise."""
    rng = np.random.default_rng(seed)
    clip = rng.integers(0, 40, size=(frames, size, size, 3)).astype(np.uint8)
    side = size // 4
    for f in range(frames):
        x = (2 + f * step) % (size - side)
        clip[f, size // 3 : size // 3 + side, x : x + side] = colour
    return clip


def write_videogen_csv(folder, *, frames: int, size: int, rows: int = 8) -> str:
    """A VideoGen-RewardBench style CSV of ``rows`` pairs of GIF clips; returns its path."""
    from mmalign.data.video import write_gif

    os.makedirs(os.path.join(folder, "videos"), exist_ok=True)
    lines = ["path_A,path_B,prompt,VQ,MQ,TA"]
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
    for i in range(rows):
        for side, step in (("a", 1), ("b", -1)):
            clip = moving_square(frames, size, colour=colours[i % 3], step=step, seed=10 * i + len(side))
            write_gif(os.path.join(folder, "videos", f"{i}{side}.gif"), clip)
        winner = "A" if i % 2 == 0 else "B"
        lines.append(f"videos/{i}a.gif,videos/{i}b.gif,a {WORDS[1 + i % 3]} square,{winner},{winner},same")
    path = os.path.join(folder, "pairs.csv")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
