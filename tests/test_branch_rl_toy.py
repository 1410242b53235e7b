"""The B²-DiffuRL and DDPO toy configs end to end on the shipped base (slow tier: several minutes each).

Both train against the sparse toy reward on the same prompts, seeds, sampler and budget, and are evaluated on
the quickstart's held-out prompts and seeds. These tests assert the issue's acceptance numbers; the measured
values are in docs/algorithms.md, whether or not they are reached.
"""

import json
import os
import sys

import pytest

from mmalign.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.slow
@pytest.mark.xfail(reason="measured below the targets at the toy budget: see docs/algorithms.md", strict=True)
def test_b2_diffurl_and_ddpo_raise_the_sparse_reward_and_b2_needs_fewer_evaluations(tmp_path, monkeypatch):
    import b2_vs_ddpo

    monkeypatch.chdir(ROOT)
    runs = {"b2_diffurl": tmp_path / "b2", "ddpo": tmp_path / "ddpo"}
    for name, out in runs.items():
        config = os.path.join(ROOT, "configs", f"{name}_toy.yaml")
        assert main(["train", config, f"output_dir={out}", "log.progress=false"]) == 0
        summary = json.loads((out / "eval.json").read_text())
        assert summary["reward"] == "toy_shapes_sparse" and summary["prompts"] == "test"
        assert summary["aligned_reward_gain_z"] >= 3, (name, summary["aligned_reward_gain_z"])
    out = tmp_path / "curve"
    b2_vs_ddpo.main(["--b2", str(runs["b2_diffurl"]), "--ddpo", str(runs["ddpo"]), "--out", str(out)])
    result = json.loads((tmp_path / "curve.json").read_text())
    assert result["evals_ratio"] is not None and result["evals_ratio"] <= 0.6, result
