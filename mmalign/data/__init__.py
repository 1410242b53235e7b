"""Offline preference pairs: readers -> :class:`PairRecord` -> :class:`PairDataset` batches.

Formats: ``pickapic`` (Pick-a-Pic v2 parquet), ``hf_disk`` (``datasets.save_to_disk`` folder with the same
columns), ``jsonl`` (JSONL + image folder) and ``videogen_csv`` (VideoGen-RewardBench CSV + video folder).
Readers validate structure eagerly (columns, labels, paths); images and clips are decoded lazily per item.
:func:`validate_media` decodes everything once up front, which is cheap for small data; on a large set such as
Pick-a-Pic skip it and a bad image raises when its item is loaded.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from mmalign.data.hf_disk import read_hf_disk
from mmalign.data.images import load_image, to_tensor
from mmalign.data.jsonl import read_jsonl
from mmalign.data.pickapic import read_pickapic_parquet, write_pickapic_parquet
from mmalign.data.records import PairRecord, check_ties
from mmalign.data.video import load_video
from mmalign.data.videogen import read_videogen_csv
from mmalign.errors import UserError

READERS = {
    "pickapic": read_pickapic_parquet,
    "hf_disk": read_hf_disk,
    "jsonl": read_jsonl,
    "videogen_csv": read_videogen_csv,
}
VIDEO_FORMATS = ("videogen_csv",)

__all__ = [
    "PairDataset",
    "READERS",
    "PairRecord",
    "collate_pairs",
    "load_image",
    "read_hf_disk",
    "read_jsonl",
    "read_pairs",
    "read_pickapic_parquet",
    "to_tensor",
    "validate_images",
    "validate_media",
    "write_pickapic_parquet",
]


def read_pairs(
    format: str,
    path: str,
    *,
    ties: str = "drop",
    image_root: str | None = None,
    split: str | None = None,
    dimension: str | None = None,
    weights: dict[str, float] | None = None,
) -> list[PairRecord]:
    """Read preference pairs in ``format``; ``image_root`` is for jsonl and videogen_csv, ``split`` for hf_disk,
    ``dimension`` / ``weights`` (the preference column, or a weighted mix) for videogen_csv."""
    if format not in READERS:
        raise UserError(f"data.format must be one of {', '.join(READERS)}, got {format!r}")
    check_ties(ties)
    if image_root is not None and format not in ("jsonl", "videogen_csv"):
        raise UserError(f"data.image_root applies to formats jsonl and videogen_csv, got format {format!r}")
    if split is not None and format != "hf_disk":
        raise UserError(f"data.split applies to format hf_disk only, got format {format!r}")
    if (dimension is not None or weights is not None) and format != "videogen_csv":
        raise UserError(f"data.dimension / data.weights apply to format videogen_csv only, got {format!r}")
    options: dict = {"ties": ties}
    if format == "videogen_csv":
        options.update(video_root=image_root, dimension=dimension, weights=weights)
    elif image_root is not None:
        options["image_root"] = image_root
    if split is not None:
        options["split"] = split
    records = READERS[format](path, **options)
    if not records:
        raise UserError(f"data.path: {path} holds no preference pairs (format {format}, ties={ties!r})")
    return records


class PairDataset(Dataset):
    """Records -> ``{"caption", "chosen", "rejected", "label", "index"}``, decoded per item: images (3, R, R),
    or clips (3, F, R, R) when ``num_frames`` is given (every ``frame_stride``-th frame)."""

    def __init__(
        self,
        records: list[PairRecord],
        *,
        resolution: int,
        num_frames: int | None = None,
        frame_stride: int = 1,
    ) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            raise UserError(f"data.resolution must be a positive integer, got {resolution!r}")
        self.records = records
        self.resolution, self.num_frames, self.frame_stride = resolution, num_frames, frame_stride

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {
            "caption": record.caption,
            "chosen": self.load(record, "chosen"),  # (3, R, R) or (3, F, R, R)
            "rejected": self.load(record, "rejected"),
            "label": record.label,
            "index": index,
        }

    def load(self, record: PairRecord, side: str) -> torch.Tensor:
        """One member of a pair as a model-ready tensor in [-1, 1]."""
        source, where = getattr(record, side), record.where(side)
        if self.num_frames is None:
            return to_tensor(load_image(source, where=where), self.resolution)
        return load_video(
            source,
            num_frames=self.num_frames,
            resolution=self.resolution,
            frame_stride=self.frame_stride,
            where=where,
        )


def validate_images(records: list[PairRecord]) -> None:
    """Decode every image once so bad data fails before training; raises on the first unreadable one."""
    for record in records:
        load_image(record.chosen, where=record.where("chosen"))
        load_image(record.rejected, where=record.where("rejected"))


def validate_media(dataset: PairDataset) -> None:
    """Decode every image or clip of ``dataset`` once, so bad data fails before training."""
    if dataset.num_frames is None:
        validate_images(dataset.records)
        return
    for record in dataset.records:
        dataset.load(record, "chosen")
        dataset.load(record, "rejected")


def collate_pairs(items: list[dict]) -> dict:
    """Stack :class:`PairDataset` items into a batch."""
    return {
        "captions": [item["caption"] for item in items],
        "chosen": torch.stack([item["chosen"] for item in items]),  # (B, 3, R, R)
        "rejected": torch.stack([item["rejected"] for item in items]),  # (B, 3, R, R)
        "label": torch.tensor([item["label"] for item in items], dtype=torch.float32),  # (B,)
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),  # (B,)
    }
