"""Preference pairs from a JSONL file plus a folder of images.

One JSON object per line: ``{"caption": "...", "chosen": "rel/a.png", "rejected": "rel/b.png"}`` with an
optional ``"label"``: 1.0 (chosen preferred, the default) or 0.5 (a tie). Image paths are relative to
``image_root`` (default: the JSONL file's folder) and must resolve inside it, symlinks included, so a shared
dataset file cannot make training read arbitrary files. Blank lines are skipped; other keys are ignored.
"""

from __future__ import annotations

from mmalign.data.records import PairRecord, check_ties, json_line, jsonl_root, path_inside
from mmalign.errors import UserError

KEYS = ("caption", "chosen", "rejected")
LABELS = "1.0 (chosen preferred) or 0.5 (tie)"


def read_jsonl(path: str, *, image_root: str | None = None, ties: str = "drop") -> list[PairRecord]:
    """Read pairs; ``row`` of each record is its 1-based line number, images are checked to exist."""
    check_ties(ties)
    root = jsonl_root(path, image_root)
    records = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{path} line {number}: not UTF-8 text ({err.reason} at byte {err.start})"
                ) from None
            if not text.strip():
                continue
            record = _parse_line(
                text, where=f"{path} line {number}", row=number, source=path, root=root, ties=ties
            )
            if record is not None:
                records.append(record)
    return records


def _parse_line(text: str, *, where: str, row: int, source: str, root: str, ties: str) -> PairRecord | None:
    entry = json_line(text, where=where)
    if not isinstance(entry, dict):
        raise UserError(
            f"{where}: expected a JSON object with keys {', '.join(KEYS)}, got {type(entry).__name__}"
        )
    for key in KEYS:
        if key not in entry:
            raise UserError(f"{where}: missing key {key!r} (needs {', '.join(KEYS)}; optional label)")
        if not isinstance(entry[key], str):
            raise UserError(f"{where}: key {key} must be a string, got {entry[key]!r}")
    label = entry.get("label", 1.0)
    if isinstance(label, bool) or label not in (1, 0.5):
        raise UserError(f"{where}: key label is {label!r}; accepted: {LABELS}")
    if label == 0.5 and ties == "drop":
        return None
    chosen = path_inside(entry["chosen"], where=f"{where}: key chosen", root=root)
    rejected = path_inside(entry["rejected"], where=f"{where}: key rejected", root=root)
    return PairRecord(
        entry["caption"], chosen, rejected, float(label), row, source, "chosen", "rejected", "line"
    )
