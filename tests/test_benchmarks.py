"""The benchmark scripts run against the current engine: each of their timed steps executes once on the tiny
models and trains (their numbers are measured by the scripts themselves, never asserted here)."""

from __future__ import annotations

import os
import sys

import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import diffusion_dpo_step  # noqa: E402
import flow_dpo_step  # noqa: E402

CPU = torch.device("cpu")


def _changed(params, before) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(params, before))


def test_diffusion_step_benchmark_variants_run_and_train():
    setup = diffusion_dpo_step.build_setup("tiny", 2, CPU)
    for name, step in diffusion_dpo_step.STEPS.items():
        before = [p.detach().clone() for p in setup.params]
        step(setup)
        assert _changed(setup.params, before) == (name != "text"), name


def test_flow_step_benchmark_variants_run_and_train(tmp_path):
    folder = flow_dpo_step.save_pipeline(flow_dpo_step.TRANSFORMERS["tiny"], 16, str(tmp_path / "wan"))
    setup = flow_dpo_step.build_setup(folder, "tiny", 2, CPU, False)
    for name, step in flow_dpo_step.STEPS.items():
        before = [p.detach().clone() for p in setup.params]
        step(setup)
        assert _changed(setup.params, before) == (name != "text"), name
