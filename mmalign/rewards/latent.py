"""Latent reward models: rewards read directly off a generator's noisy latents, for reward-guided sampling.

Flow-NRG (Liu et al., "Improving Video Generation with Human Feedback", arXiv 2501.13918, Sec. 4.3) guides a
sampler with the gradient of a reward taken on the noisy latent x_t itself: no VAE decode and no pixel-space
reward in the loop, so each guided step costs one forward and backward of a small network. Such a network must
be accurate at every noise level, so it is trained on x_t made exactly as the generator's adapter makes them
(x_t = (1 − σ)·x0 + σ·ε for rectified flow, the DDPM ``add_noise`` for diffusion) with t drawn per sample.

    model(latents (B, C, H, W) or (B, C, F, H, W), noise_level (B,) in [0, 1], prompts) -> (B, D)

one output per named reward dimension (``dimensions``), so a user weights them at sampling time. The network:

- the prompt as a bag of words over the training prompts' vocabulary (unknown words share one slot), and the
  noise level as sinusoidal features, summed into one condition vector;
- a 3-D convolution trunk over (frames, height, width) (an image is one frame) whose feature maps the condition
  scales and shifts (FiLM), pooled to at most 4 × 4 × 4 cells that keep where things are, then a head on the
  pooled features and the condition.

PRFL (arXiv 2511.21541) builds the same kind of model from the generator's own first transformer blocks; that
initialisation is not offered here.

Saved like any model folder: ``config.json`` (shape, dimensions, vocabulary, which adapter and latent space it
reads) and ``model.safetensors``. A model is refused, with the reason, for a generator of another latent shape,
another latent space (VAE) or another kind of noising (:meth:`LatentRewardModel.check_fits`).
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmalign.errors import UserError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
UNKNOWN = "<unk>"
_TIME_FREQUENCIES = 8


class LatentRewardModel(nn.Module):
    """A timestep-conditioned reward network on noisy latents, one output per reward dimension."""

    def __init__(
        self,
        *,
        latent_shape: list[int],
        dimensions: list[str],
        vocabulary: list[str],
        kind: str,
        latent_space: str,
        width: int = 32,
        embed_dim: int = 64,
    ) -> None:
        super().__init__()
        if len(latent_shape) not in (3, 4):
            raise UserError(
                f"a latent reward model reads (C, H, W) or (C, F, H, W) latents, got {latent_shape}"
            )
        if not dimensions or len(set(dimensions)) != len(dimensions):
            raise UserError(f"reward dimensions must be distinct names, got {dimensions}")
        self.config = {
            "latent_shape": list(latent_shape),
            "dimensions": list(dimensions),
            "vocabulary": [UNKNOWN, *[word for word in vocabulary if word != UNKNOWN]],
            "kind": kind,
            "latent_space": latent_space,
            "width": width,
            "embed_dim": embed_dim,
        }
        self._index = {word: i for i, word in enumerate(self.config["vocabulary"])}
        channels = latent_shape[0]
        frames = 1 if len(latent_shape) == 3 else latent_shape[1]
        height, w = latent_shape[-2:]
        self.words = nn.EmbeddingBag(len(self._index), embed_dim, mode="mean")
        self.time = nn.Sequential(
            nn.Linear(2 * _TIME_FREQUENCIES, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )
        # spatial stride 2 while a side is above 4 cells, so the trunk's cost stays small beside the generator's
        strides = [(1, 2, 2) if min(height, w) // 2**i > 4 else (1, 1, 1) for i in range(2)]
        self.convs = nn.ModuleList(
            [
                nn.Conv3d(channels, width, 3, stride=strides[0], padding=1),
                nn.Conv3d(width, width, 3, stride=strides[1], padding=1),
                nn.Conv3d(width, width, 3, padding=1),
            ]
        )
        self.films = nn.ModuleList([nn.Linear(embed_dim, 2 * width) for _ in self.convs])
        self.pooled = (min(frames, 4), min(height, 4), min(w, 4))
        self.pool = nn.AdaptiveAvgPool3d(self.pooled)
        cells = self.pooled[0] * self.pooled[1] * self.pooled[2]
        self.head = nn.Sequential(
            nn.Linear(width * cells + embed_dim, embed_dim),
            nn.SiLU(),
            nn.Linear(embed_dim, len(dimensions)),
        )

    @property
    def dimensions(self) -> tuple[str, ...]:
        return tuple(self.config["dimensions"])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.config["latent_shape"])

    # --- inputs
    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Word ids and offsets of ``prompts`` for the bag of words (lowercased, split on spaces)."""
        ids, offsets = [], []
        for prompt in prompts:
            offsets.append(len(ids))
            words = prompt.lower().split() or [UNKNOWN]
            ids.extend(self._index.get(word, 0) for word in words)
        device = self.words.weight.device
        return torch.tensor(ids, device=device), torch.tensor(offsets, device=device)

    def condition(self, noise_level: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) noise levels and B prompts → (B, E)."""
        frequencies = 2.0 ** torch.arange(_TIME_FREQUENCIES, device=noise_level.device) * math.pi
        angles = noise_level.float()[:, None] * frequencies[None, :]  # (B, K)
        time = self.time(torch.cat([angles.sin(), angles.cos()], dim=1))  # (B, E)
        return time + self.words(*self.tokens(prompts))  # (B, E)

    def forward(self, latents: torch.Tensor, noise_level: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Rewards (B, D) of noisy ``latents`` at ``noise_level`` (B,) for ``prompts``."""
        x = latents.float()
        if x.dim() == 4:
            x = x[:, :, None]  # (B, C, 1, H, W): an image as one frame
        noise_level = noise_level.to(x.device).float().expand(x.shape[0])
        cond = self.condition(noise_level, prompts)  # (B, E)
        for conv, film in zip(self.convs, self.films):
            x = nn.functional.silu(conv(x))  # (B, W, F, h, w)
            scale, shift = film(cond).chunk(2, dim=1)  # (B, W) each
            x = x * (1 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]
        pooled = self.pool(x).flatten(1)  # (B, W · cells)
        return self.head(torch.cat([pooled, cond], dim=1))  # (B, D)

    # --- checks
    def check_fits(self, *, kind: str, latent_space: str, latent_shape: tuple[int, ...], where: str) -> None:
        """Raise a one-line UserError when this model was trained for another generator's latents."""
        config = self.config
        if config["kind"] != kind or config["latent_space"] != latent_space:
            raise UserError(
                f"{where}: the latent reward model reads {config['kind']} latents of {config['latent_space']}, "
                f"but the model samples {kind} latents of {latent_space}; train one on this model's latents"
            )
        if tuple(config["latent_shape"]) != tuple(latent_shape):
            raise UserError(
                f"{where}: the latent reward model was trained on latents of shape {tuple(config['latent_shape'])}, "
                f"but the model samples {tuple(latent_shape)}; set model.resolution / model.num_frames to match "
                "or train one at this size"
            )

    def weight_vector(self, weights: dict[str, float], *, key: str) -> torch.Tensor:
        """{dimension: λ} → (D,) in the model's order, unnamed dimensions 0; unknown names are refused."""
        unknown = sorted(set(weights) - set(self.dimensions))
        if unknown:
            raise UserError(
                f"`{key}` names reward dimensions the reward model does not have: {', '.join(unknown)} "
                f"(accepted: {', '.join(self.dimensions)})"
            )
        return torch.tensor([float(weights.get(name, 0.0)) for name in self.dimensions])

    # --- files
    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG), "w") as f:
            json.dump({"_class_name": type(self).__name__, **self.config}, f, indent=2)
        state = {name: value.detach().cpu().contiguous() for name, value in self.state_dict().items()}
        save_file(state, os.path.join(path, WEIGHTS))

    @classmethod
    def load(cls, path: str, *, key: str = "guidance.reward_model") -> LatentRewardModel:
        """The model saved at ``path``, frozen and in eval mode."""
        config_path, weights_path = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
        if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
            raise UserError(
                f"`{key}` must be a latent reward model folder ({CONFIG} and {WEIGHTS}), got {path!r}: "
                "not found; train one with recipe: latent_reward"
            )
        with open(config_path) as f:
            config = json.load(f)
        if config.pop("_class_name", None) != cls.__name__:
            raise UserError(f"`{key}`: {config_path} does not describe a {cls.__name__}")
        model = cls(**config)
        model.load_state_dict(load_file(weights_path))
        return model.requires_grad_(False).eval()


class CleanLatentReward:
    """A latent reward model read at noise level 0 on media, as a differentiable pixel-space reward.

    ``reward(media in [0, 1], prompts) -> (B, D)``. For a pixel-space generator (no VAE) its latents are the
    pixels in [−1, 1], so this is a reward on decoded media; pixel-space reward guidance uses it as its reward,
    so that both guidance modes steer by the same learnt dimensions.
    """

    differentiable = True

    def __init__(self, model: LatentRewardModel) -> None:
        if model.config["latent_space"] != "pixels":
            raise UserError(
                "a latent reward model is a pixel-space reward only for a pixel-space generator; this one reads "
                f"latents of {model.config['latent_space']}"
            )
        self.model = model
        self.dimensions = model.dimensions

    def __call__(self, media: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        latents = media * 2 - 1  # (B, 3, [F,] H, W) in [-1, 1]
        if len(self.model.latent_shape) == 4 and latents.dim() == 4:
            latents = latents[:, :, None]
        return self.model(latents, torch.zeros(latents.shape[0], device=latents.device), prompts)


def vocabulary_of(prompts: list[str]) -> list[str]:
    """The distinct lowercased words of ``prompts`` in first-seen order."""
    seen: dict[str, None] = {}
    for prompt in prompts:
        for word in prompt.lower().split():
            seen.setdefault(word, None)
    return list(seen)
