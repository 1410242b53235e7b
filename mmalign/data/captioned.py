"""Captioned images without preference pairs: the data of TPO (TDPO, TKTO) and of KTO on unpaired feedback.

Two layouts, one record:

- ``captions_parquet``: a parquet file, a folder of shards or a glob, with a string column ``caption`` and an
  ``image`` column of encoded bytes (or an HF ``Image`` struct with ``bytes``);
- ``captions_jsonl``: one JSON object per line, ``{"caption": "...", "image": "rel/a.png"}``, the image path
  relative to ``data.image_root`` (default: the file's folder) and never escaping it.

Optional fields, read when present: a label (``data.label_column``, default ``label``: true / false or 1 / 0,
thumbs-up / thumbs-down — required by recipe ``kto``), and a precomputed mismatched caption
``perturbed_caption`` with its ``tpo_family`` (written by ``mmalign pairs tpo``; read with
``tpo.perturber: column``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmalign.data.images import load_image, to_tensor
from mmalign.data.pickapic import _is_bytes_type, _parquet_files, image_cell, open_parquet
from mmalign.data.records import json_line, jsonl_root, path_inside
from mmalign.data.video import load_video
from mmalign.errors import UserError

FORMATS = ("captions_parquet", "captions_jsonl")
LABEL_RULE = "true / false or 1 / 0 (1: desirable, 0: undesirable)"
PERTURBED = "perturbed_caption"
FAMILY = "tpo_family"


@dataclass(frozen=True)
class CaptionedRecord:
    """One captioned image; ``row`` is a 0-based table row or a 1-based JSONL line (``row_unit``)."""

    caption: str
    image: bytes | str  # encoded bytes, or an absolute path the reader checked
    row: int
    source: str
    row_unit: str = "row"
    label: bool | None = None
    perturbed: str | None = None
    family: str | None = None

    def where(self, field: str = "image") -> str:
        kind = "key" if self.row_unit == "line" else "column"
        return f"{self.source} {self.row_unit} {self.row}: {kind} {field}"


def read_captioned(
    format: str,
    path: str,
    *,
    image_root: str | None = None,
    label_column: str = "label",
    require_label: bool = False,
) -> list[CaptionedRecord]:
    """Read captioned images in ``format`` (:data:`FORMATS`); ``require_label``: every row needs a label."""
    if format == "captions_parquet":
        if image_root is not None:
            raise UserError("data.image_root applies to format captions_jsonl, not captions_parquet")
        records = []
        for file in _parquet_files(path):
            records.extend(_read_parquet_file(file, label_column, require_label))
    elif format == "captions_jsonl":
        records = _read_jsonl(path, image_root, label_column, require_label)
    else:
        raise UserError(f"data.format must be one of {', '.join(FORMATS)} here, got {format!r}")
    if not records:
        raise UserError(f"data.path: {path} holds no captioned images (format {format})")
    return records


def write_captioned_parquet(
    path: str, records: list[CaptionedRecord], *, label_column: str = "label"
) -> None:
    """Write ``records`` (images as bytes) as captions parquet; the optional columns only when some record
    has them. The file appears atomically (written beside ``path``, then renamed)."""
    columns: dict[str, list] = {
        "caption": [r.caption for r in records],
        "image": [r.image if isinstance(r.image, bytes) else Path(r.image).read_bytes() for r in records],
    }
    fields = [("caption", pa.string()), ("image", pa.binary())]
    if any(r.label is not None for r in records):
        columns[label_column] = [r.label for r in records]
        fields.append((label_column, pa.bool_()))
    if any(r.perturbed is not None for r in records):
        columns[PERTURBED] = [r.perturbed for r in records]
        columns[FAMILY] = [r.family for r in records]
        fields += [(PERTURBED, pa.string()), (FAMILY, pa.string())]
    table = pa.Table.from_pydict(columns, schema=pa.schema(fields))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial-{os.getpid()}"
    pq.write_table(table, partial, row_group_size=256)
    os.replace(partial, path)


def parse_label(value: object, *, where: str) -> bool:
    """A thumbs-up / thumbs-down label: bool, or the numbers 0 / 1 (also as floats)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise UserError(f"{where} is {value!r}; accepted: {LABEL_RULE}")


# ------------------------------------------------------------------------------------------------ readers


def _read_parquet_file(file: str, label_column: str, require_label: bool) -> list[CaptionedRecord]:
    parquet = open_parquet(file)
    schema = parquet.schema_arrow
    wanted = ["caption", "image"] + ([label_column] if require_label else [])
    missing = [name for name in wanted if name not in schema.names]
    if missing:
        raise UserError(
            f"data.path: {file} has no column {', '.join(repr(m) for m in missing)} (columns: "
            f"{', '.join(schema.names)}; captioned images need caption and image"
            + (f", and the label column {label_column!r} (data.label_column)" if require_label else "")
            + ")"
        )
    kind = schema.field("image").type
    if not (_is_bytes_type(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
        raise UserError(
            f"data.path: {file} column image has type {kind}; needs encoded image bytes (binary) or a struct "
            "with a binary 'bytes' field (HF Image feature)"
        )
    optional = [name for name in (label_column, PERTURBED, FAMILY) if name in schema.names]
    records, row = [], 0
    for batch in parquet.iter_batches(columns=["caption", "image", *optional], batch_size=256):
        cells = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        for offset in range(batch.num_rows):
            values = {name: column[offset] for name, column in cells.items()}
            records.append(
                _record(
                    values,
                    row=row,
                    source=file,
                    unit="row",
                    label_column=label_column,
                    require_label=require_label,
                    image=image_cell(values["image"], where=f"{file} row {row}: column image"),
                )
            )
            row += 1
    return records


def _read_jsonl(
    path: str, image_root: str | None, label_column: str, require_label: bool
) -> list[CaptionedRecord]:
    root = jsonl_root(path, image_root)
    records = []
    with open(path, encoding="utf-8", errors="strict") as handle:
        try:
            lines = list(enumerate(handle, start=1))
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, text in lines:
        if not text.strip():
            continue
        where = f"{path} line {number}"
        entry = json_line(text, where=where)
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise UserError(f"{where}: expected a JSON object with keys caption and image (a path)")
        image = path_inside(entry["image"], where=f"{where}: key image", root=root)
        records.append(
            _record(
                entry,
                row=number,
                source=path,
                unit="line",
                label_column=label_column,
                require_label=require_label,
                image=image,
            )
        )
    return records


def _record(
    values: dict,
    *,
    row: int,
    source: str,
    unit: str,
    label_column: str,
    require_label: bool,
    image: bytes | str,
) -> CaptionedRecord:
    where, kind = f"{source} {unit} {row}", "key" if unit == "line" else "column"
    caption = values.get("caption")
    if not isinstance(caption, str):
        raise UserError(f"{where}: {kind} caption must be a string, got {caption!r}")
    label = values.get(label_column)
    if label is None and require_label:
        raise UserError(f"{where}: {kind} {label_column} is missing; accepted: {LABEL_RULE}")
    if label is not None:
        label = parse_label(label, where=f"{where}: {kind} {label_column}")
    perturbed = values.get(PERTURBED)
    if perturbed is not None and not isinstance(perturbed, str):
        raise UserError(f"{where}: {kind} {PERTURBED} must be a string, got {perturbed!r}")
    return CaptionedRecord(caption, image, row, source, unit, label, perturbed, values.get(FAMILY))


def load_media(
    record: CaptionedRecord, *, resolution: int, num_frames: int | None = None, frame_stride: int = 1
):
    """The record's image (3, R, R) — or clip (3, F, R, R) when ``num_frames`` is given — in [-1, 1].

    Clips are read from files (``captions_jsonl``); images from files or from bytes."""
    if num_frames is None:
        return to_tensor(load_image(record.image, where=record.where()), resolution)
    return load_video(
        record.image,
        num_frames=num_frames,
        resolution=resolution,
        frame_stride=frame_stride,
        where=record.where(),
    )
