"""Offline text-to-image preference pairs: readers -> :class:`PairRecord` -> :class:`PairDataset` batches.

Formats: ``pickapic`` (Pick-a-Pic v2 parquet), ``hf_disk`` (``datasets.save_to_disk`` folder with the same
columns) and ``jsonl`` (JSONL + image folder). Readers validate structure eagerly (columns, labels, paths);
images are decoded lazily per item. :func:`validate_images` decodes everything once up front, which is cheap
for small data; on a large set such as Pick-a-Pic skip it and a bad image raises when its item is loaded.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from mmalign.data.hf_disk import read_hf_disk
from mmalign.data.images import load_image, to_tensor
from mmalign.data.jsonl import read_jsonl
from mmalign.data.pickapic import read_pickapic_parquet, write_pickapic_parquet
from mmalign.data.records import PairRecord, check_ties
from mmalign.errors import UserError

READERS = {"pickapic": read_pickapic_parquet, "hf_disk": read_hf_disk, "jsonl": read_jsonl}

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
    "write_pickapic_parquet",
]


def read_pairs(
    format: str,
    path: str,
    *,
    ties: str = "drop",
    image_root: str | None = None,
    split: str | None = None,
) -> list[PairRecord]:
    """Read preference pairs in ``format``; ``image_root`` is for jsonl only, ``split`` for hf_disk only."""
    if format not in READERS:
        raise UserError(f"data.format must be one of {', '.join(READERS)}, got {format!r}")
    check_ties(ties)
    if image_root is not None and format != "jsonl":
        raise UserError(f"data.image_root applies to format jsonl only, got format {format!r}")
    if split is not None and format != "hf_disk":
        raise UserError(f"data.split applies to format hf_disk only, got format {format!r}")
    options: dict = {"ties": ties}
    if image_root is not None:
        options["image_root"] = image_root
    if split is not None:
        options["split"] = split
    records = READERS[format](path, **options)
    if not records:
        raise UserError(f"data.path: {path} holds no preference pairs (format {format}, ties={ties!r})")
    return records


class PairDataset(Dataset):
    """Records -> ``{"caption", "chosen" (3, R, R), "rejected" (3, R, R), "label", "index"}``, decoded per item."""

    def __init__(self, records: list[PairRecord], *, resolution: int) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            raise UserError(f"data.resolution must be a positive integer, got {resolution!r}")
        self.records = records
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        chosen = load_image(record.chosen, where=record.where("chosen"))
        rejected = load_image(record.rejected, where=record.where("rejected"))
        return {
            "caption": record.caption,
            "chosen": to_tensor(chosen, self.resolution),  # (3, R, R)
            "rejected": to_tensor(rejected, self.resolution),  # (3, R, R)
            "label": record.label,
            "index": index,
        }


def validate_images(records: list[PairRecord]) -> None:
    """Decode every image once so bad data fails before training; raises on the first unreadable one."""
    for record in records:
        load_image(record.chosen, where=record.where("chosen"))
        load_image(record.rejected, where=record.where("rejected"))


def collate_pairs(items: list[dict]) -> dict:
    """Stack :class:`PairDataset` items into a batch."""
    return {
        "captions": [item["caption"] for item in items],
        "chosen": torch.stack([item["chosen"] for item in items]),  # (B, 3, R, R)
        "rejected": torch.stack([item["rejected"] for item in items]),  # (B, 3, R, R)
        "label": torch.tensor([item["label"] for item in items], dtype=torch.float32),  # (B,)
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),  # (B,)
    }
