"""The canonical offline preference pair every text-to-image reader produces."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mmalign.errors import UserError

TIES = ("drop", "keep")


@dataclass(frozen=True)
class PairRecord:
    """One preference pair: a caption and two images, ``chosen`` preferred over ``rejected``.

    ``chosen`` / ``rejected`` hold encoded image bytes (parquet, HF datasets) or an absolute path to an image
    file that the reader has already checked (JSONL). ``label`` is 1.0 when ``chosen`` is preferred and 0.5
    for a tie (present only when ties are kept; a tie's order is the file's). ``row`` and ``source`` locate
    the pair in its file for error messages: a 0-based row index for tables, a 1-based line number for JSONL
    (``row_unit`` says which). ``chosen_column`` / ``rejected_column`` name the column or key each image came
    from, so an image that fails to decode later is reported where the user can find it.
    """

    caption: str
    chosen: bytes | str
    rejected: bytes | str
    label: float
    row: int
    source: str
    chosen_column: str = "jpg_0"
    rejected_column: str = "jpg_1"
    row_unit: str = "row"
    field_kind: str | None = None  # "key" or "column"; None: key for JSONL lines, column for table rows

    def where(self, side: str) -> str:
        """``"<source> row 17: column jpg_1"`` (or ``"line 3: key rejected"``) for ``side`` chosen/rejected."""
        column = self.chosen_column if side == "chosen" else self.rejected_column
        kind = self.field_kind or ("key" if self.row_unit == "line" else "column")
        return f"{self.source} {self.row_unit} {self.row}: {kind} {column}"


def check_ties(ties: str) -> None:
    """Raise unless ``ties`` is one of :data:`TIES`."""
    if ties not in TIES:
        raise UserError(f"data.ties must be one of {', '.join(repr(t) for t in TIES)}, got {ties!r}")


def path_inside(value: str, *, where: str, root: str, what: str = "image") -> str:
    """The absolute, symlink-resolved path of an existing file ``value`` relative to ``root``, which it must not
    escape: a shared dataset file cannot make training read arbitrary files."""
    resolved = os.path.realpath(os.path.join(root, value))
    if os.path.commonpath([root, resolved]) != root:
        raise UserError(
            f"{where}: path {value!r} escapes the dataset root {root} (paths must stay inside it)"
        )
    if not os.path.isfile(resolved):
        raise UserError(f"{where}: {what} {value!r} not found (looked for {resolved})")
    return resolved


def jsonl_root(path: str, image_root: str | None, *, what: str = "image") -> str:
    """The folder a JSONL file's ``what`` paths are relative to (``image_root``, default the file's folder),
    symlinks resolved, after checking that the file and the folder exist."""
    if not os.path.isfile(path):
        raise UserError(f"data.path: {path} does not exist (expected a JSONL file, one JSON object per line)")
    root = os.path.realpath(image_root if image_root is not None else os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(root):
        raise UserError(f"data.image_root: {image_root} is not a folder ({what} paths are relative to it)")
    return root


def json_line(text: str, *, where: str):
    """One JSONL line parsed; a line that is not JSON names its place and the column of the problem."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.pos + 1})") from None
