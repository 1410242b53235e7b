"""Preference pairs from a Hugging Face dataset saved with ``save_to_disk`` (Pick-a-Pic columns and rules)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mmalign.data.pickapic import COLUMNS, LABEL_RULE, check_columns, pickapic_pair
from mmalign.data.records import PairRecord, check_ties
from mmalign.errors import UserError

if TYPE_CHECKING:
    import datasets

_STRINGS = ("string", "large_string")
_BYTES = ("binary", "large_binary")


def read_hf_disk(path: str, *, ties: str = "drop", split: str = "train") -> list[PairRecord]:
    """Read ``caption, jpg_0, jpg_1, label_0`` from ``datasets.load_from_disk(path)``.

    A ``DatasetDict`` is read at ``split``. Image columns may be ``datasets.Image`` features (read undecoded,
    as their stored bytes) or plain binary columns; the label rule is Pick-a-Pic's (see ``pickapic.py``).
    """
    # Imported here: only this format needs `datasets`, an optional extra (about a second to import).
    try:
        import datasets
    except ImportError:
        raise UserError(
            "data.format: 'hf_disk' needs the `datasets` package: pip install 'mmalign[datasets]'"
        ) from None

    check_ties(ties)
    if not os.path.isdir(path):
        raise UserError(f"data.path: {path} is not a folder (expected a dataset written by save_to_disk)")
    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise UserError(
            f"data.path: {path} is not a dataset written by save_to_disk "
            "(needs dataset_info.json and state.json, or dataset_dict.json for a DatasetDict)"
        ) from None
    source = path
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"data.split: {path} has no split {split!r} (splits: {', '.join(loaded)})")
        loaded = loaded[split]
        source = f"{path} split {split}"
    check_columns(source, loaded.column_names)
    dataset = _undecoded(loaded.select_columns(list(COLUMNS)), source)
    records = []
    row = 0
    for batch in dataset.iter(batch_size=256):
        for caption, image_0, image_1, label_0 in zip(*(batch[name] for name in COLUMNS)):
            record = pickapic_pair(caption, image_0, image_1, label_0, row=row, source=source, ties=ties)
            if record is not None:
                records.append(record)
            row += 1
    return records


def _undecoded(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """Check the column features and switch Image features to ``{"bytes", "path"}`` dicts."""
    import datasets

    features = dataset.features
    if not (isinstance(features["caption"], datasets.Value) and features["caption"].dtype in _STRINGS):
        raise UserError(
            f"data.path: {source} column caption has feature {features['caption']}; needs a string"
        )
    label = features["label_0"]
    if not (isinstance(label, datasets.Value) and label.dtype.startswith(("float", "int", "uint"))):
        raise UserError(f"data.path: {source} column label_0 has feature {label}; needs numbers {LABEL_RULE}")
    for name in ("jpg_0", "jpg_1"):
        feature = features[name]
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif not (isinstance(feature, datasets.Value) and feature.dtype in _BYTES):
            raise UserError(
                f"data.path: {source} column {name} has feature {feature}; needs datasets.Image or binary bytes"
            )
    return dataset
