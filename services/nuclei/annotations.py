"""Annotated nucleus tiles as labs keep them: an index table, RGB images, instance
labels and binary masks.

The index is a CSV with the columns ``name, organ, image, instances, binary, mpp``
(the layout of ``../shared/realdata/*/index.csv``); paths are relative to the index's
folder, ``instances`` or ``binary`` may be empty (a row needs one of them). Instance
labels are 16-bit (or 8/32-bit) PNG or TIFF, 0 background; binary masks are any
single-channel image, non-zero for nucleus.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.errors import InvalidInput
from services.common.images import decode_rgb

#: Columns an index must have.
INDEX_COLUMNS = ("name", "image", "mpp")


@dataclass(frozen=True)
class IndexRow:
    """One annotated image of an index.

    Attributes:
        number: Row number in the file (1 = the first row after the header).
        name: The image's name.
        organ: Organ or tissue ('' when not given).
        image: Path of the RGB image.
        instances: Path of the instance labels, or None.
        binary: Path of the binary nucleus mask, or None.
        mpp: Resolution, µm/px.
    """

    number: int
    name: str
    organ: str
    image: Path
    instances: Path | None
    binary: Path | None
    mpp: float

    @property
    def where(self) -> str:
        return f"row {self.number} ({self.name!r})"


@dataclass(frozen=True)
class AnnotatedImage:
    """The pixels of one index row.

    Attributes:
        row: The row.
        rgb: uint8 (H, W, 3).
        instances: int32 (H, W) labels or None.
        binary: bool (H, W) mask or None (derived from ``instances`` when only they
            are given is the caller's choice).
    """

    row: IndexRow
    rgb: np.ndarray
    instances: np.ndarray | None
    binary: np.ndarray | None


def read_index(path: str | Path) -> list[IndexRow]:
    """The rows of an index CSV, checked for columns, values and files.

    Raises:
        InvalidInput: Not a readable CSV, a missing column, a bad mpp, a row without
            annotations or with a missing file (naming the row).
    """
    index = Path(path)
    if not index.is_file():
        raise InvalidInput(f"no index file {str(index)!r}")
    try:
        with open(index, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            fields = [name.strip() for name in reader.fieldnames or []]
            raw = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInput(f"{index.name} is not a readable CSV ({type(exc).__name__})") from None
    missing = [column for column in INDEX_COLUMNS if column not in fields]
    if missing:
        raise InvalidInput(
            f"{index.name} lacks the column(s) {', '.join(missing)} "
            "(need name, image, mpp and instances and/or binary)"
        )
    if not raw:
        raise InvalidInput(f"{index.name} has no rows")
    rows = []
    for number, record in enumerate(raw, start=1):
        values = {(k or "").strip(): (v or "").strip() for k, v in record.items()}
        name = values.get("name") or f"row {number}"
        where = f"{index.name} row {number} ({name!r})"
        try:
            mpp = float(values.get("mpp", ""))
        except ValueError:
            raise InvalidInput(f"{where}: mpp {values.get('mpp')!r} is not a number") from None
        if not math.isfinite(mpp) or not 0.05 <= mpp <= 2.0:
            raise InvalidInput(f"{where}: mpp {mpp} is outside 0.05-2.0 µm/px")
        paths: dict[str, Path | None] = {}
        for column in ("image", "instances", "binary"):
            text = values.get(column, "")
            if not text:
                paths[column] = None
                continue
            file = (index.parent / text).resolve()
            if not file.is_file():
                raise InvalidInput(f"{where}: the {column} file {text!r} does not exist")
            paths[column] = file
        if paths["image"] is None:
            raise InvalidInput(f"{where}: no image path")
        if paths["instances"] is None and paths["binary"] is None:
            raise InvalidInput(f"{where}: neither instances nor binary is given")
        rows.append(
            IndexRow(
                number,
                name,
                values.get("organ", ""),
                paths["image"],
                paths["instances"],
                paths["binary"],
                mpp,
            )
        )
    return rows


def read_rgb_file(path: Path, what: str | None = None) -> np.ndarray:
    """An RGB image file as uint8 (H, W, 3); grey or 16-bit images are refused."""
    return decode_rgb(Path(path).read_bytes(), what or f"image {Path(path).name!r}")


def read_label_image(path: Path, what: str | None = None) -> np.ndarray:
    """A single-channel label or mask image (PNG or TIFF, 8/16/32-bit) as an integer
    array.

    Raises:
        InvalidInput: Not readable, more than one channel, or not integer.
    """
    what = what or f"labels {Path(path).name!r}"
    suffix = Path(path).suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            array = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(image)
    except Exception as exc:  # the readers raise many types for corrupt files
        raise InvalidInput(f"{what} cannot be read ({type(exc).__name__})") from None
    if array.ndim == 3 and array.shape[2] in (3, 4):
        # An RGB(A) mask drawn by an annotation tool: any channel set means nucleus.
        if array.shape[2] == 4 or not (array[..., 0] == array[..., 1]).all():
            raise InvalidInput(f"{what} is a colour image: need one channel of labels")
        array = array[..., 0]
    if array.ndim != 2:
        raise InvalidInput(f"{what} has shape {array.shape}: need a 2-D label image")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInput(f"{what} has {array.dtype} values: need integer labels")
    if array.size and int(array.min()) < 0:
        raise InvalidInput(f"{what} has negative labels")
    return array


def load_annotated(row: IndexRow) -> AnnotatedImage:
    """The image, labels and mask of one row, all of the same size.

    Raises:
        InvalidInput: A file that is not what it should be or a size mismatch,
            naming the row.
    """
    try:
        rgb = read_rgb_file(row.image)
        instances = (
            read_label_image(row.instances).astype(np.int32) if row.instances is not None else None
        )
        binary = read_label_image(row.binary) > 0 if row.binary is not None else None
    except InvalidInput as exc:
        raise InvalidInput(f"{row.where}: {exc}") from None
    for what, array in (("instances", instances), ("binary", binary)):
        if array is not None and array.shape != rgb.shape[:2]:
            raise InvalidInput(
                f"{row.where}: {what} is {array.shape[1]}x{array.shape[0]} px but the image "
                f"is {rgb.shape[1]}x{rgb.shape[0]} px"
            )
    return AnnotatedImage(row, rgb, instances, binary)
