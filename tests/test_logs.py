"""A run whose output goes to a file (not a terminal) logs one line every ``log.every`` steps, not each
progress-bar redraw."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import run_overrides


def test_a_log_file_gets_one_line_per_metrics_row(tmp_path, pixel_pipeline, pairs_parquet):
    out = tmp_path / "run"
    overrides = [*run_overrides(pixel_pipeline, pairs_parquet, out), "log.progress=true"]
    config = tmp_path / "config.yaml"
    config.write_text("log:\n  progress: true\n")
    command = [sys.executable, "-m", "mmalign", "train", str(config), *overrides]
    command += ["optim.max_steps=6", "optim.batch_size=2", "log.every=2", "checkpoint.every=6"]
    log = tmp_path / "train.log"
    with open(log, "wb") as sink:  # stdout and stderr both a plain file, as under nohup or a job scheduler
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ}, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text, "progress-bar redraws in a log file"
    steps = re.findall(
        r"^dpo step (\d+)/6: loss [0-9.]+, acc [0-9.]+, [0-9.]+ samples/s$", text, flags=re.MULTILINE
    )
    assert steps == ["2", "4", "6"], text
