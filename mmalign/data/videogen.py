"""Text-to-video preference pairs from a VideoGen-RewardBench-style CSV plus a folder of videos.

Columns used: ``path_A`` / ``path_B`` (video paths relative to ``video_root``, default: the CSV's folder),
``prompt``, and the preference columns the caller picks; in the benchmark (VideoAlign, arXiv 2501.13918)
those are ``VQ`` (visual quality), ``MQ`` (motion quality) and ``TA`` (text alignment), each cell ``A``, ``B``
or ``same`` (any case). One ``dimension`` uses that column alone; ``weights`` mixes several:
``score = sum_k w_k * (+1 if A, -1 if B, 0 if same)``; score > 0 means A was preferred, < 0 B, and 0 a tie
(dropped unless ``ties="keep"``, then label 0.5 in the file's order). A score within ``1e-9 * sum_k |w_k|`` of
zero counts as 0, so weights such as 0.1, 0.2, 0.3 tie on A, A, B as they do on paper. Video paths must
resolve inside the root, symlinks included, as for JSONL images. Other columns are never read, and rows
that are dropped as ties are not checked for their videos.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from typing import BinaryIO

from mmalign.data.records import PairRecord, check_ties, path_inside
from mmalign.errors import UserError

COLUMNS = ("path_A", "path_B", "prompt")
VOTES = {"a": 1, "b": -1, "same": 0}
ACCEPTED = "A, B or same (any case)"


def read_videogen_csv(
    path: str,
    *,
    video_root: str | None,
    dimension: str | None = None,
    weights: dict[str, float] | None = None,
    ties: str = "drop",
) -> list[PairRecord]:
    """Read pairs; ``row`` of each record is its 1-based CSV line, and both videos are checked to exist."""
    check_ties(ties)
    key = "data.dimension" if dimension is not None else "data.weights"
    weights = _weights(dimension, weights)
    if not os.path.isfile(path):
        raise UserError(
            f"data.path: {path} does not exist (expected a CSV file with columns path_A, path_B, prompt)"
        )
    root = os.path.realpath(video_root if video_root is not None else os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(root):
        raise UserError(f"data.image_root: {video_root} is not a folder (video paths are relative to it)")
    records = []
    for line, cells in _rows(path, weights, key=key):
        record = _pair(cells, weights, line=line, source=path, root=root, ties=ties)
        if record is not None:
            records.append(record)
    return records


def _weights(dimension: str | None, weights: dict[str, float] | None) -> dict[str, float]:
    """One preference column (weight 1) or a checked ``{column: weight}`` mix; exactly one must be given."""
    if (dimension is None) == (weights is None):
        raise UserError(
            "give exactly one of data.dimension (one preference column, e.g. 'VQ') "
            "or data.weights (e.g. {VQ: 1, MQ: 1, TA: 1}), "
            f"got dimension={dimension!r} and weights={weights!r}"
        )
    if dimension is not None:
        return {dimension: 1.0}
    if not isinstance(weights, dict) or not weights:
        raise UserError(f"data.weights must map preference columns to numbers, got {weights!r}")
    for key, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UserError(f"data.weights.{key} must be a finite number, got {weight!r}")
    return {key: float(weight) for key, weight in weights.items()}


def _rows(path: str, weights: dict[str, float], *, key: str) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line, {column: cell})`` per data row after checking the header; blank lines are skipped."""
    with open(path, "rb") as handle:
        reader = csv.reader(_text_lines(path, handle))
        try:
            header = next(reader)
        except StopIteration:
            raise UserError(
                f"data.path: {path} is empty (expected a header row with path_A, path_B, prompt)"
            ) from None
        _check_header(path, header, weights, key=key)
        while True:
            line = reader.line_num + 1  # the record's first line, also when a quoted prompt spans several
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise UserError(f"{path} line {line}: not valid CSV ({err})") from None
            if not cells:
                continue
            if len(cells) != len(header):
                raise UserError(
                    f"{path} line {line}: has {len(cells)} fields, the header has {len(header)} "
                    f"({', '.join(header)})"
                )
            yield line, dict(zip(header, cells))


def _text_lines(path: str, handle: BinaryIO) -> Iterator[str]:
    """Decode line by line so a bad byte is reported on its own line; a leading BOM (Excel) is skipped."""
    for number, raw in enumerate(handle, start=1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"{path} line {number}: not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None


def _check_header(path: str, header: list[str], weights: dict[str, float], *, key: str) -> None:
    """Required columns present, no column named twice, every weighted preference column present."""
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        raise UserError(
            f"data.path: {path} has no column {', '.join(repr(name) for name in missing)} "
            f"(columns: {', '.join(header)}; needs {', '.join(COLUMNS)} and preference columns)"
        )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise UserError(
            f"data.path: {path} names column {', '.join(repr(n) for n in repeated)} more than once"
        )
    for name in weights:
        if name not in header:
            raise UserError(f"{key}: {path} has no column {name!r} (columns: {', '.join(header)})")


def _pair(
    cells: dict[str, str], weights: dict[str, float], *, line: int, source: str, root: str, ties: str
) -> PairRecord | None:
    """Score one row and orient it so ``chosen`` is the preferred video; ``None`` for a dropped tie."""
    where = f"{source} line {line}"
    score = 0.0
    for name, weight in weights.items():
        vote = VOTES.get(cells[name].lower())
        if vote is None:
            raise UserError(f"{where}: column {name} is {cells[name]!r}; accepted: {ACCEPTED}")
        score += weight * vote
    tie = abs(score) <= 1e-9 * sum(abs(weight) for weight in weights.values())
    if tie and ties == "drop":
        return None
    video_a = path_inside(cells["path_A"], where=f"{where}: column path_A", root=root, what="video")
    video_b = path_inside(cells["path_B"], where=f"{where}: column path_B", root=root, what="video")
    label = 0.5 if tie else 1.0
    if score < 0 and not tie:
        return PairRecord(
            cells["prompt"], video_b, video_a, label, line, source, "path_B", "path_A", "line", "column"
        )
    return PairRecord(
        cells["prompt"], video_a, video_b, label, line, source, "path_A", "path_B", "line", "column"
    )
