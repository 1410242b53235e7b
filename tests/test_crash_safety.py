"""Crash safety: a run killed at any moment resumes to the uninterrupted result, and NaN/inf never reaches a
checkpoint.

The kills are real: ``python -m mmalign train`` in a subprocess, ended with SIGKILL (``kill -9``) at points read
from the run directory (a metrics row written, a checkpoint's ``.tmp`` folder present), then the same command
again. ``MMALIGN_CHECKPOINT_PAUSE`` holds each checkpoint half-written long enough to kill the run inside it.
Non-finite runs blow up the honest way, with a learning rate no model survives.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import QUIET_RUN
from safetensors.torch import load_file

from mmalign import checkpoint
from mmalign.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def logged_steps(out) -> list[int]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def exported(out) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(glob.glob(os.path.join(out, "final", "**", "*.safetensors"), recursive=True)):
        name = os.path.relpath(path, os.path.join(out, "final"))
        tensors.update({f"{name}:{key}": value for key, value in load_file(path).items()})
    assert tensors, f"nothing exported in {out}/final"
    return tensors


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(value).all()) for value in tensors.values())


def checkpoint_tensors(ckpt_dir) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of every checkpoint folder (and the best snapshot), by folder."""
    held = {}
    for path in glob.glob(os.path.join(ckpt_dir, "*", "*.safetensors")):
        held.setdefault(os.path.basename(os.path.dirname(path)), {}).update(load_file(path))
    return held


# --------------------------------------------------------------------------------------------- kill -9

# 4 steps, a checkpoint every 2 (only the newest kept), a warm-up that makes the lr depend on the restored
# schedule; every run resumes from the latest checkpoint and says so.
KILLED = [
    *QUIET_RUN,
    "log.progress=true",
    "optim.max_steps=4",
    "optim.batch_size=2",
    "optim.lr_scheduler=constant_with_warmup",
    "optim.warmup_steps=3",
    "log.every=1",
    "checkpoint.every=2",
    "checkpoint.keep=1",
    "checkpoint.resume=latest",
]


class Training:
    """``python -m mmalign train`` as a user starts it, in the background."""

    def __init__(self, config: str, out, log, *, pause: float | None = None):
        env = dict(os.environ)
        env.pop(checkpoint.PAUSE_ENV, None)
        if pause is not None:
            env[checkpoint.PAUSE_ENV] = str(pause)
        self.log = log
        command = [sys.executable, "-m", "mmalign", "train", config, *KILLED, f"output_dir={out}"]
        with open(log, "w") as f:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)

    def kill_when(self, condition, what: str, timeout: float = 120) -> None:
        """SIGKILL as soon as ``condition()`` holds (polled), as ``kill -9`` would."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the run ended (exit {self.process.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"no {what} within {timeout} s:\n{self.output()}")
            time.sleep(0.005)
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(timeout=30) == -signal.SIGKILL

    def finish(self) -> None:
        assert self.process.wait(timeout=300) == 0, self.output()

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()[-4000:]


def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_result(config_file, tmp_path):
    straight = tmp_path / "straight"
    assert main(["train", config_file, *KILLED, f"output_dir={straight}"]) == 0

    out = tmp_path / "killed"
    ckpt = out / "checkpoints"
    # 1. killed during step 2 (or inside its checkpoint, held half-written): no complete checkpoint yet
    Training(config_file, out, tmp_path / "1.log", pause=1.0).kill_when(
        lambda: 1 in logged_steps(out), "metrics row for step 1"
    )
    assert checkpoint.latest(str(ckpt)) is None
    # 2. the same command starts afresh; killed inside the write of the step-4 checkpoint
    Training(config_file, out, tmp_path / "2.log", pause=1.0).kill_when(
        lambda: (ckpt / "step-4.tmp").is_dir(), "step-4.tmp folder"
    )
    assert checkpoint.latest(str(ckpt)) == str(ckpt / "step-2")
    assert (ckpt / "step-4.tmp").is_dir() and not (ckpt / "step-4").exists()
    assert logged_steps(out) == [1, 2, 3, 4]  # the first attempt's rows were dropped, not appended to
    assert "resuming" not in (tmp_path / "2.log").read_text()
    # 3. once more: resumes at step 2 and runs to the end
    Training(config_file, out, tmp_path / "3.log").finish()
    assert "resuming at step 2" in (tmp_path / "3.log").read_text()

    assert max_difference(exported(out), exported(straight)) <= 1e-6
    rows, rows_straight = metrics(out), metrics(straight)
    assert [row["step"] for row in rows] == [row["step"] for row in rows_straight] == [1, 2, 3, 4]
    for a, b in zip(rows, rows_straight):
        assert a.keys() == b.keys()
        for key in a.keys() - {"pairs_per_s"}:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    # the crash's leftovers were cleaned up and the newest checkpoint kept
    assert sorted(os.listdir(ckpt)) == ["step-4"]


# --------------------------------------------------------------------------------------- checkpoints


def test_latest_and_prune_count_only_complete_checkpoints(tmp_path):
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.save(str(ckpt / f"step-{step}"), module=module, optimizer=optimizer, state={"step": step})
    # what crashes leave: a newer folder missing its state, a half-written and a half-removed folder
    os.makedirs(ckpt / "step-3")
    (ckpt / "step-3" / "trainable.safetensors").write_bytes(b"")
    for leftover in ("step-1.old", "step-4.tmp"):
        os.makedirs(ckpt / leftover)
    assert checkpoint.latest(str(ckpt)) == str(ckpt / "step-2")

    checkpoint.prune(str(ckpt), keep=1)
    # step-2 is the only complete one left; the leftovers before it are gone, the half step-4 write is kept
    # for the run that writes step 4 again
    assert sorted(os.listdir(ckpt)) == ["step-2", "step-3", "step-4.tmp"]
    assert checkpoint.load(str(ckpt / "step-2"), module=module, optimizer=optimizer) == {"step": 2}
    assert checkpoint.latest(str(tmp_path / "none")) is None


def scalar_steps(out, tag: str) -> list[int]:
    """The steps of ``tag`` in the run's TensorBoard events, as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_tensorboard_after_a_resume_holds_each_step_once(config_file, tmp_path):
    """Killed after logging steps 3 and 4 but before the step-4 checkpoint was complete: the resumed run
    logs 3 and 4 again, and the first attempt's events after step 2 are purged, as metrics.jsonl's rows are."""
    out = tmp_path / "run"
    run = [*QUIET_RUN, "log.tensorboard=true", "optim.max_steps=4", "optim.batch_size=2", "log.every=1"]
    run += ["checkpoint.every=2", "checkpoint.resume=latest"]
    assert main(["train", config_file, *run]) == 0
    shutil.rmtree(out / "checkpoints" / "step-4")  # as if the run died inside that write
    assert main(["train", config_file, *run]) == 0
    assert scalar_steps(out, "loss") == [1, 2, 3, 4]
    assert [row["step"] for row in metrics(out)] == [1, 2, 3, 4]
    assert main(["train", config_file, *run, "checkpoint.resume=null"]) == 0  # a fresh start replaces all
    assert scalar_steps(out, "loss") == [1, 2, 3, 4]


# -------------------------------------------------------------------------------------------- NaN/inf

NONFINITE = [*QUIET_RUN, "optim.max_steps=4", "optim.batch_size=2", "log.every=1", "checkpoint.every=1"]


def one_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mmalign: error:")]
    assert code == 2 and len(lines) == 1, (code, err)
    return lines[0]


def test_a_nonfinite_loss_stops_the_run_naming_the_step(capsys, config_file, tmp_path):
    """lr 1e30: step 1 is finite and moves the LoRA weights to ~1e30, so the loss of step 2 overflows."""
    out = tmp_path / "run"
    line = one_error(capsys, "train", config_file, *NONFINITE, "optim.lr=1e30")
    assert "step 2:" in line and "the loss is not finite" in line and "optim.skip_nonfinite" in line
    assert [row["step"] for row in metrics(out)] == [1]
    # the step-1 checkpoint is the last one, and it is finite
    held = checkpoint_tensors(out / "checkpoints")
    assert sorted(held) == ["step-1"] and all_finite(held["step-1"])
    assert not (out / "final").exists()


def test_skip_nonfinite_skips_and_counts_the_steps(capsys, config_file, tmp_path):
    out = tmp_path / "run"
    skip = [*NONFINITE, "optim.lr=1e30", "optim.skip_nonfinite=true", "log.progress=true"]
    assert main(["train", config_file, *skip]) == 0
    rows = metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    # step 1 trains; every later step overflows and is dropped, its NaN kept out of the means
    assert [row["skipped_nonfinite"] for row in rows] == [0, 1, 2, 3]
    assert math.isfinite(rows[0]["loss"]) and [row["loss"] for row in rows[1:]] == [None, None, None]
    shown = capsys.readouterr()
    assert "step 2: the loss is not finite (NaN or inf); step skipped" in shown.out + shown.err
    # no skipped step touched the weights: every checkpoint holds step 1's, all finite
    held = checkpoint_tensors(out / "checkpoints")
    assert sorted(held) == ["step-3", "step-4"]
    for folder in held.values():
        assert all_finite(folder)
    weights = load_file(out / "checkpoints" / "step-4" / "trainable.safetensors")
    assert max(float(value.abs().max()) for value in weights.values()) > 1e20  # step 1 did move them
    assert all_finite(exported(out))
    with open(out / "checkpoints" / "step-4" / "state.json") as f:
        assert json.load(f)["skipped_nonfinite"] == 3


def test_resume_keeps_the_skip_count_and_drops_a_row_cut_short(config_file, tmp_path):
    out = tmp_path / "run"
    skip = [*NONFINITE, "optim.lr=1e30", "optim.skip_nonfinite=true", "checkpoint.resume=latest"]
    assert main(["train", config_file, *skip, "optim.max_steps=3"]) == 0
    # a crash in the middle of writing the step-4 row
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": nu')
    assert main(["train", config_file, *skip]) == 0
    assert [row["skipped_nonfinite"] for row in metrics(out)] == [0, 1, 2, 3]


def test_nonfinite_weights_are_never_checkpointed(capsys, config_file, tmp_path):
    """AdamW's decay at lr 3e38 and weight decay 10 multiplies each weight by 1 − 3e39, which overflows float32
    (β1 = 0 keeps the Adam step itself representable): the loss and gradients of step 1 are finite, the weights
    after it are not, and skipping cannot help."""
    out = tmp_path / "run"
    blow_up = ["optim.lr=3e38", "optim.adam_beta1=0", "optim.weight_decay=10", "optim.skip_nonfinite=true"]
    line = one_error(capsys, "train", config_file, *NONFINITE, *blow_up)
    assert "step 1:" in line and "weights are not finite" in line and "no checkpoint was written" in line
    assert os.listdir(out / "checkpoints") == []
