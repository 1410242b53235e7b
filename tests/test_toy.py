"""The toy shapes world: grammar, splits, reward, pretraining data and the shipped base model."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from mmalign.adapters.diffusion import Components, load_components, sample, save_components
from mmalign.errors import UserError
from mmalign.rewards import REWARDS, build_reward
from mmalign.rewards.toy import ShapesReward
from mmalign.toy import shapes
from mmalign.toy.base_model import build_untrained

ASSET = os.path.join(os.path.dirname(__file__), "..", "assets", "toy-t2i")


@pytest.fixture(scope="module")
def reward() -> ShapesReward:
    return ShapesReward()


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (B, 3, 16, 16)


def _renders(scenes: list[shapes.Scene]) -> torch.Tensor:
    """One render per scene; scene i always gets the jitter of seed i, whatever its colour or position."""
    return _pixels(np.stack([shapes.render(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]))


def _other_colour(scene: shapes.Scene) -> shapes.Scene:
    names = list(shapes.COLOURS)
    return replace(scene, colour=names[(names.index(scene.colour) + 3) % len(names)])


# Opposite positions lie a whole number of pixels apart, so with the same jitter the two renders alias alike
# and differ only in where they are.
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left"}


def _other_position(scene: shapes.Scene) -> shapes.Scene:
    return replace(scene, position=_OPPOSITE[scene.position])


# ------------------------------------------------------------------------------------------------ grammar


def test_caption_round_trip_for_all_180_scenes():
    scenes = shapes.all_scenes()
    assert len(set(scenes)) == 180
    captions = [shapes.caption(s) for s in scenes]
    assert len(set(captions)) == 180
    assert [shapes.parse_caption(c) for c in captions] == scenes
    assert shapes.caption(shapes.Scene("red", "circle", "left", "large")) == "a large red circle on the left"


def test_parse_rejects_text_outside_the_grammar():
    with pytest.raises(UserError, match="outside the shapes grammar"):
        shapes.parse_caption("a large orange circle on the left")


def test_vocabulary_covers_every_caption():
    vocab = set(shapes.vocabulary())
    assert all(set(shapes.caption(s).split()) <= vocab for s in shapes.all_scenes())


def test_splits_are_fixed_disjoint_and_cover_every_attribute():
    sizes = {name: len(scenes) for name, scenes in shapes.SPLITS.items()}
    assert sizes == {"train": 126, "val": 18, "test": 36}
    sets = {name: set(scenes) for name, scenes in shapes.SPLITS.items()}
    assert (
        not sets["train"] & sets["val"]
        and not sets["train"] & sets["test"]
        and not sets["val"] & sets["test"]
    )
    assert sets["train"] | sets["val"] | sets["test"] == set(shapes.all_scenes())
    for scenes in shapes.SPLITS.values():
        assert {s.colour for s in scenes} == set(shapes.COLOURS)
        assert {s.shape for s in scenes} == set(shapes.SHAPES)
        assert {s.position for s in scenes} == set(shapes.POSITIONS)
        assert {s.size for s in scenes} == set(shapes.SIZES)
    assert shapes.prompts("test") == [shapes.caption(s) for s in shapes.SPLITS["test"]]
    with pytest.raises(UserError, match="accepted: train, val, test"):
        shapes.prompts("dev")


def test_render_is_seeded_and_jittered():
    scene = shapes.Scene("cyan", "square", "center", "large")
    first = shapes.render(scene, np.random.default_rng(3))
    assert first.shape == (16, 16, 3) and first.dtype == np.uint8
    assert np.array_equal(first, shapes.render(scene, np.random.default_rng(3)))
    assert not np.array_equal(first, shapes.render(scene, np.random.default_rng(4)))


# ------------------------------------------------------------------------------------------------- reward


def test_reward_of_true_renders_is_high_and_beats_every_corruption(reward):
    scenes = shapes.all_scenes()
    captions = [shapes.caption(s) for s in scenes]
    true = reward(_renders(scenes), captions)  # (180,)
    assert true.shape == (180,) and ((true >= 0) & (true <= 1)).all()
    assert true.mean() > 0.8
    wrong_colour = reward(_renders([_other_colour(s) for s in scenes]), captions)
    wrong_position = reward(_renders([_other_position(s) for s in scenes]), captions)
    blank = reward(torch.zeros(180, 3, 16, 16), captions)
    assert (true > wrong_colour).all()
    # per sample only where the sub-pixel phase matches (center → left shifts by 3.5 px and aliases differently)
    same_phase = torch.tensor([s.position != "center" for s in scenes])
    assert (true > wrong_position)[same_phase].all()
    assert true.mean() - wrong_position.mean() > 0.1
    assert (true > blank).all() and (blank == 0).all()
    assert true.mean() - wrong_colour.mean() > 0.3  # colour weighs 0.4


def test_mistake_flags_wrong_colour_and_blank_only(reward):
    scenes = shapes.all_scenes()
    captions = [shapes.caption(s) for s in scenes]
    assert not reward.mistake(_renders(scenes), captions).any()
    assert reward.mistake(_renders([_other_colour(s) for s in scenes]), captions).all()
    assert reward.mistake(torch.zeros(180, 3, 16, 16), captions).all()


def test_reward_registry():
    assert isinstance(build_reward("toy_shapes"), REWARDS["toy_shapes"])
    with pytest.raises(UserError, match="accepted: toy_shapes"):
        build_reward("pickscore")


# ------------------------------------------------------------------------------------------ pretraining data


def test_pretraining_captions_have_the_wrong_colour_share_and_no_held_out_caption(reward):
    images, captions, wrong = shapes.pretraining_captions(
        4000, np.random.default_rng(0), wrong_colour_share=0.3
    )
    assert images.shape == (4000, 16, 16, 3) and len(captions) == 4000
    assert abs(wrong.mean() - 0.3) < 0.01
    # the flagged captions are exactly those whose colour disagrees with the image
    assert torch.equal(reward.mistake(_pixels(images), captions), torch.from_numpy(wrong))
    assert not set(captions) & set(shapes.prompts("test"))


# --------------------------------------------------------------------------------------------- base model


def test_untrained_base_saves_in_fp16_and_reloads(tmp_path):
    components = build_untrained(seed=0)
    half = Components(
        unet=components.unet.to(torch.float16),
        scheduler=components.scheduler,
        text_encoder=components.text_encoder.to(torch.float16),
        tokenizer=components.tokenizer,
    )
    save_components(half, str(tmp_path))
    loaded = load_components(str(tmp_path), dtype=torch.float32)
    assert loaded.vae is None and loaded.resolution == 16
    assert loaded.unet.dtype == torch.float32
    text = ["a small blue square in the center", "a large red circle on the left", ""]
    assert loaded.tokenizer(text).input_ids == components.tokenizer(text).input_ids
    ids = loaded.tokenizer(text[0]).input_ids
    assert loaded.tokenizer.unk_token_id not in ids and len(ids) == 9  # [BOS] + 7 words + [EOS]
    for name, weight in components.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[name], weight.float())


def test_shipped_base_loads_and_draws_the_captions():
    """The shipped base draws what the held-out captions ask for, far above an untrained UNet of its shape."""
    components = load_components(ASSET, dtype=torch.float32)
    prompts = shapes.prompts("test")[:8]
    seeds = list(range(1000, 1008))
    images = sample(components, prompts, seeds, steps=20, guidance_scale=1.5)
    assert images.shape == (8, 3, 16, 16)
    reward = ShapesReward()
    untrained = Components(**{**components.__dict__, "unet": build_untrained(0).unet})
    blank = sample(untrained, prompts, seeds, steps=20, guidance_scale=1.5)
    assert float(reward(images, prompts).mean()) > 0.55  # 0.73 on all 36 test prompts × 8 seeds
    assert float(reward(blank, prompts).mean()) < 0.3
