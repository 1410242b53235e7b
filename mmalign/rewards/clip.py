"""CLIP-based reward models on local transformers CLIP folders: CLIPScore and PickScore.

    CLIPScore(I, c) = w · max(cos(E_I, E_c), 0),   w = 2.5        (Hessel et al. 2021, arXiv 2104.08718, Eq. 1)
    PickScore(I, c) = exp(t) · cos(E_I, E_c)                       (Kirstain et al. 2023, arXiv 2305.01569, §4)

E_I and E_c are the projected image and text embeddings of the CLIP model; exp(t) is its learned logit scale
(``model.logit_scale.exp()``, 100 for PickScore_v1). PickScore is a CLIP-H/14 fine-tuned on Pick-a-Pic; both load
the same way, from a folder ``CLIPModel.from_pretrained`` reads (``openai/clip-vit-large-patch14``,
``yuvalkirstain/PickScore_v1``), with the folder's tokenizer and ``CLIPImageProcessor`` beside the weights.

Images go through the processor's resize → centre crop → normalise, reimplemented in torch (``pixel_values``)
so that gradients reach the image in differentiable mode; the resize is torch's antialiased bicubic, which
has PIL's bicubic filter but not its rounding to 8 bits, so it agrees with the (PIL) processor to about one
grey level, and exactly when the image is already at the processor's size.

What the papers leave open, or do differently: Hessel et al. prefix every caption with "A photo depicts"; here
the prompt that produced an image is scored as given. PickScore's paper turns scores into a preference
probability with a softmax over the images of one prompt; the reward here is the raw score, one per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerBase

from mmalign.rewards.base import require_files, score_media

__all__ = [
    "CLIP_FILES",
    "CLIP_NEEDS",
    "CLIPScore",
    "PickScore",
    "image_embeddings",
    "load_clip",
    "pixel_values",
]

CLIPSCORE_WEIGHT = 2.5  # w of Hessel et al., Eq. 1

# one name from each group must be in a CLIP reward folder
CLIP_FILES = (
    ("config.json",),
    (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ),
    ("preprocessor_config.json",),
    ("tokenizer.json", "vocab.json"),
)
CLIP_NEEDS = (
    "a transformers CLIP folder needs config.json, model.safetensors or pytorch_model.bin, "
    "preprocessor_config.json, tokenizer files"
)


def load_clip(path: str, *, device: str | torch.device, dtype: torch.dtype):
    """The frozen ``CLIPModel``, tokenizer and ``CLIPImageProcessor`` of the local folder ``path``."""
    require_files(path, CLIP_FILES, CLIP_NEEDS)
    model = CLIPModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    model = model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    return model, tokenizer, processor


def pixel_values(images: torch.Tensor, processor: CLIPImageProcessor) -> torch.Tensor:
    """``processor``'s resize → centre crop → normalise of ``images`` (N, 3, H, W) in [0, 1], differentiably.

    The resize follows the processor's ``size``: the shorter side to ``shortest_edge`` (the longer side scaled
    and truncated to an integer, as transformers does), or exactly ``height`` × ``width``.
    """
    height, width = images.shape[-2:]
    size = processor.size
    if "shortest_edge" in size:
        edge = size["shortest_edge"]
        if height <= width:
            target = (edge, int(edge * width / height))
        else:
            target = (int(edge * height / width), edge)
    else:
        target = (size["height"], size["width"])
    # PIL resizes in two passes, horizontal then vertical, and stores each in 8 bits: clipping the first pass's
    # bicubic overshoot changes sharp images by many grey levels, so it is reproduced (the rounding is not)
    if target[1] != width:
        images = F.interpolate(images, size=(height, target[1]), mode="bicubic", antialias=True).clamp(0, 1)
    if target[0] != height:
        images = F.interpolate(images, size=target, mode="bicubic", antialias=True).clamp(0, 1)
    crop_h, crop_w = processor.crop_size["height"], processor.crop_size["width"]
    top, left = (images.shape[-2] - crop_h) // 2, (images.shape[-1] - crop_w) // 2
    images = images[..., top : top + crop_h, left : left + crop_w]  # (N, 3, crop_h, crop_w)
    mean = torch.tensor(processor.image_mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def image_embeddings(model: CLIPModel, processor: CLIPImageProcessor, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings, (N, P) in float32."""
    # preprocessed in float32 whatever the model dtype: bf16 keeps 8 mantissa bits, too few for 8-bit pixels
    pixels = pixel_values(images.to(model.device, torch.float32), processor)  # (N, 3, crop, crop)
    pooled = model.vision_model(pixel_values=pixels.to(model.dtype)).pooler_output  # (N, hidden)
    return F.normalize(model.visual_projection(pooled).float(), dim=-1)  # (N, P)


def text_embeddings(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> torch.Tensor:
    """L2-normalised projected text embeddings, (N, P) in float32; prompts truncated to the model's context."""
    tokens = tokenizer(
        prompts,
        padding=True,
        truncation=True,
        max_length=model.config.text_config.max_position_embeddings,
        return_tensors="pt",
    ).to(model.device)
    pooled = model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
    return F.normalize(model.text_projection(pooled).float(), dim=-1)  # (N, P)


def cosine(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    processor: CLIPImageProcessor,
    images: torch.Tensor,
    prompts: list[str],
) -> torch.Tensor:
    """cos(E_I, E_c) of each image with its prompt, (N,) in float32."""
    image = image_embeddings(model, processor, images)  # (N, P)
    text = text_embeddings(model, tokenizer, prompts)  # (N, P)
    return (image * text).sum(dim=-1)  # (N,)


class CLIPReward:
    """A reward of CLIP image and text embeddings from a local transformers CLIP folder: ``reward(media,
    prompts) -> (B,)``. Subclasses give ``_score(images, prompts) -> (N,)``.

    ``batch_size``: images (or frames) per forward pass; ``differentiable``: keep the graph so gradients reach
    the media."""

    dimensions: tuple[str, ...] = ()

    def __init__(
        self,
        path: str,
        *,
        batch_size: int = 32,
        differentiable: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model, self.tokenizer, self.processor = load_clip(path, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.differentiable = differentiable

    def __call__(self, media: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return score_media(
            self._score, media, prompts, batch_size=self.batch_size, differentiable=self.differentiable
        )

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class CLIPScore(CLIPReward):
    """``reward(media, prompts) -> (B,)`` = 2.5 · max(cos(E_I, E_c), 0) ∈ [0, 2.5] (Hessel et al., Eq. 1).

    ``path``: a local transformers CLIP folder (ViT-L/14 in the paper's results); options as ``CLIPReward``.
    """

    dimensions = ("clip_score",)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        similarity = cosine(self.model, self.tokenizer, self.processor, images, prompts)  # (N,)
        return CLIPSCORE_WEIGHT * similarity.clamp(min=0)


class PickScore(CLIPReward):
    """``reward(media, prompts) -> (B,)`` = exp(logit_scale) · cos(E_I, E_c) (Kirstain et al., §4).

    ``path``: a local PickScore folder (``yuvalkirstain/PickScore_v1`` with the CLIP-H processor and tokenizer
    files beside it); options as ``CLIPReward``.
    """

    dimensions = ("pick_score",)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        similarity = cosine(self.model, self.tokenizer, self.processor, images, prompts)  # (N,)
        return self.model.logit_scale.exp().float() * similarity
