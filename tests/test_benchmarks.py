"""The benchmark scripts run against the current engine: each of their timed steps executes once on the tiny
models and trains (their numbers are measured by the scripts themselves, never asserted here)."""

from __future__ import annotations

import json
import os
import sys

import torch

from mmalign.recipes import runtime

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


def test_diffusion_loop_benchmark_times_the_trainers_own_steps(tmp_path):
    args = diffusion_dpo_step.parse_args(["--batch", "1", "--repeats", "2", "--warmup", "1"])
    setup = diffusion_dpo_step.build_setup("tiny", 1, CPU)
    pipeline, data = diffusion_dpo_step.write_run_inputs("tiny", str(tmp_path), pairs=6)
    end_step = runtime.Run.end_step
    before = [p.detach().clone() for p in setup.params]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # as the script runs it: one thread
    try:
        loop = diffusion_dpo_step.time_loop(setup, pipeline, data, str(tmp_path / "run"), args, log_every=1)
    finally:
        torch.set_num_threads(threads)
    assert runtime.Run.end_step is end_step  # the timing hook is gone again
    assert len(loop["step_ms"]["all"]) == len(loop["floor_ms"]["all"]) == 2
    assert loop["ratio"] > 0 and loop["target"] == diffusion_dpo_step.LOOP_TARGETS[1]
    assert loop["pairs_encoded_ahead"] == 4  # 4 steps of 1 pair: 4 of the 6 pairs are ever read
    assert _changed(setup.params, before)  # the interleaved floor steps trained the floor's own LoRA
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]  # and the trainer ran its own steps


def test_flow_step_benchmark_variants_run_and_train(tmp_path):
    folder = flow_dpo_step.save_pipeline(flow_dpo_step.TRANSFORMERS["tiny"], 16, str(tmp_path / "wan"))
    setup = flow_dpo_step.build_setup(folder, "tiny", 2, CPU, False)
    for name, step in flow_dpo_step.STEPS.items():
        before = [p.detach().clone() for p in setup.params]
        step(setup)
        assert _changed(setup.params, before) == (name != "text"), name
