"""Tiny instances of the real model classes, saved to disk and loaded back through the users' code path."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from mmalign.adapters import diffusion
from mmalign.data.pickapic import write_pickapic_parquet
from mmalign.toy import text

# The defaults name the toy world's own inputs (its base, its pairs inside the default run directory): a
# config loaded from the defaults alone, only to be inspected, asks for the toy world so they need not exist.
TOY = "toy.enabled=true"

# A training run that stays offline and quiet: no toy assets, no validation or evaluation, no progress bar.
QUIET_RUN = [
    "toy.enabled=false",
    "validation.every=0",
    "eval.enabled=false",
    "log.progress=false",
    "log.tensorboard=false",
]


def run_overrides(pipeline: str, data: str, out_dir) -> list[str]:
    """Overrides for a tiny quiet run of ``pipeline`` on the pairs at ``data``, writing to ``out_dir``."""
    return [f"model.path={pipeline}", f"data.path={data}", f"output_dir={out_dir}", *QUIET_RUN]


# the shipped toy base model
TOY_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy-t2i")

WORDS = ["a", "red", "green", "blue", "circle", "square", "cat", "dog", "on", "the", "left", "right"]


def word_tokenizer(max_length: int = 8) -> PreTrainedTokenizerFast:
    return text.word_tokenizer(WORDS, max_length=max_length)


def text_encoder(tokenizer: PreTrainedTokenizerFast, **sizes) -> CLIPTextModel:
    """A 1-layer CLIP text tower of width 32 (``sizes`` overrides: hidden, layers, heads, projection_dim)."""
    return text.clip_text_encoder(tokenizer, **{"hidden": 32, "layers": 1, "heads": 2, **sizes})


def tiny_unet(in_channels: int, sample_size: int, **config) -> UNet2DConditionModel:
    """Two blocks of 8 and 16 channels, one cross-attention; ``config`` overrides or adds UNet settings."""
    settings = {
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        **config,
    }
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, **settings
    )


# what DESIGN.md asks eval.json to hold, plus the three keys of the toy quickstart
EVAL_KEYS = (
    "base_reward_mean",
    "aligned_reward_mean",
    "win_rate",
    "num_samples",
    "control_win_rate",
    "base_error_rate",
    "aligned_error_rate",
)


def tiny_vae() -> AutoencoderKL:
    """A 4-channel latent VAE over 16×16 pixels (8×8 latents), two blocks of 4 and 8 channels."""
    return AutoencoderKL(
        block_out_channels=[4, 8],
        norm_num_groups=2,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=16,
    )


def build_pipeline(path, *, vae: bool, prediction_type: str = "epsilon") -> str:
    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    autoencoder = None
    if vae:
        autoencoder = tiny_vae()
    unet = tiny_unet(4 if vae else 3, 8)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type
    )
    components = diffusion.Components(unet, scheduler, text_encoder(tokenizer), tokenizer, autoencoder)
    diffusion.save_components(components, str(path))
    return str(path)


@pytest.fixture(scope="session")
def pixel_pipeline(tmp_path_factory) -> str:
    """Pixel-space 8×8 text-to-image pipeline (the toy world's layout)."""
    return build_pipeline(tmp_path_factory.mktemp("pixel") / "pipe", vae=False)


@pytest.fixture(scope="session")
def sd_pipeline(tmp_path_factory) -> str:
    """Latent 16×16 pipeline with a real AutoencoderKL (the SD 1.x layout)."""
    return build_pipeline(tmp_path_factory.mktemp("sd") / "pipe", vae=True)


@pytest.fixture(scope="session")
def v_pipeline(tmp_path_factory) -> str:
    return build_pipeline(tmp_path_factory.mktemp("v") / "pipe", vae=False, prediction_type="v_prediction")


def png(colour, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def pairs_parquet(tmp_path_factory) -> str:
    """16 Pick-a-Pic rows: noisy coloured squares, winner in a random column."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        caption = f"a {WORDS[1 + i % 3]} square"
        a, b = (png(rng.integers(0, 256, 3).tolist()) for _ in range(2))
        rows.append((caption, a, b, float(i % 2)))
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    write_pickapic_parquet(str(path), rows)
    return str(path)


@pytest.fixture
def config_file(tmp_path, pixel_pipeline, pairs_parquet) -> str:
    """A good config file: the tiny pixel pipeline, its 16 Pick-a-Pic pairs, LoRA DPO; writes to tmp/run."""
    path = tmp_path / "config.yaml"
    path.write_text(
        f"output_dir: {tmp_path / 'run'}\n"
        f"model:\n  path: {pixel_pipeline}\n"
        f"data:\n  format: pickapic\n  path: {pairs_parquet}\n"
        "loss:\n  name: dpo\n  beta: 5000\n"
    )
    return str(path)
