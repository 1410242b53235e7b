"""Flow-DPO (offline and online pairs) and Flow-RWR as recipes: exactness of accumulation and resume, the
online pool, and the reward weights over the global batch — on tiny real Wan pipelines, in float64 where
two runs are compared."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import tiny_flow
import torch
from _distributed_worker import float64_recipe
from conftest import QUIET_RUN, TOY
from safetensors.torch import load_file

from mmalign import checkpoint
from mmalign.config import load_config
from mmalign.data.scored import read_scored_jsonl
from mmalign.errors import UserError
from mmalign.losses import rwr_weights
from mmalign.pairs import OnlinePool
from mmalign.recipes import preference, rwr
from mmalign.toy import flow_base, moving


@pytest.fixture(scope="module")
def wan_pipeline(tmp_path_factory) -> str:
    return tiny_flow.save("wan", tmp_path_factory.mktemp("wan") / "pipe")


@pytest.fixture(scope="module")
def wan_pairs(tmp_path_factory) -> str:
    return tiny_flow.write_videogen_csv(tmp_path_factory.mktemp("clips"), frames=5, size=32)


@pytest.fixture(scope="module")
def toy_video_pipeline(tmp_path_factory) -> str:
    """An untrained pixel-space Wan pipeline of the moving-shapes world (one head, one layer)."""
    path = tmp_path_factory.mktemp("toy_video") / "pipe"
    flow_base.build_untrained(0, world="moving_shapes", heads=1, layers=1).save_pretrained(str(path))
    return str(path)


@pytest.fixture
def float64():
    with float64_recipe():
        yield


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_lora(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "final", "pytorch_lora_weights.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def wan_config(pipeline: str, data: str, out, *overrides: str):
    return load_config(
        None,
        [
            f"model.path={pipeline}",
            f"data.path={data}",
            f"output_dir={out}",
            *QUIET_RUN,
            *tiny_flow.media_overrides("wan"),
            "data.format=videogen_csv",
            "data.dimension=VQ",
            "lora.rank=4",
            "loss.beta=100",
            "optim.lr=1e-2",
            "optim.max_grad_norm=1.0",
            "log.every=1",
            *overrides,
        ],
    )


def toy_online_config(pipeline: str, out, *overrides: str, recipe: str = "preference"):
    """Online pairs (or scored samples) of the moving-shapes world, sampled in 2 Euler steps."""
    return load_config(
        None,
        [
            f"recipe={recipe}",
            f"model.path={pipeline}",
            f"output_dir={out}",
            *QUIET_RUN,
            "model.kind=flow",
            "model.resolution=16",
            "model.num_frames=4",
            "toy.world=moving_shapes",
            "eval.reward=toy_moving_shapes",
            "online.enabled=true",
            "online.prompts=val",
            "online.samples_per_prompt=2",
            "sampling.steps=2",
            "sampling.guidance_scale=1.0",
            "lora.rank=4",
            "optim.lr=1e-2",
            "optim.batch_size=4",
            "log.every=1",
            *overrides,
        ],
    )


# ------------------------------------------------------------------------------------- offline Flow-DPO


def test_flow_dpo_gradient_accumulation_matches_the_full_batch(wan_pipeline, wan_pairs, tmp_path, float64):
    full = wan_config(wan_pipeline, wan_pairs, tmp_path / "full", "optim.max_steps=3", "optim.batch_size=4")
    accumulated = wan_config(
        wan_pipeline,
        wan_pairs,
        tmp_path / "accum",
        "optim.max_steps=3",
        "optim.batch_size=1",
        "optim.gradient_accumulation_steps=4",
    )
    preference.train(full)
    preference.train(accumulated)
    assert max_difference(final_lora(full.output_dir), final_lora(accumulated.output_dir)) <= 1e-6
    for a, b in zip(metrics(full.output_dir), metrics(accumulated.output_dir)):
        for key in ("loss", "grad_norm", "ref_err_w", "policy_err_l"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_flow_dpo_resume_matches_an_uninterrupted_run(wan_pipeline, wan_pairs, tmp_path, float64):
    common = [
        "optim.batch_size=2",
        "checkpoint.every=2",
        "optim.lr_scheduler=constant_with_warmup",
        "optim.warmup_steps=2",
    ]
    straight = wan_config(wan_pipeline, wan_pairs, tmp_path / "straight", "optim.max_steps=4", *common)
    preference.train(straight)
    out = tmp_path / "resumed"
    preference.train(wan_config(wan_pipeline, wan_pairs, out, "optim.max_steps=3", *common))
    shutil.rmtree(out / "checkpoints" / "step-3")  # killed before its step-3 checkpoint
    preference.train(
        wan_config(wan_pipeline, wan_pairs, out, "optim.max_steps=4", "checkpoint.resume=latest", *common)
    )
    assert max_difference(final_lora(straight.output_dir), final_lora(str(out))) <= 1e-6
    assert [row["step"] for row in metrics(out)] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ online pairs


class _Pool(OnlinePool):
    """The pool's selection alone, on given rewards (no model involved)."""

    def __init__(self, per_group: int):
        self.per_group = per_group
        self.cfg = load_config(None, [TOY])


def test_online_pool_prefers_the_best_over_the_worst_and_skips_ties():
    pool = _Pool(per_group=3)
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.3, 0.7, 0.2, 0.4])  # groups of 3; the middle one ties
    latents = torch.arange(9.0).view(9, 1, 1, 1)  # sample i's latent is i
    prompts = [p for p in ("a", "b", "c") for _ in range(3)]
    pool._select(latents, rewards, prompts, generation=0)
    assert pool.captions == ["a", "c"]
    assert pool.chosen.flatten().tolist() == [1.0, 6.0]  # the best of each kept group
    assert pool.rejected.flatten().tolist() == [0.0, 7.0]  # the worst
    assert pool.reward_gap == pytest.approx(((0.9 - 0.1) + (0.7 - 0.2)) / 2)
    with pytest.raises(UserError, match="tied within every group"):
        pool._select(latents, torch.ones(9), prompts, generation=1)


def test_online_flow_dpo_refreshes_its_pool_from_the_policy_and_resumes_exactly(
    toy_video_pipeline, tmp_path, float64
):
    common = ["online.refresh_every=2", "checkpoint.every=2", "checkpoint.keep=3"]
    straight = toy_online_config(toy_video_pipeline, tmp_path / "straight", "optim.max_steps=4", *common)
    preference.train(straight)
    ckpt = tmp_path / "straight" / "checkpoints"
    pools = {}
    for step in (2, 4):
        with open(ckpt / f"step-{step}" / "state.json") as f:
            pools[step] = json.load(f)["extras"]["pool"]
    assert pools[2]["generation"] == 0 and pools[4]["generation"] == 1
    assert all(caption in moving.prompts("val") for caption in pools[4]["captions"])
    first, second = (
        load_file(str(ckpt / "step-2" / "extra.safetensors")),
        load_file(str(ckpt / "step-4" / "extra.safetensors")),
    )
    assert first["pool.chosen"].shape[1:] == (3, 4, 16, 16)  # pixel-space clips (C, F, H, W)
    assert not torch.equal(first["pool.chosen"][:1], second["pool.chosen"][:1]), "the pool was rebuilt"

    out = tmp_path / "resumed"
    preference.train(toy_online_config(toy_video_pipeline, out, "optim.max_steps=2", *common))
    preference.train(
        toy_online_config(toy_video_pipeline, out, "optim.max_steps=4", "checkpoint.resume=latest", *common)
    )
    assert max_difference(final_lora(straight.output_dir), final_lora(str(out))) <= 1e-6
    assert checkpoint.latest(str(out / "checkpoints")).endswith("step-4")


def test_a_later_run_reuses_the_reference_pool_it_would_have_sampled(toy_video_pipeline, tmp_path, float64):
    """The control after the aligned run takes the same reference pool instead of sampling it again; a pool
    sampled anew is identical to the reused one, and another sampler setting is not served from memory."""
    from mmalign.pairs import online

    def pool_of(out) -> dict:
        return load_file(str(out / "checkpoints" / "step-1" / "extra.safetensors"))

    common = ["optim.max_steps=1", "checkpoint.every=1"]
    online._last_reference_pool.clear()
    preference.train(toy_online_config(toy_video_pipeline, tmp_path / "first", *common))
    sampled = online._last_reference_pool["samples"][0]
    preference.train(toy_online_config(toy_video_pipeline, tmp_path / "second", *common))
    assert online._last_reference_pool["samples"][0] is sampled, "the second run sampled its pool again"
    online._last_reference_pool.clear()
    preference.train(toy_online_config(toy_video_pipeline, tmp_path / "fresh", *common))
    assert online._last_reference_pool["samples"][0] is not sampled
    first, second, fresh = (pool_of(tmp_path / name) for name in ("first", "second", "fresh"))
    assert first.keys() == fresh.keys() and all(torch.equal(first[k], fresh[k]) for k in first)
    assert all(torch.equal(second[k], fresh[k]) for k in first)
    fresh_samples = online._last_reference_pool["samples"][0]
    preference.train(toy_online_config(toy_video_pipeline, tmp_path / "other", *common, "sampling.steps=3"))
    assert online._last_reference_pool["samples"][0] is not fresh_samples


# -------------------------------------------------------------------------------------------------- RWR


def test_rwr_weights_come_from_the_whole_global_batch(toy_video_pipeline, tmp_path, float64):
    """Accumulating 4 × 1 equals one batch of 4: each micro-batch's weights are its share of the global
    softmax, not a softmax over itself (which would make every weight 1)."""
    common = ["rwr.temperature=0.05", "optim.max_steps=2", "optim.max_grad_norm=0"]
    full = toy_online_config(toy_video_pipeline, tmp_path / "full", *common, recipe="rwr")
    accumulated = toy_online_config(
        toy_video_pipeline,
        tmp_path / "accum",
        *common,
        "optim.batch_size=1",
        "optim.gradient_accumulation_steps=4",
        recipe="rwr",
    )
    rwr.train(full)
    rwr.train(accumulated)
    assert max_difference(final_lora(full.output_dir), final_lora(accumulated.output_dir)) <= 1e-6
    rows = metrics(full.output_dir)
    assert rows[0]["weight_max"] > 1.0, "the rewards should weight the samples unequally"


def test_step_weights_are_the_softmax_over_the_global_batch_and_a_shuffle_for_the_control():
    class Source:
        rewards = torch.tensor([0.2, 0.9, 0.4, 0.7])

    stream = preference.PairStream(4, seed=0)
    cfg = load_config(None, [TOY, "recipe=rwr", "rwr.temperature=0.1"])
    positions = [0, 1, 2, 3]
    order = [stream.pair_index(p) for p in positions]
    weights = rwr.step_weights(stream, Source(), positions, cfg, step=0)
    expected = rwr_weights(Source.rewards[order], temperature=0.1)
    torch.testing.assert_close(weights, expected)
    assert float(weights.sum()) == pytest.approx(4.0)
    control = load_config(None, [TOY, "recipe=rwr", "rwr.temperature=0.1", "data.labels=random"])
    shuffled = rwr.step_weights(stream, Source(), positions, control, step=0)
    assert sorted(shuffled.tolist()) == pytest.approx(sorted(weights.tolist()))
    assert not torch.allclose(shuffled, weights)


def test_scored_jsonl_reader_checks_rewards_and_paths(tmp_path):
    from mmalign.data.video import write_gif

    (tmp_path / "clips").mkdir()
    write_gif(
        str(tmp_path / "clips" / "a.gif"), tiny_flow.moving_square(4, 16, colour=(200, 0, 0), step=2, seed=0)
    )
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"caption": "a red square", "path": "clips/a.gif", "score": 0.5}) + "\n")
    (record,) = read_scored_jsonl(str(good), reward_column="score")
    assert record.reward == 0.5 and record.path == str(tmp_path / "clips" / "a.gif")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"caption": "x", "path": "clips/a.gif", "score": "high"}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl line 1: key score must be a finite number, got 'high'"):
        read_scored_jsonl(str(bad), reward_column="score")
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({"caption": "x", "path": "../a.gif", "score": 1}) + "\n")
    with pytest.raises(UserError, match="escapes the dataset root"):
        read_scored_jsonl(str(outside), reward_column="score")


def test_gradient_checkpointing_trains_the_same_lora(wan_pipeline, wan_pairs, tmp_path, float64):
    plain = wan_config(wan_pipeline, wan_pairs, tmp_path / "plain", "optim.max_steps=2", "optim.batch_size=2")
    recomputed = wan_config(
        wan_pipeline,
        wan_pairs,
        tmp_path / "ckpt",
        "optim.max_steps=2",
        "optim.batch_size=2",
        "model.gradient_checkpointing=true",
    )
    preference.train(plain)
    preference.train(recomputed)
    assert max_difference(final_lora(plain.output_dir), final_lora(recomputed.output_dir)) <= 1e-6


def test_online_diffusion_dpo_builds_its_pool_from_the_toy_unet(tmp_path, capsys):
    """Online pairs are modality-agnostic: the same pool feeds Diffusion-DPO on the shipped toy UNet."""
    from conftest import TOY_BASE

    cfg = load_config(
        None,
        [
            f"model.path={TOY_BASE}",
            f"output_dir={tmp_path / 'run'}",
            *QUIET_RUN,
            "online.enabled=true",
            "online.prompts=val",
            "online.samples_per_prompt=2",
            "sampling.steps=2",
            "optim.max_steps=2",
            "optim.batch_size=4",
            "checkpoint.every=2",
            "log.every=1",
            "log.progress=true",
            "loss.beta=300",
        ],
    )
    preference.train(cfg)
    printed = capsys.readouterr()
    assert (
        "online pool 0 at step 0:" in printed.out + printed.err
        and "sampled from the reference" in printed.out + printed.err
    )
    extra = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "extra.safetensors"))
    assert extra["pool.chosen"].shape[1:] == (3, 16, 16)  # pixel-space latents of the 16×16 toy images
    assert not torch.equal(extra["pool.chosen"], extra["pool.rejected"])
    rows = metrics(cfg.output_dir)
    assert [row["step"] for row in rows] == [1, 2] and rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
