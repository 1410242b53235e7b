"""Pick-a-Pic v2 parquet: the offline preference data of Diffusion-DPO (arXiv 2311.12908).

Columns used: ``caption`` (string), ``jpg_0`` / ``jpg_1`` (encoded image bytes, or a struct with a ``bytes``
field as Hugging Face ``datasets`` writes an ``Image`` feature) and ``label_0``: 1 means jpg_0 was preferred,
0 means jpg_1 was (the pair is flipped so ``chosen`` is always the preferred image), 0.5 is a tie, dropped as
in the official training unless ``ties="keep"``. Other columns (uids, urls, model names) are never read.
"""

from __future__ import annotations

import glob
import os

import pyarrow as pa
import pyarrow.parquet as pq

from mmalign.data.records import PairRecord, check_ties
from mmalign.errors import UserError

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
LABEL_RULE = "1 (jpg_0 preferred), 0 (jpg_1 preferred) or 0.5 (tie)"
SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
    ]
)


def read_pickapic_parquet(path: str, *, ties: str = "drop") -> list[PairRecord]:
    """Read Pick-a-Pic-style pairs from a parquet file, a folder of ``*.parquet`` shards or a glob.

    A folder is read non-recursively, so point it at one split (or use a glob such as
    ``/x/data/train-*.parquet``). Records carry the shard path and the row index inside that shard.
    """
    check_ties(ties)
    records: list[PairRecord] = []
    for file in _parquet_files(path):
        records.extend(_read_parquet_file(file, ties))
    return records


def write_pickapic_parquet(path: str, rows: list[tuple[str, bytes, bytes, float]]) -> None:
    """Write ``(caption, jpg_0, jpg_1, label_0)`` rows with exactly the Pick-a-Pic v2 column types.

    The file appears atomically: it is written next to ``path`` and renamed into place.
    """
    for index, row in enumerate(rows):
        if row[3] not in (0, 0.5, 1):
            raise ValueError(f"row {index}: label_0 must be {LABEL_RULE}, got {row[3]!r}")
    columns = {name: [row[position] for row in rows] for position, name in enumerate(COLUMNS)}
    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = f"{path}.partial-{os.getpid()}"
    pq.write_table(table, partial, row_group_size=256)
    os.replace(partial, path)


def pickapic_pair(
    caption: object,
    image_0: object,
    image_1: object,
    label_0: object,
    *,
    row: int,
    source: str,
    ties: str,
) -> PairRecord | None:
    """Apply the Pick-a-Pic label rule to one row; ``None`` for a tie that is dropped."""
    where = f"{source} row {row}"
    if not isinstance(caption, str):
        raise UserError(f"{where}: column caption must be a string, got {caption!r}")
    if isinstance(label_0, bool) or label_0 not in (0, 0.5, 1):
        raise UserError(f"{where}: column label_0 is {label_0!r}; accepted: {LABEL_RULE}")
    if label_0 == 0.5 and ties == "drop":
        return None
    encoded_0 = image_cell(image_0, where=f"{where}: column jpg_0")
    encoded_1 = image_cell(image_1, where=f"{where}: column jpg_1")
    if label_0 == 0:
        return PairRecord(caption, encoded_1, encoded_0, 1.0, row, source, "jpg_1", "jpg_0")
    return PairRecord(caption, encoded_0, encoded_1, float(label_0), row, source, "jpg_0", "jpg_1")


def image_cell(value: object, *, where: str) -> bytes | str:
    """Encoded bytes from a binary cell or an HF ``{"bytes", "path"}`` struct (an absolute path if no bytes)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        image_path = value.get("path")
        if isinstance(image_path, str) and os.path.isabs(image_path) and os.path.isfile(image_path):
            return image_path
        raise UserError(
            f"{where} has no image bytes and its path {image_path!r} is not an existing absolute file "
            "(embed the images, e.g. with datasets' Image feature, or store absolute paths)"
        )
    raise UserError(f"{where} is {value!r}; needs encoded image bytes or a struct with a 'bytes' field")


def check_columns(source: str, present: list[str]) -> None:
    """Raise unless every Pick-a-Pic column is among ``present``."""
    missing = [name for name in COLUMNS if name not in present]
    if missing:
        raise UserError(
            f"data.path: {source} has no column {', '.join(repr(name) for name in missing)} "
            f"(columns: {', '.join(present)}; needs {', '.join(COLUMNS)})"
        )


def _parquet_files(path: str) -> list[str]:
    if any(char in path for char in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise UserError(f"data.path: no files match {path} (expected parquet shards)")
        return files
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), "*.parquet")))
        if not files:
            raise UserError(
                f"data.path: folder {path} holds no *.parquet files "
                "(pass a parquet file, a folder of parquet shards or a glob such as train-*.parquet)"
            )
        return files
    if not os.path.isfile(path):
        raise UserError(
            f"data.path: {path} does not exist (expected a parquet file, a folder of parquet shards or a glob)"
        )
    return [path]


def open_parquet(file: str) -> pq.ParquetFile:
    """``file`` opened for reading; one that is not parquet is a one-line error naming it."""
    try:
        return pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as err:
        raise UserError(
            f"data.path: {file} is not a readable parquet file ({' '.join(str(err).split())})"
        ) from None


def _read_parquet_file(file: str, ties: str) -> list[PairRecord]:
    parquet = open_parquet(file)
    schema = parquet.schema_arrow
    check_columns(file, schema.names)
    for name in COLUMNS:
        _check_type(file, name, schema.field(name).type)
    records = []
    row = 0
    for batch in parquet.iter_batches(columns=list(COLUMNS), batch_size=256):
        cells = [batch.column(name).to_pylist() for name in COLUMNS]
        for caption, image_0, image_1, label_0 in zip(*cells):
            record = pickapic_pair(caption, image_0, image_1, label_0, row=row, source=file, ties=ties)
            if record is not None:
                records.append(record)
            row += 1
    return records


def _is_bytes_type(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)


def _check_type(file: str, name: str, kind: pa.DataType) -> None:
    if name == "caption":
        accepted = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
        needs = "a string column"
    elif name == "label_0":
        accepted = pa.types.is_floating(kind) or pa.types.is_integer(kind)
        needs = f"a numeric column with values {LABEL_RULE}"
    else:
        accepted = _is_bytes_type(kind) or (
            pa.types.is_struct(kind)
            and kind.get_field_index("bytes") >= 0
            and _is_bytes_type(kind.field("bytes").type)
        )
        needs = "encoded image bytes (binary) or a struct with a binary 'bytes' field (HF Image feature)"
    if not accepted:
        raise UserError(f"data.path: {file} column {name} has type {kind}; needs {needs}")
