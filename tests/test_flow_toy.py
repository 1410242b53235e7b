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
def test_flow_dpo_video_toy_removes_the_motion_mistake(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    summary = run_config("flow_dpo_video_toy.yaml", out, capsys)
    for key in EVAL_KEYS:
        assert key in summary
    assert summary["num_samples"] >= 64
    for name in (
        "samples/before_after.gif",
        "samples/before_after.mp4",
        "final/pytorch_lora_weights.safetensors",
    ):
        assert (out / name).exists(), name
    assert summary["aligned_reward_gain_z"] > 2
    assert summary["win_rate"] > summary["control_win_rate"]
    assert summary["aligned_error_rate"] < summary["base_error_rate"]


@pytest.mark.slow
def test_flow_rwr_video_toy_raises_the_reward(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    summary = run_config("flow_rwr_video_toy.yaml", tmp_path / "run", capsys)
    assert summary["aligned_reward_gain_z"] > 2


@pytest.mark.slow
def test_flow_dpo_image_toy_removes_the_colour_mistake(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    summary = run_config("flow_dpo_image_toy.yaml", tmp_path / "run", capsys)
    assert summary["aligned_reward_gain_z"] > 2
    assert summary["aligned_error_rate"] < summary["base_error_rate"]
