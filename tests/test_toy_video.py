"""The toy moving-shapes world: grammar, splits, render, pretraining clips and the programmatic video reward."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from mmalign.errors import UserError
from mmalign.rewards import REWARDS, build_reward
from mmalign.rewards.toy_video import MovingShapesReward
from mmalign.toy import moving


@pytest.fixture(scope="module")
def reward() -> MovingShapesReward:
    return MovingShapesReward()


def _renders(scenes: list[moving.Scene], offset: int = 0) -> torch.Tensor:
    """One clip per scene; scene i always gets the jitter of seed offset + i, whatever its colour or direction."""
    clips = np.stack([moving.render(s, np.random.default_rng(offset + i)) for i, s in enumerate(scenes)])
    return moving.clips_to_tensor(clips)  # (B, 3, F, 16, 16)


def _centroids(clip: np.ndarray) -> np.ndarray:
    """Coverage-weighted centre (x, y) of each frame of a uint8 (F, H, W, 3) clip, (F, 2) in pixel coordinates."""
    weight = clip.max(axis=-1).astype(np.float64)  # (F, H, W)
    centres = np.arange(clip.shape[1]) + 0.5
    total = weight.sum(axis=(1, 2))  # (F,)
    cx = (weight.sum(axis=1) * centres).sum(axis=1) / total
    cy = (weight.sum(axis=2) * centres).sum(axis=1) / total
    return np.stack([cx, cy], axis=1)


def _other_colour(scene: moving.Scene) -> moving.Scene:
    names = list(moving.COLOURS)
    return replace(scene, colour=names[(names.index(scene.colour) + 3) % len(names)])


def _reversed(scene: moving.Scene) -> moving.Scene:
    return replace(scene, direction=moving.OPPOSITE[scene.direction])


# ------------------------------------------------------------------------------------------------ grammar


def test_caption_round_trip_for_all_72_scenes():
    scenes = moving.all_scenes()
    assert len(set(scenes)) == 72
    captions = [moving.caption(s) for s in scenes]
    assert len(set(captions)) == 72
    assert [moving.parse_caption(c) for c in captions] == scenes
    assert [moving.parse_caption(f"  {c.upper()} ") for c in captions] == scenes
    assert moving.caption(moving.Scene("red", "circle", "right")) == "a red circle moving right"
    vocab = moving.vocabulary()
    assert len(vocab) == len(set(vocab)) and all(set(c.split()) <= set(vocab) for c in captions)


@pytest.mark.parametrize(
    "text",
    ["a red circle moving sideways", "a orange circle moving left", "a large red circle on the left", ""],
)
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(
        UserError, match="outside the moving-shapes grammar .*moving <left\\|right\\|up\\|down>"
    ):
        moving.parse_caption(text)


def test_splits_are_fixed_disjoint_and_cover_every_attribute():
    assert moving._make_splits() == moving.SPLITS
    sizes = {name: len(scenes) for name, scenes in moving.SPLITS.items()}
    assert sizes == {"train": 48, "val": 8, "test": 16}
    sets = {name: set(scenes) for name, scenes in moving.SPLITS.items()}
    assert (
        not sets["train"] & sets["val"]
        and not sets["train"] & sets["test"]
        and not sets["val"] & sets["test"]
    )
    assert sets["train"] | sets["val"] | sets["test"] == set(moving.all_scenes())
    for scenes in moving.SPLITS.values():
        assert {s.colour for s in scenes} == set(moving.COLOURS)
        assert {s.shape for s in scenes} == set(moving.SHAPES)
        assert {s.direction for s in scenes} == set(moving.DIRECTIONS)
    assert moving.prompts("test") == [moving.caption(s) for s in moving.SPLITS["test"]]
    with pytest.raises(UserError, match="accepted: train, val, test"):
        moving.prompts("dev")


# -------------------------------------------------------------------------------------------------- render


def test_render_is_seeded_and_jittered():
    scene = moving.Scene("cyan", "square", "up")
    first = moving.render(scene, np.random.default_rng(3))
    assert first.shape == (moving.FRAMES, 16, 16, 3) == (4, 16, 16, 3) and first.dtype == np.uint8
    assert np.array_equal(first, moving.render(scene, np.random.default_rng(3)))
    assert not np.array_equal(first, moving.render(scene, np.random.default_rng(4)))
    assert first[..., 0].max() == 0 and first[..., 1:].max() == 255  # cyan on black


@pytest.mark.parametrize("scene", moving.all_scenes()[:12])  # every shape × direction, in red
def test_render_moves_two_pixels_per_frame_in_the_captioned_direction(scene):
    u = np.asarray(moving.DIRECTIONS[scene.direction])
    for seed in range(4):
        steps = np.diff(_centroids(moving.render(scene, np.random.default_rng(seed))), axis=0)  # (F − 1, 2)
        along = steps @ u
        across = steps[:, 0] * u[1] - steps[:, 1] * u[0]
        np.testing.assert_allclose(along, moving.STEP, atol=0.1)
        np.testing.assert_allclose(across, 0.0, atol=0.1)


def test_clips_to_tensor_is_channels_first_in_unit_range():
    clips = np.stack([moving.render(moving.Scene("yellow", "triangle", "left"), np.random.default_rng(0))])
    video = moving.clips_to_tensor(clips)
    assert video.shape == (1, 3, 4, 16, 16) and video.dtype == torch.float32
    assert video.min() == 0 and video.max() == 1
    torch.testing.assert_close(video[0, :, 2], torch.from_numpy(clips[0, 2]).permute(2, 0, 1).float() / 255)


# ------------------------------------------------------------------------------------------ pretraining data


def test_pretraining_clips_have_the_wrong_share_moving_backwards_and_no_test_caption(reward):
    clips, captions, wrong = moving.pretraining_clips(
        500, np.random.default_rng(0), wrong_direction_share=0.3
    )
    assert clips.shape == (500, 4, 16, 16, 3) and clips.dtype == np.uint8 and len(captions) == 500
    assert wrong.sum() == 150
    assert set(captions) <= set(moving.prompts("train")) | set(moving.prompts("val"))
    assert not set(captions) & set(moving.prompts("test"))
    for clip, text, flipped in zip(clips, captions, wrong):
        u = np.asarray(moving.DIRECTIONS[moving.parse_caption(text).direction])
        along = (_centroids(clip)[-1] - _centroids(clip)[0]) @ u
        assert along == pytest.approx(-6.0 if flipped else 6.0, abs=0.2)
    assert torch.equal(reward.mistake(moving.clips_to_tensor(clips), captions), torch.from_numpy(wrong))


def test_pretraining_clips_reject_a_share_outside_unit_range():
    with pytest.raises(UserError, match="wrong_direction_share must be in \\[0, 1\\], got 1.5"):
        moving.pretraining_clips(4, np.random.default_rng(0), wrong_direction_share=1.5)


# ------------------------------------------------------------------------------------------------- reward


def test_reward_of_true_renders_is_high_and_beats_every_corruption(reward):
    scenes = moving.all_scenes()
    captions = [moving.caption(s) for s in scenes]
    videos = _renders(scenes)  # (72, 3, 4, 16, 16)
    true = reward(videos, captions)
    assert true.shape == (72,) and ((true >= 0) & (true <= 1)).all()
    assert true.mean() >= 0.85
    backwards = reward(videos.flip(2), captions)  # the same clip played in reverse
    wrong_colour = reward(_renders([_other_colour(s) for s in scenes]), captions)
    blank = reward(torch.zeros_like(videos), captions)
    assert (true > backwards).all() and backwards.mean() <= 0.55
    assert (true > wrong_colour).all() and true.mean() - wrong_colour.mean() > 0.25  # colour weighs 0.3
    assert (true > blank).all() and (blank == 0).all()


def test_static_clip_scores_little_motion(reward):
    scenes = moving.all_scenes()
    captions = [moving.caption(s) for s in scenes]
    still = _renders(scenes)[:, :, :1].expand(-1, -1, 4, -1, -1)  # first frame held for the whole clip
    motion = reward.components(still, captions)["motion"]
    assert (motion < 0.2).all()


def test_mistake_flags_reversed_motion_and_blank_clips(reward):
    scenes = moving.all_scenes() * 3
    captions = [moving.caption(s) for s in scenes]
    true = reward.mistake(_renders(scenes, offset=100), captions)
    reversed_motion = reward.mistake(_renders([_reversed(s) for s in scenes], offset=100), captions)
    assert true.float().mean() <= 0.05
    assert reversed_motion.float().mean() >= 0.95
    assert reward.mistake(torch.zeros(4, 3, 4, 16, 16), captions[:4]).all()


def test_reward_is_in_unit_range_and_independent_of_batch_order(reward):
    scenes = moving.all_scenes()
    captions = [moving.caption(s) for s in scenes]
    noise = torch.rand(72, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    videos = torch.cat([_renders(scenes), noise])  # (144, 3, 4, 16, 16)
    prompts = captions + captions
    scores = reward(videos, prompts)
    assert ((scores >= 0) & (scores <= 1)).all()
    order = torch.randperm(144, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(reward(videos[order], [prompts[i] for i in order]), scores[order])


def test_reward_measures_other_resolutions_and_frame_counts(reward):
    scene = moving.Scene("green", "square", "down")
    video = _renders([scene])  # (1, 3, 4, 16, 16)
    large = torch.nn.functional.interpolate(video[0], scale_factor=2, mode="nearest")[
        None
    ]  # (1, 3, 4, 32, 32)
    assert reward(large, [moving.caption(scene)]).item() > 0.85
    two_frames = video[:, :, [0, -1]]  # (1, 3, 2, 16, 16)
    assert reward(two_frames, [moving.caption(scene)]).item() > 0.85
    with pytest.raises(UserError, match="videos must have shape \\(B, 3, F, H, W\\)"):
        reward(video[:, :, 0], [moving.caption(scene)])


def test_reward_registry():
    assert isinstance(build_reward("toy_moving_shapes"), REWARDS["toy_moving_shapes"])
    with pytest.raises(UserError, match="accepted: toy_shapes, toy_shapes_sparse, toy_moving_shapes"):
        build_reward("pickscore")


# ------------------------------------------------------------------------------------------ shipped bases


@pytest.mark.parametrize(
    ("path", "world", "frames", "trained", "untrained"),
    [
        # measured on these 16 prompt/seed pairs: 0.40 vs 0.18 (video), 0.45 vs 0.20 (one-frame images)
        ("assets/toy-video", "moving_shapes", 4, 0.32, 0.25),
        ("assets/toy-flow-t2i", "shapes", 1, 0.37, 0.27),
    ],
)
def test_shipped_flow_base_draws_the_held_out_captions(path, world, frames, trained, untrained):
    """Each shipped rectified-flow base scores well above an untrained transformer of its shape on held-out
    captions, by its world's reward (a broken asset, loader or sampler would score like the untrained one)."""
    from mmalign import adapters
    from mmalign.config import ModelConfig
    from mmalign.toy import flow_base
    from mmalign.toy.flow_base import WORLDS

    adapter = adapters.load(ModelConfig(kind="flow", path=path, resolution=16, num_frames=frames))
    world_module = WORLDS[world].module
    prompts, seeds = world_module.prompts("test")[:16], list(range(1000, 1016))
    media = adapter.sample(prompts, seeds, steps=20, guidance_scale=1.5)
    blank = flow_base.build_untrained(0, world=world).transformer
    fresh = adapter.sample(prompts, seeds, network=blank, steps=20, guidance_scale=1.5)
    assert media.shape == ((16, 3, 4, 16, 16) if frames > 1 else (16, 3, 16, 16))
    score = build_reward("toy_moving_shapes" if world == "moving_shapes" else "toy_shapes")
    assert float(score(media, prompts).mean()) > trained
    assert float(score(fresh, prompts).mean()) < untrained
