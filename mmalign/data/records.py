"""The canonical offline preference pair every text-to-image reader produces."""

from __future__ import annotations

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
