"""The cohort manifest: one row per slide, with the patient's labels.

Both the synthetic generator and the TCGA importer write this table, and the
training flow reads it. It is a UTF-8 CSV (comma-separated, ``\\n`` line ends) whose
first columns are :data:`MANIFEST_COLUMNS`, in that order:

``slide_id``
    Unique name of the slide; also its name in the object store
    (``slides/{slide_id}.svs``), so it must be usable as one key segment: not empty,
    no ``/`` or ``\\``, no control characters, not ``.`` or ``..``.
``patient_id``
    The patient; labels belong to patients. Not empty.
``kind``
    ``cancer`` or ``normal`` (lower case).
``site``
    Where the slide was made (for TCGA the tissue source site code, e.g. ``A1``): it
    stands for the lab and scanner, so that splits can keep sites apart. May be empty.
``split``
    Free text, usually empty: the training flow decides the split.
``tp53``, ``pik3ca``, ``er``, ``pr``, ``her2``, ``basal``
    :data:`BIOMARKERS`: ``1``, ``0`` or empty. Empty means unknown: that slide is
    left out of that biomarker only.
``immune_score``
    A number, or empty.
``slide_path``
    The slide file. Either absolute, or relative to the folder that holds the
    manifest (with ``/`` separators); :meth:`Manifest.slide_file` resolves either.

Any further columns (e.g. a synthetic cohort's ground-truth paths) follow the
required ones, are kept as text and are written back unchanged.

Reading is strict: a missing or repeated column, a bad kind or label, or a repeated
``slide_id`` raises :class:`~services.common.errors.InvalidInput` naming the file,
the line and the value. The required columns may come in any order in a file that
is read; a written manifest always has them in the order above. Writing is atomic:
a temporary file beside the target is replaced into place, so a reader never sees a
half-written manifest.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from services.common.errors import AlreadyExists, InvalidInput, NotFound
from services.common.vocabulary import BIOMARKERS

#: Required columns, in the order a written manifest has them.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "slide_id",
    "patient_id",
    "kind",
    "site",
    "split",
    *BIOMARKERS,
    "immune_score",
    "slide_path",
)
#: Values of the ``kind`` column.
KINDS: tuple[str, ...] = ("cancer", "normal")

_TEXT_COLUMNS = ("slide_id", "patient_id", "kind", "site", "split", "slide_path")
_NON_EMPTY_COLUMNS = ("slide_id", "patient_id", "kind", "slide_path")
_LABEL_DTYPE = "Int8"
_SCORE_DTYPE = "Float64"


@dataclass(frozen=True, eq=False)
class Manifest:
    """A validated manifest table and the folder its relative slide paths start from.

    Build one with :meth:`read` or :meth:`from_frame`, never directly, so that the
    table is always validated and typed: text columns are ``str`` (empty, never
    missing), label columns nullable ``Int8`` (``<NA>`` = unknown), ``immune_score``
    nullable ``Float64``, extra columns ``str``.

    Attributes:
        table: One row per slide; the required columns first, then any extras.
        root: Folder that relative ``slide_path`` values are resolved against (the
            manifest's folder), or None when unknown.
    """

    table: pd.DataFrame
    root: Path | None = field(default=None)

    @classmethod
    def from_frame(
        cls, frame: pd.DataFrame, *, root: str | os.PathLike[str] | None = None
    ) -> Manifest:
        """Validate a table built in memory and return it as a manifest.

        Labels may be given as numbers (``1``, ``0``, ``1.0``, ``True``), as the
        strings ``"1"``/``"0"``, or as missing (``None``, NaN, ``<NA>``, ``""``).

        Args:
            frame: The rows; must have every column of :data:`MANIFEST_COLUMNS`.
            root: Folder relative slide paths are resolved against.

        Returns:
            The validated manifest (a typed copy; ``frame`` is not changed).

        Raises:
            InvalidInput: A column is missing or repeated, or a value is invalid; the
                message names the row (0-based position) and the column.
        """
        header = [str(name) for name in frame.columns]
        rows = [
            [_cell_text(value, column) for value, column in zip(values, header, strict=True)]
            for values in frame.itertuples(index=False, name=None)
        ]
        table = _validate(header, rows, where="table", locate=lambda i: f"table row {i}")
        return cls(table, Path(root) if root is not None else None)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read and validate a manifest file.

        Args:
            path: The CSV file.

        Returns:
            The manifest, with :attr:`root` set to the file's folder.

        Raises:
            NotFound: No such file.
            InvalidInput: Unreadable, empty, or invalid; the message names the file,
                the line and what is wrong.
        """
        source = Path(path)
        if not source.exists():
            raise NotFound(f"manifest {source} does not exist")
        if source.is_dir():
            raise InvalidInput(f"manifest {source} is a folder, not a CSV file")
        try:
            with open(source, encoding="utf-8-sig", newline="") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                body: list[list[str]] = []
                lines: list[int] = []
                for row in reader:
                    if not row:  # a blank line
                        continue
                    body.append(row)
                    lines.append(reader.line_num)
        except UnicodeDecodeError:
            raise InvalidInput(f"{source}: not UTF-8 text; is it really a manifest CSV?") from None
        except csv.Error as exc:
            raise InvalidInput(f"{source}: malformed CSV: {exc}") from None
        except OSError as exc:
            raise InvalidInput(f"{source}: cannot read: {exc.strerror or exc}") from None
        if header is None:
            raise InvalidInput(f"{source}: empty file, expected a header row")
        table = _validate(
            header, body, where=str(source), locate=lambda i: f"{source} line {lines[i]}"
        )
        return cls(table, Path(os.path.abspath(source)).parent)

    @property
    def extra_columns(self) -> tuple[str, ...]:
        """The columns after the required ones (e.g. ground-truth paths)."""
        return tuple(self.table.columns[len(MANIFEST_COLUMNS) :])

    def labelled(self, biomarker: str) -> pd.DataFrame:
        """The cancer slides whose ``biomarker`` label is known.

        Args:
            biomarker: One of :data:`BIOMARKERS`.

        Returns:
            Those rows of :attr:`table` (a copy).

        Raises:
            InvalidInput: Unknown biomarker name.
        """
        if biomarker not in BIOMARKERS:
            raise InvalidInput(
                f"unknown biomarker {biomarker!r}; expected one of {', '.join(BIOMARKERS)}"
            )
        keep = (self.table["kind"] == "cancer") & self.table[biomarker].notna()
        return self.table[keep].copy()

    def slide_file(self, slide_path: str) -> Path:
        """Resolve a ``slide_path`` value of this manifest to a file path.

        Args:
            slide_path: A value of the ``slide_path`` column.

        Returns:
            The path itself if absolute, else the path under :attr:`root` (or under
            the current directory if :attr:`root` is None).
        """
        path = Path(slide_path)
        if path.is_absolute() or self.root is None:
            return path
        return self.root / path

    def write(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the manifest atomically.

        The rows go to a hidden temporary file beside ``path``, which is flushed,
        synced and then moved into place with ``os.replace``. Missing parent folders
        are created. Slide paths are written as they are: relative ones stay
        relative to whichever folder the caller meant (see :func:`slide_path_text`).

        Args:
            path: Destination CSV file.
            overwrite: Replace an existing file instead of refusing.

        Returns:
            The destination path.

        Raises:
            AlreadyExists: ``path`` exists and ``overwrite`` is False.
            InvalidInput: ``path`` is a folder, or cannot be written.
        """
        destination = Path(path)
        if destination.is_dir():
            raise InvalidInput(f"{destination} is a folder; give the manifest's file name")
        if destination.exists() and not overwrite:
            raise AlreadyExists(f"{destination} exists already; pass overwrite to replace it")
        partial = destination.with_name(f".{destination.name[:64]}.{uuid.uuid4().hex}.part")
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "w", encoding="utf-8", newline="") as out:
                writer = csv.writer(out, lineterminator="\n")
                writer.writerow(list(self.table.columns))
                for values in self.table.itertuples(index=False, name=None):
                    writer.writerow(
                        [
                            _cell_text(value, column)
                            for value, column in zip(values, self.table.columns, strict=True)
                        ]
                    )
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, destination)
        except OSError as exc:
            raise InvalidInput(f"cannot write {destination}: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        return destination


def slide_path_text(slide: str | os.PathLike[str], manifest_dir: str | os.PathLike[str]) -> str:
    """The ``slide_path`` value to store for a slide file.

    Rule: relative to the manifest's folder (with ``/`` separators) when the slide
    lies inside that folder, so a cohort folder can be moved as a whole; absolute
    otherwise, so a manifest kept elsewhere still finds its slides.

    Args:
        slide: The slide file.
        manifest_dir: Folder that will hold the manifest.

    Returns:
        The text for the ``slide_path`` column.
    """
    slide_abs = Path(os.path.abspath(slide))
    root = Path(os.path.abspath(manifest_dir))
    if slide_abs.is_relative_to(root):
        return PurePosixPath(*slide_abs.relative_to(root).parts).as_posix()
    return str(slide_abs)


def _cell_text(value: Any, column: str) -> str:
    """One cell as the text a manifest file holds."""
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if column in BIOMARKERS:
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, int | float) or hasattr(value, "dtype"):
            number = float(value)
            if number in (0.0, 1.0):
                return str(int(number))
        return str(value)
    if column == "immune_score" and not isinstance(value, str):
        return repr(float(value))
    return str(value)


def _validate(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    where: str,
    locate: Callable[[int], str],
) -> pd.DataFrame:
    """Check textual rows against the manifest rules and return the typed table."""
    names = [name.strip() for name in header]
    seen: dict[str, int] = {}
    for position, name in enumerate(names):
        if not name:
            raise InvalidInput(f"{where}: column {position + 1} has no name")
        if name in seen:
            raise InvalidInput(
                f"{where}: column {name!r} appears twice (columns {seen[name] + 1} "
                f"and {position + 1})"
            )
        seen[name] = position
    missing = [name for name in MANIFEST_COLUMNS if name not in seen]
    if missing:
        raise InvalidInput(f"{where}: missing manifest column(s): {', '.join(missing)}")
    extras = [name for name in names if name not in MANIFEST_COLUMNS]
    order = [*MANIFEST_COLUMNS, *extras]
    index = [seen[name] for name in order]

    columns: dict[str, list[str]] = {name: [] for name in order}
    slide_rows: dict[str, int] = {}
    for number, row in enumerate(rows):
        if len(row) != len(names):
            raise InvalidInput(f"{locate(number)}: {len(row)} fields, the header has {len(names)}")
        cells = {name: row[position].strip() for name, position in zip(order, index, strict=True)}
        _check_row(cells, locate(number))
        slide_id = cells["slide_id"]
        if slide_id in slide_rows:
            raise InvalidInput(
                f"{locate(number)}: slide_id {slide_id!r} repeats {locate(slide_rows[slide_id])}"
            )
        slide_rows[slide_id] = number
        for name in order:
            columns[name].append(cells[name])

    table = pd.DataFrame({name: pd.Series(columns[name], dtype="str") for name in order})
    for name in BIOMARKERS:
        table[name] = pd.array(
            [int(value) if value else None for value in columns[name]], dtype=_LABEL_DTYPE
        )
    table["immune_score"] = pd.array(
        [float(value) if value else None for value in columns["immune_score"]],
        dtype=_SCORE_DTYPE,
    )
    return table


def _check_row(cells: dict[str, str], where: str) -> None:
    for name in _NON_EMPTY_COLUMNS:
        if not cells[name]:
            raise InvalidInput(f"{where}: {name} is empty")
    slide_id = cells["slide_id"]
    if (
        slide_id in (".", "..")
        or "/" in slide_id
        or "\\" in slide_id
        or any(ord(char) < 32 or 127 <= ord(char) < 160 for char in slide_id)
    ):
        raise InvalidInput(
            f"{where}: slide_id {slide_id!r} cannot name an object (no '/', '\\', "
            "control characters, '.' or '..')"
        )
    if cells["kind"] not in KINDS:
        raise InvalidInput(f"{where}: kind {cells['kind']!r} is not one of {', '.join(KINDS)}")
    for name in BIOMARKERS:
        if cells[name] not in ("", "0", "1"):
            raise InvalidInput(
                f"{where}: {name} label {cells[name]!r} must be 1, 0 or empty (unknown)"
            )
    score = cells["immune_score"]
    if score:
        try:
            number = float(score)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise InvalidInput(f"{where}: immune_score {score!r} must be a finite number or empty")
