"""Reward models on local weights: a tiny real CLIPModel, its tokenizer and CLIPImageProcessor saved with
``save_pretrained`` and loaded back through ``load_reward_model``, the path a user's local CLIP, PickScore or
aesthetic folder takes."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

from mmalign.errors import UserError
from mmalign.rewards import MODEL_REWARDS, load_reward_model
from mmalign.rewards.aesthetic import AestheticHead, save_head
from mmalign.rewards.clip import pixel_values
from mmalign.rewards.combined import WeightedSum
from mmalign.toy import text

WORDS = ["a", "red", "green", "blue", "circle", "square", "cat", "dog", "on", "the", "left", "right"]
PROMPTS = [
    "a red circle",
    "a blue square on the left",
    "a cat",
    "the dog",
    "green",
    "a red dog",
    "right",
    "dog",
]
CROP = 32
CLIP_NEEDS = (
    "a transformers CLIP folder needs config.json, model.safetensors or pytorch_model.bin, "
    "preprocessor_config.json, tokenizer files"
)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    """A 2-layer CLIP (text and vision width 32, 32×32 images in 8×8 patches, projection 16), its word-level
    tokenizer in CLIP's [BOS] … [EOS] layout and a CLIPImageProcessor cropping to 32."""
    torch.manual_seed(0)
    tokenizer = text.word_tokenizer(WORDS, max_length=16, wrap=True)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={**tower, "image_size": CROP, "patch_size": 8},
        projection_dim=16,
    )
    path = str(tmp_path_factory.mktemp("clip") / "clip")
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def aesthetic_folder(clip_folder, tmp_path_factory) -> str:
    """The tiny CLIP folder plus a randomly initialised aesthetic head on its 16-d embeddings."""
    torch.manual_seed(1)
    path = str(tmp_path_factory.mktemp("aesthetic") / "aesthetic")
    shutil.copytree(clip_folder, path)
    save_head(AestheticHead(16), path)
    return path


def images(count: int, size: int = CROP, seed: int = 0) -> torch.Tensor:
    """``count`` random RGB images (count, 3, size, size) on the 8-bit grid k / 255, so the processor sees them
    exactly as uint8 arrays."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), generator=generator).float() / 255


def as_uint8(batch: torch.Tensor) -> list[np.ndarray]:
    """(N, 3, H, W) in [0, 1] on the 8-bit grid -> N arrays (H, W, 3) uint8, what the processor is given."""
    return [np.asarray((image * 255).round().byte().permute(1, 2, 0)) for image in batch]


def load(name: str, clip_folder: str, aesthetic_folder: str, **options):
    return load_reward_model(name, aesthetic_folder if name == "aesthetic" else clip_folder, **options)


def reference_outputs(folder: str, batch: torch.Tensor, prompts: list[str]):
    """CLIPModel's own forward on the processor's own pixel values: (image_embeds, text_embeds, logits_per_image)."""
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    pixels = processor(images=as_uint8(batch), return_tensors="pt")["pixel_values"]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    return out.image_embeds, out.text_embeds, out.logits_per_image


@pytest.mark.parametrize("name", sorted(MODEL_REWARDS))
def test_scores_are_one_float_per_image_deterministic_and_independent_of_batch_size(
    name, clip_folder, aesthetic_folder
):
    batch = images(5)
    one = load(name, clip_folder, aesthetic_folder, batch_size=1)
    four = load(name, clip_folder, aesthetic_folder, batch_size=4)  # chunks of 4 and 1
    scores = one(batch, PROMPTS[:5])
    assert scores.shape == (5,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert len(one.dimensions) == 1 and not one.differentiable and not scores.requires_grad
    assert torch.equal(scores, one(batch, PROMPTS[:5]))
    # different chunkings change only the BLAS reduction order: float32 rounding, far below any score gap
    torch.testing.assert_close(four(batch, PROMPTS[:5]), scores, rtol=1e-5, atol=1e-6)


def test_clip_score_is_2_5_times_the_clipped_cosine_of_clip_embeddings(clip_folder):
    """CLIP-S = 2.5 · max(cos, 0) (Hessel et al., Eq. 1) against CLIPModel's own normalised embeddings."""
    batch = images(8)
    image_embeds, text_embeds, _ = reference_outputs(clip_folder, batch, PROMPTS)
    cosine = (image_embeds * text_embeds).sum(dim=-1)  # (8,)
    assert (cosine < 0).any() and (cosine > 0).any(), "the seed should exercise the clip at 0"
    scores = load_reward_model("clip_score", clip_folder)(batch, PROMPTS)
    torch.testing.assert_close(scores, 2.5 * cosine.clamp(min=0), rtol=1e-4, atol=1e-5)


def test_pick_score_is_the_diagonal_of_clips_logits(clip_folder):
    """PickScore = exp(logit_scale) · cos: CLIPModel's logits_per_image for each image with its own prompt."""
    batch = images(8)
    _, _, logits = reference_outputs(clip_folder, batch, PROMPTS)
    scores = load_reward_model("pick_score", clip_folder)(batch, PROMPTS)
    torch.testing.assert_close(scores, logits.diagonal(), rtol=1e-4, atol=1e-4)


def test_aesthetic_score_is_the_laion_mlp_on_the_normalised_image_embedding(aesthetic_folder):
    batch = images(4)
    image_embeds, _, _ = reference_outputs(aesthetic_folder, batch, PROMPTS[:4])
    weights = load_file(os.path.join(aesthetic_folder, "aesthetic_head.safetensors"))
    hidden = image_embeds  # (4, 16), unit norm; dropout is off at inference and no activation sits between
    for layer in (0, 2, 4, 6, 7):
        hidden = hidden @ weights[f"layers.{layer}.weight"].T + weights[f"layers.{layer}.bias"]
    scores = load_reward_model("aesthetic", aesthetic_folder)(batch, PROMPTS[:4])
    torch.testing.assert_close(scores, hidden.squeeze(-1), rtol=1e-4, atol=1e-5)


def test_weighted_sum_adds_its_parts_with_their_weights(clip_folder, aesthetic_folder):
    batch = images(3)
    clip = load_reward_model("clip_score", clip_folder)
    pick = load_reward_model("pick_score", clip_folder)
    aesthetic = load_reward_model("aesthetic", aesthetic_folder)
    reward = WeightedSum({"clip": (clip, 1.0), "pick": (pick, -0.5), "aesthetic": (aesthetic, 0.25)})
    parts = reward.components(batch, PROMPTS[:3])
    assert reward.component_names == ("clip", "pick", "aesthetic") and parts.shape == (3, 3)
    assert reward.dimensions == ("weighted_sum",) and not reward.differentiable
    for column, part in enumerate((clip, pick, aesthetic)):
        assert torch.equal(parts[:, column], part(batch, PROMPTS[:3]))
    expected = parts[:, 0] - 0.5 * parts[:, 1] + 0.25 * parts[:, 2]
    torch.testing.assert_close(reward(batch, PROMPTS[:3]), expected)


def test_weighted_sum_rejects_no_parts_and_non_finite_weights(clip_folder):
    with pytest.raises(UserError) as err:
        WeightedSum({})
    assert str(err.value) == "a weighted sum of rewards needs at least one {name: (reward, weight)} part"
    with pytest.raises(UserError) as err:
        WeightedSum({"clip": (load_reward_model("clip_score", clip_folder), float("nan"))})
    assert str(err.value) == "weight of reward 'clip' must be a finite number, got nan"


@pytest.mark.parametrize("name", sorted(MODEL_REWARDS))
def test_a_video_scores_the_mean_of_its_frames(name, clip_folder, aesthetic_folder):
    video = images(6).unflatten(0, (2, 3)).transpose(1, 2)  # (2, 3, F=3, 32, 32)
    reward = load(name, clip_folder, aesthetic_folder, batch_size=4)  # chunks straddle the two videos
    frames = torch.stack([reward(video[:, :, f], PROMPTS[:2]) for f in range(3)])  # (F, 2)
    torch.testing.assert_close(reward(video, PROMPTS[:2]), frames.mean(dim=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODEL_REWARDS))
def test_differentiable_mode_gives_gradients_for_the_images_only(name, clip_folder, aesthetic_folder):
    reward = load(name, clip_folder, aesthetic_folder, differentiable=True, batch_size=2)
    batch = images(3, size=48).requires_grad_(True)  # through the resize as well
    reward(batch, PROMPTS[:3]).sum().backward()
    assert reward.differentiable
    assert batch.grad is not None and torch.isfinite(batch.grad).all() and batch.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.model.parameters())


@pytest.mark.parametrize("height, width", [(224, 224), (64, 48), (20, 24)])
def test_torch_preprocessing_matches_the_clip_image_processor(height, width, clip_folder):
    """Within 1.2 grey levels, on pixel noise (the worst case for bicubic overshoot). The processor resizes in
    PIL, which rounds to 8 bits after its horizontal and after its vertical pass: ≤ ½ level each, the first
    carried through the second pass's filter, whose |weights| sum to at most 1.25 (bicubic, a = −0.5), so
    ≤ 0.5 · 1.25 + 0.5 = 1.125 levels. Cases: down by 7 (224 → 32), a non-square shortest-edge resize with
    centre crop, and an upscale."""
    processor = CLIPImageProcessor.from_pretrained(clip_folder, local_files_only=True)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (2, 3, height, width), generator=generator).float() / 255
    expected = processor(images=as_uint8(batch), return_tensors="pt")["pixel_values"]
    got = pixel_values(batch, processor)
    assert got.shape == expected.shape == (2, 3, CROP, CROP)
    # compared in [0, 1] pixel units: the normalised difference times std
    torch.testing.assert_close(got * std, expected * std, rtol=0, atol=1.2 / 255)


def test_torch_preprocessing_equals_the_processor_at_its_own_size(clip_folder):
    processor = CLIPImageProcessor.from_pretrained(clip_folder, local_files_only=True)
    batch = images(2)
    expected = processor(images=as_uint8(batch), return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_values(batch, processor), expected)


def test_missing_folder_and_files_are_one_line_errors(clip_folder, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError) as err:
        load_reward_model("clip_score", missing)
    assert str(err.value) == f"reward path {missing} does not exist ({CLIP_NEEDS})"

    no_config = str(tmp_path / "no_config")
    shutil.copytree(clip_folder, no_config)
    os.remove(os.path.join(no_config, "config.json"))
    with pytest.raises(UserError) as err:
        load_reward_model("pick_score", no_config)
    assert str(err.value) == f"reward path {no_config} has no config.json ({CLIP_NEEDS})"

    with pytest.raises(UserError) as err:
        load_reward_model("aesthetic", clip_folder)
    assert str(err.value) == (
        f"reward path {clip_folder} has no aesthetic_head.safetensors (an aesthetic folder needs a transformers "
        "CLIP's config.json, model.safetensors or pytorch_model.bin, preprocessor_config.json, and "
        "aesthetic_head.safetensors, written by mmalign.rewards.aesthetic.save_head)"
    )

    with pytest.raises(UserError) as err:
        load_reward_model("hps", clip_folder)
    assert str(err.value) == "reward model 'hps' is unknown (accepted: clip_score, pick_score, aesthetic)"


def test_an_aesthetic_head_of_the_wrong_width_is_a_one_line_error(clip_folder, tmp_path):
    folder = str(tmp_path / "wide")
    shutil.copytree(clip_folder, folder)
    save_head(AestheticHead(768), folder)
    with pytest.raises(UserError) as err:
        load_reward_model("aesthetic", folder)
    assert str(err.value) == (
        f"reward path {folder}: aesthetic_head.safetensors takes 768-d embeddings, but the CLIP beside it gives 16-d"
    )
