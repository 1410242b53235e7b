"""The README's first command, end to end on the shipped toy base (slow tier: a few minutes on 2 cores)."""

import json
import os

import pytest
from conftest import EVAL_KEYS

from mmalign.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_aligns_the_toy_model(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            os.path.join(ROOT, "configs", "quickstart.yaml"),
            f"output_dir={out}",
            f"data.path={out}/data/pairs.parquet",
            f"model.path={os.path.join(ROOT, 'assets', 'toy-t2i')}",
            "log.progress=false",
        ]
    )
    assert rc == 0
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "eval.json",
        "samples/before_after.png",
        "samples/reward_vs_step.png",
        "final/pytorch_lora_weights.safetensors",
        "control/final",
    ):
        assert (out / name).exists(), name
    summary = json.loads((out / "eval.json").read_text())
    for key in EVAL_KEYS:
        assert key in summary
    assert summary["num_samples"] >= 128
    # the preferences did the work: the aligned model beats the base and the no-label control
    assert summary["aligned_reward_gain_z"] > 2
    assert summary["win_rate"] > summary["control_win_rate"]
    assert summary["aligned_error_rate"] < summary["base_error_rate"]
    printed = capsys.readouterr().out
    assert "win vs base" in printed and "control" in printed
