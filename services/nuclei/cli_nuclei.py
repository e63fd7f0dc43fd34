"""``histomarker nuclei IMAGE``: the nuclei of one image and its 75 features.

Reads a PNG, JPEG or TIFF patch, segments its nuclei at the given resolution and
measures them with the same logic the NucleiService runs; with ``--labels OUT.tif``
the instance labels are written as an unsigned 16-bit TIFF (32-bit when there are
65536 nuclei or more), atomically.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from services.common.errors import InvalidInput, NotFound
from services.nuclei.pipeline import analyze_patch, decode_image, encode_labels_tiff, labels_dtype
from services.nuclei.segment import DEFAULT_METHOD, SegmentationParams

#: Features shown by the readable summary (all 75 are in ``--json``).
SUMMARY_FEATURES = ("morph.area.mean", "morph.circularity.mean", "spatial.degree.mean")
_TIFF_SUFFIXES = (".tif", ".tiff")


def write_labels(path: str | os.PathLike[str], data: bytes) -> None:
    """Write an encoded label TIFF atomically (a hidden temp file beside it, then a
    rename).

    Raises:
        InvalidInput: Not a .tif/.tiff path, or its folder does not exist.
    """
    target = Path(path)
    if target.suffix.lower() not in _TIFF_SUFFIXES:
        raise InvalidInput(f"--labels must name a .tif or .tiff file, got {target.name!r}")
    if not target.parent.is_dir():
        raise InvalidInput(f"the --labels folder {str(target.parent)!r} does not exist")
    if target.is_dir():
        raise InvalidInput(f"--labels {str(target)!r} is a folder")
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def run_nuclei(args: argparse.Namespace) -> dict[str, Any]:
    """Run the CLI's nuclei segmentation and return its JSON-able summary.

    With ``--json``: ``{"nuclei": count, "few_nuclei": bool, "mpp": µm/px,
    "features": {name: value}}`` (the 75 features), plus ``labels`` (the path) and
    ``labels_dtype`` (``uint16`` or ``uint32``) with ``--labels``. Without ``--json``
    a few features stand in for the 75.
    """
    if args.labels and Path(args.labels).suffix.lower() not in _TIFF_SUFFIXES:
        raise InvalidInput(f"--labels must name a .tif or .tiff file, got {args.labels!r}")
    mpp = float(args.mpp)
    if not math.isfinite(mpp) or mpp <= 0:
        raise InvalidInput(f"--mpp must be a positive number of µm/px, got {args.mpp}")
    if not Path(args.image).is_file():
        raise NotFound(f"no image file {args.image!r}")
    image = Path(args.image)
    params = SegmentationParams(method=getattr(args, "method", None) or DEFAULT_METHOD)
    analysis = analyze_patch(decode_image(image.read_bytes(), image.name), mpp, params)
    features = analysis.features
    result: dict[str, Any] = {
        "nuclei": features.nucleus_count,
        "few_nuclei": features.few_nuclei,
        "mpp": mpp,
        "method": params.method,
    }
    if args.labels:
        write_labels(args.labels, encode_labels_tiff(analysis.labels, mpp))
        result["labels"] = str(args.labels)
        result["labels_dtype"] = labels_dtype(analysis.labels).__name__
    values = features.as_dict()
    if getattr(args, "json", False):
        result["features"] = values
    else:
        result.update({name: round(values[name], 4) for name in SUMMARY_FEATURES})
    return result
