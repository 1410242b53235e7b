"""The toy rectified-flow configs end to end on the shipped bases (slow tier: a few minutes each on 2 cores)."""

import json
import os

import pytest
from conftest import EVAL_KEYS

from mmalign.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config(name: str, out, capsys) -> dict:
    rc = main(["train", os.path.join(ROOT, "configs", name), f"output_dir={out}", "log.progress=false"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "win vs base" in printed and "control" in printed
    return json.loads((out / "eval.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("config", ["flow_dpo_video_toy.yaml", "flow_rwr_video_toy.yaml"])
def test_video_toy_configs_run_end_to_end(config, tmp_path, capsys, monkeypatch):
    """Online pool, training, control, evaluation on 64 held-out samples and the GIF / MP4 grids. The shipped
    video base does not follow direction words, so no improvement is asserted (docs/toy_world.md)."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    summary = run_config(config, out, capsys)
    for key in EVAL_KEYS:
        assert key in summary
    assert summary["num_samples"] >= 64 and 0 <= summary["base_error_rate"] <= 1
    for name in (
        "samples/before_after.gif",
        "samples/before_after.mp4",
        "samples/reward_vs_step.png",
        "final/pytorch_lora_weights.safetensors",
        "control/final/pytorch_lora_weights.safetensors",
    ):
        assert (out / name).exists(), name


@pytest.mark.slow
def test_flow_dpo_image_toy_removes_the_colour_mistake(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    summary = run_config("flow_dpo_image_toy.yaml", tmp_path / "run", capsys)
    assert summary["aligned_reward_gain_z"] > 2
    assert summary["aligned_error_rate"] < summary["base_error_rate"]
