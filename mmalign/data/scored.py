"""Scored samples for reward-weighted regression: a JSONL file plus a folder of images or clips.

One JSON object per line: ``{"caption": "...", "path": "rel/a.png", "reward": 0.83}``, the reward under a
configurable key (``data.reward_column``). Paths are relative to ``image_root`` (default: the JSONL file's
folder) and must resolve inside it, as for the JSONL pair reader. Blank lines are skipped; other keys are
ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmalign.data.images import load_image, to_tensor
from mmalign.data.records import json_line, jsonl_root, path_inside
from mmalign.data.video import load_video
from mmalign.errors import UserError


@dataclass(frozen=True)
class ScoredRecord:
    """One scored sample: a caption, an image or clip path, and its reward."""

    caption: str
    path: str
    reward: float
    row: int
    source: str

    def where(self) -> str:
        return f"{self.source} line {self.row}: key path"


def read_scored_jsonl(
    path: str, *, image_root: str | None = None, reward_column: str = "reward"
) -> list[ScoredRecord]:
    """Read scored samples; ``row`` of each record is its 1-based line number, media are checked to exist."""
    root = jsonl_root(path, image_root, what="media")
    keys = ("caption", "path", reward_column)
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            where = f"{path} line {number}"
            entry = json_line(text, where=where)
            if not isinstance(entry, dict) or any(key not in entry for key in keys):
                raise UserError(f"{where}: expected a JSON object with keys {', '.join(keys)}")
            reward = entry[reward_column]
            if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
                raise UserError(f"{where}: key {reward_column} must be a finite number, got {reward!r}")
            if not isinstance(entry["caption"], str) or not isinstance(entry["path"], str):
                raise UserError(f"{where}: keys caption and path must be strings")
            media = path_inside(entry["path"], where=f"{where}: key path", root=root, what="file")
            records.append(ScoredRecord(entry["caption"], media, float(reward), number, path))
    if not records:
        raise UserError(f"data.path: {path} holds no scored samples")
    return records


class ScoredDataset:
    """Records → model-ready media in [-1, 1]: images (3, R, R), or clips (3, F, R, R) with ``num_frames``."""

    def __init__(
        self,
        records: list[ScoredRecord],
        *,
        resolution: int,
        num_frames: int | None = None,
        frame_stride: int = 1,
    ):
        self.records = records
        self.resolution, self.num_frames, self.frame_stride = resolution, num_frames, frame_stride

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> torch.Tensor:
        record = self.records[index]
        if self.num_frames is None:
            return to_tensor(load_image(record.path, where=record.where()), self.resolution)
        return load_video(
            record.path,
            num_frames=self.num_frames,
            resolution=self.resolution,
            frame_stride=self.frame_stride,
            where=record.where(),
        )
