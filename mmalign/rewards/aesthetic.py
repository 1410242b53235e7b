"""LAION aesthetic predictor: an MLP on the L2-normalised CLIP image embedding (the prompt plays no part).

    aesthetic(I) = MLP(E_I / ‖E_I‖)        E_I the projected CLIP image embedding (ViT-L/14: 768-d)

MLP = Linear(d, 1024) → Dropout(0.2) → Linear(1024, 128) → Dropout(0.2) → Linear(128, 64) → Dropout(0.1) →
Linear(64, 16) → Linear(16, 1), the head of LAION's improved-aesthetic-predictor
(github.com/christophschuhmann/improved-aesthetic-predictor), trained on SAC + LOGOS + AVA ratings, which it
predicts on their 1–10 scale. There is no nonlinearity between the layers: the published head is linear as a
whole, and it is kept layer for layer so that its weights load unchanged.

The folder is a transformers CLIP folder (its tokenizer is not needed: no text is encoded) plus
``aesthetic_head.safetensors`` holding the head's tensors under the names of the original ``nn.Sequential``
(``layers.0.weight`` … ``layers.7.bias``): the published ``sac+logos+ava1-l14-linearMSE.pth`` converts with
``safetensors.torch.save_file(torch.load(pth), "aesthetic_head.safetensors")``; ``save_head`` writes one.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPImageProcessor, CLIPModel

from mmalign.errors import UserError
from mmalign.rewards.base import require_files, score_media
from mmalign.rewards.clip import CLIP_FILES, image_embeddings

__all__ = ["HEAD_FILE", "AestheticHead", "AestheticScore", "save_head"]

HEAD_FILE = "aesthetic_head.safetensors"
AESTHETIC_FILES = (*CLIP_FILES[:3], (HEAD_FILE,))
AESTHETIC_NEEDS = (
    "an aesthetic folder needs a transformers CLIP's config.json, model.safetensors or pytorch_model.bin, "
    f"preprocessor_config.json, and {HEAD_FILE}, written by mmalign.rewards.aesthetic.save_head"
)


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP on ``dim``-wide embeddings: (N, dim) -> (N,)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)  # (N,)


def save_head(head: AestheticHead, folder: str) -> str:
    """Write ``head``'s weights to ``folder``/aesthetic_head.safetensors and return that file's path."""
    file = os.path.join(folder, HEAD_FILE)
    save_file({name: tensor.contiguous() for name, tensor in head.state_dict().items()}, file)
    return file


def load_head(folder: str, dim: int) -> AestheticHead:
    """The head in ``folder``/aesthetic_head.safetensors, checked against the CLIP's embedding width ``dim``."""
    file = os.path.join(folder, HEAD_FILE)
    state = load_file(file)
    head = AestheticHead(dim)
    expected = set(head.state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(
            f"reward path {folder}: {HEAD_FILE} is not a LAION aesthetic head (missing tensors: "
            f"{', '.join(missing) or 'none'}; unexpected: {', '.join(unexpected) or 'none'})"
        )
    width = state["layers.0.weight"].shape[1]
    if width != dim:
        raise UserError(
            f"reward path {folder}: {HEAD_FILE} takes {width}-d embeddings, but the CLIP beside it gives {dim}-d"
        )
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)


class AestheticScore:
    """``reward(media, prompts) -> (B,)``: the LAION aesthetic score of each image; ``prompts`` are ignored.

    ``path``: a transformers CLIP folder (ViT-L/14 for the published head) with ``aesthetic_head.safetensors``;
    ``batch_size``: images (or frames) per forward pass; ``differentiable``: keep the graph for the media.
    """

    dimensions = ("aesthetic",)

    def __init__(
        self,
        path: str,
        *,
        batch_size: int = 32,
        differentiable: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        require_files(path, AESTHETIC_FILES, AESTHETIC_NEEDS)
        model = CLIPModel.from_pretrained(path, dtype=dtype, local_files_only=True)
        self.model = model.to(device).eval().requires_grad_(False)
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        self.head = load_head(path, model.config.projection_dim).to(device)
        self.batch_size = batch_size
        self.differentiable = differentiable

    def __call__(self, media: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return score_media(
            self._score, media, prompts, batch_size=self.batch_size, differentiable=self.differentiable
        )

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embeddings = image_embeddings(self.model, self.processor, images)  # (N, P), unit norm, float32
        return self.head(embeddings)  # (N,)
