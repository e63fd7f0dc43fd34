"""Slide quality control: the tissue and artifact masks of a slide or image, a verdict,
and files a person can open (``histomarker qc``).

For a whole-slide image the masks are those tiling and prediction compute (the level
nearest ``PrepParams.mask_downsample``); a plain image (a thumbnail or a crop, whose
resolution the caller gives) is used as it is. :func:`write_report` writes:

- ``thumbnail.png``: the image the masks were computed on;
- ``masks/{tissue,usable,pen_green,pen_blue,pen_black,pen_red,pen_other,blur,fold,
  edge}.png``: one 8-bit mask per class (255 = set), all of the thumbnail's size;
- ``overlay.png``: the thumbnail with every class drawn in its colour, and a legend;
- ``qc.geojson``: the same classes as polygons in level-0 pixels, a FeatureCollection
  of QuPath annotations (``objectType`` and ``classification`` with name and colour);
- ``qc.json`` (written last): areas, the share of the tissue per artifact class
  (``fraction_of_tissue``, as the verdict judges it: :class:`QcSummary`), the
  thresholds and the verdict with its reasons.

Every file is written to a temporary name and renamed, so a folder with ``qc.json``
is complete.

The verdict (:class:`QcThresholds`): **fail** when the usable tissue is smaller than
``min_usable_mm2`` or less than ``min_usable_fraction`` of the tissue (mostly
artifact); **warn** when it is less than ``warn_usable_fraction`` of the tissue or
any one artifact class covers more than ``warn_artifact_fraction`` of it; else
**pass**.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import Field

from services.common.settings import ServiceSettings
from services.export.geojson import (
    feature_collection,
    oriented_ring,
    qupath_feature,
    write_geojson,
)
from services.slide.reader import SlideReader
from services.slide.tissue import (
    PEN_COLOURS,
    TissueMasks,
    TissueParams,
    check_finite_non_negative,
    mask_level_image,
    masks_of_level,
)

#: Mask classes in the order they are drawn and listed, with their RGB colours.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "tissue": (0, 160, 0),
    "usable": (0, 200, 120),
    "pen_green": (0, 230, 60),
    "pen_blue": (30, 80, 255),
    "pen_black": (20, 20, 20),
    "pen_red": (230, 0, 30),
    "pen_other": (255, 170, 0),
    "blur": (150, 60, 220),
    "fold": (240, 220, 0),
    "edge": (0, 200, 230),
}
#: Names of the classes in QuPath.
QUPATH_NAMES: dict[str, str] = {
    "tissue": "Tissue",
    "usable": "Usable tissue",
    "pen_green": "Pen green",
    "pen_blue": "Pen blue",
    "pen_black": "Pen black",
    "pen_red": "Pen red",
    "pen_other": "Pen other",
    "blur": "Blur",
    "fold": "Fold",
    "edge": "Coverslip edge",
}
ARTIFACTS = tuple(name for name in CLASS_COLOURS if name not in ("tissue", "usable"))
QC_JSON = "qc.json"


@dataclass(frozen=True)
class QcThresholds:
    """When a slide passes, warns or fails (see the module docstring).

    Attributes:
        min_usable_mm2: Least usable tissue area, mm².
        min_usable_fraction: Least usable share of the tissue (0-1).
        warn_usable_fraction: Usable share of the tissue under which to warn.
        warn_artifact_fraction: Share of the tissue one artifact class may cover
            before a warning.
    """

    min_usable_mm2: float = 0.5
    min_usable_fraction: float = 0.3
    warn_usable_fraction: float = 0.7
    warn_artifact_fraction: float = 0.1

    def __post_init__(self) -> None:
        check_finite_non_negative(
            self,
            "QC threshold",
            ("min_usable_fraction", "warn_usable_fraction", "warn_artifact_fraction"),
        )

    @classmethod
    def from_settings(cls, settings: QcSettings) -> QcThresholds:
        """The thresholds a service's ``HISTOMARKER_QC_*`` settings give."""
        return cls(**{f.name: getattr(settings, f"qc_{f.name}") for f in fields(cls)})


class QcSettings(ServiceSettings):
    """The QC thresholds as settings of a service that prepares slides (tiling and
    prediction; environment ``HISTOMARKER_QC_MIN_USABLE_MM2``...). The defaults are
    :class:`QcThresholds`'s: half a mm² of usable tissue (about eight 20x patches of
    512 px) is the least a slide needs for a mean over its patches to mean much."""

    #: Least usable tissue area, mm²; less fails QC.
    qc_min_usable_mm2: float = Field(default=QcThresholds.min_usable_mm2, ge=0)
    #: Least usable share of the tissue (0-1); less fails QC (mostly artifact).
    qc_min_usable_fraction: float = Field(default=QcThresholds.min_usable_fraction, ge=0, le=1)
    #: Usable share of the tissue under which QC warns (0-1).
    qc_warn_usable_fraction: float = Field(default=QcThresholds.warn_usable_fraction, ge=0, le=1)
    #: Share of the tissue one artifact class may cover before QC warns (0-1).
    qc_warn_artifact_fraction: float = Field(
        default=QcThresholds.warn_artifact_fraction, ge=0, le=1
    )


@dataclass(frozen=True)
class QcResult:
    """The masks of one slide and what they say."""

    slide: str
    thumbnail: np.ndarray
    masks: TissueMasks
    report: dict[str, Any]

    def class_masks(self) -> dict[str, np.ndarray]:
        """Every class of :data:`CLASS_COLOURS` as a boolean mask."""
        return class_masks(self.masks)


def class_masks(masks: TissueMasks) -> dict[str, np.ndarray]:
    """The QC classes of a set of tissue masks (absent pen colours are empty)."""
    empty = np.zeros(masks.tissue.shape, dtype=bool)
    out = {"tissue": masks.tissue, "usable": masks.usable}
    for colour in PEN_COLOURS:
        out[f"pen_{colour}"] = masks.pen.get(colour, empty)
    out.update(blur=masks.blur, fold=masks.fold, edge=masks.edge)
    return out


@dataclass(frozen=True)
class QcSummary:
    """What a slide's masks say, in numbers (the QC metrics that travel with tiling
    and prediction results).

    Attributes:
        verdict: ``pass``, ``warn`` or ``fail``.
        reasons: Why, one readable line each (empty on a pass).
        tissue_area_mm2: Tissue area, mm².
        usable_area_mm2: Tissue with no pen, blur or fold on it, mm².
        usable_fraction: Usable share of the tissue (0-1).
        artifact_fractions: Per artifact class, the share of the tissue area it
            covers (0-1 or more): blur and fold by the tissue they lie on; pen ink and
            coverslip edges, which are cut out of the tissue, by their whole area.
    """

    verdict: str
    reasons: tuple[str, ...]
    tissue_area_mm2: float
    usable_area_mm2: float
    usable_fraction: float
    artifact_fractions: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        """The summary as plain JSON values."""
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QcSummary:
        """The summary of :meth:`as_dict`'s values."""
        return cls(
            verdict=str(values["verdict"]),
            reasons=tuple(values["reasons"]),
            tissue_area_mm2=float(values["tissue_area_mm2"]),
            usable_area_mm2=float(values["usable_area_mm2"]),
            usable_fraction=float(values["usable_fraction"]),
            artifact_fractions={k: float(v) for k, v in values["artifact_fractions"].items()},
        )


def qc_summary(masks: TissueMasks, thresholds: QcThresholds) -> QcSummary:
    """Areas, shares and the verdict of one slide's masks (see the module docstring)."""
    px_mm2 = (masks.mpp / 1000.0) ** 2
    tissue_px = int(masks.tissue.sum())
    usable_px = int(masks.usable.sum())
    classes = class_masks(masks)
    shares = {}
    for name in ARTIFACTS:
        mask = classes[name]
        # Ink and edges are cut out of the tissue: judge them by the tissue they took,
        # i.e. the area they cover next to and over it.
        covered = mask if name.startswith("pen_") or name == "edge" else mask & masks.tissue
        shares[name] = round(float(covered.sum()) / tissue_px, 6) if tissue_px else 0.0
    measured = QcSummary(
        verdict="pass",
        reasons=(),
        tissue_area_mm2=round(tissue_px * px_mm2, 6),
        usable_area_mm2=round(usable_px * px_mm2, 6),
        usable_fraction=round(usable_px / tissue_px if tissue_px else 0.0, 6),
        artifact_fractions=shares,
    )
    return judged(measured, thresholds)


def judged(summary: QcSummary, thresholds: QcThresholds) -> QcSummary:
    """The summary's verdict and reasons under ``thresholds``, from its areas and
    shares alone: a stored summary judged again under other thresholds needs no
    masks."""
    usable_mm2 = summary.usable_area_mm2
    usable_share = summary.usable_fraction
    failures, warnings = [], []
    if summary.tissue_area_mm2 <= 0:
        failures.append("no tissue found")
    else:
        if usable_mm2 < thresholds.min_usable_mm2:
            failures.append(
                f"usable tissue {usable_mm2:.3g} mm² is under {thresholds.min_usable_mm2:g} mm²"
            )
        if usable_share < thresholds.min_usable_fraction:
            failures.append(
                f"only {usable_share:.0%} of the tissue is usable "
                f"(at least {thresholds.min_usable_fraction:.0%} needed)"
            )
        elif usable_share < thresholds.warn_usable_fraction:
            warnings.append(f"only {usable_share:.0%} of the tissue is usable")
        for name, share in summary.artifact_fractions.items():
            if share > thresholds.warn_artifact_fraction:
                warnings.append(
                    f"{QUPATH_NAMES[name].lower()} covers {share:.0%} of the tissue area"
                )
    status = "fail" if failures else "warn" if warnings else "pass"
    return replace(summary, verdict=status, reasons=tuple(failures + warnings))


def verdict(masks: TissueMasks, thresholds: QcThresholds) -> tuple[str, list[str]]:
    """``pass``, ``warn`` or ``fail`` and the reasons, one readable line each."""
    summary = qc_summary(masks, thresholds)
    return summary.verdict, list(summary.reasons)


def run_qc(
    reader: SlideReader,
    params: TissueParams | None = None,
    thresholds: QcThresholds | None = None,
    mask_downsample: float = 16.0,
) -> QcResult:
    """Masks, areas, shares and the verdict of one opened slide or image."""
    thresholds = thresholds or QcThresholds()
    # The tiling's own masks: a slide's level nearest the downsample (a plain image
    # has only its own).
    thumbnail, downsample = mask_level_image(reader, reader.name, mask_downsample)
    masks = masks_of_level(reader, thumbnail, downsample, params or TissueParams())
    summary = qc_summary(masks, thresholds)
    px_mm2 = (masks.mpp / 1000.0) ** 2
    classes = class_masks(masks)
    report = {
        "slide": reader.name,
        "verdict": summary.verdict,
        "reasons": list(summary.reasons),
        "mpp": float(reader.mpp[0]),
        "mask_mpp": float(masks.mpp),
        "downsample": float(masks.downsample),
        "size_px": [int(masks.tissue.shape[1]), int(masks.tissue.shape[0])],
        "tissue_area_mm2": summary.tissue_area_mm2,
        "usable_area_mm2": summary.usable_area_mm2,
        "usable_fraction": summary.usable_fraction,
        "area_mm2": {name: round(float(m.sum()) * px_mm2, 6) for name, m in classes.items()},
        "fraction_of_tissue": summary.artifact_fractions,
        "thresholds": {
            "masks": {
                k: (round(float(v), 6) if math.isfinite(v) else None)
                for k, v in masks.thresholds.items()
            },
            "verdict": asdict(thresholds),
        },
    }
    return QcResult(reader.name, thumbnail, masks, report)


# ----------------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png(image: np.ndarray) -> bytes:
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("cannot encode a PNG")
    return encoded.tobytes()


def overlay(thumbnail: np.ndarray, classes: dict[str, np.ndarray]) -> np.ndarray:
    """The thumbnail with the tissue outlined, each artifact class tinted and
    outlined in its colour, and a legend of the classes present (RGB)."""
    out = thumbnail.astype(np.float32).copy()
    scale = max(1, round(max(thumbnail.shape[:2]) / 600))
    for name in ARTIFACTS:
        mask = classes[name]
        if mask.any():
            out[mask] = 0.55 * out[mask] + 0.45 * np.array(CLASS_COLOURS[name], np.float32)
    image = np.clip(out, 0, 255).astype(np.uint8)
    for name in ("tissue", *ARTIFACTS):
        mask = classes[name]
        if not mask.any():
            continue
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(image, contours, -1, CLASS_COLOURS[name], scale)
    present = [name for name in ("tissue", *ARTIFACTS) if classes[name].any()]
    return _legend(image, present, scale)


def _legend(image: np.ndarray, names: list[str], scale: int) -> np.ndarray:
    """A white band on the right listing the classes with their colours."""
    font, size, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale, max(1, scale // 2)
    row = round(22 * scale)
    labels = [QUPATH_NAMES[name] for name in names] or ["nothing found"]
    text_w = max(cv2.getTextSize(label, font, size, thick)[0][0] for label in labels)
    width = text_w + round(40 * scale)
    height = max(image.shape[0], row * (len(labels) + 1))
    canvas = np.full((height, image.shape[1] + width, 3), 255, np.uint8)
    canvas[: image.shape[0], : image.shape[1]] = image
    x0 = image.shape[1] + round(8 * scale)
    for i, label in enumerate(labels):
        y = row * (i + 1)
        if names:
            colour = CLASS_COLOURS[names[i]]
            cv2.rectangle(canvas, (x0, y - row // 2), (x0 + row // 2, y), colour, -1)
            cv2.rectangle(canvas, (x0, y - row // 2), (x0 + row // 2, y), (90, 90, 90), 1)
        cv2.putText(canvas, label, (x0 + row // 2 + 6, y), font, size, (0, 0, 0), thick)
    return canvas


def geojson(classes: dict[str, np.ndarray], downsample: float) -> dict[str, Any]:
    """The classes as QuPath annotations: one feature per class, its regions (with
    their holes) as a MultiPolygon in level-0 pixel coordinates."""
    features = []
    for name, mask in classes.items():
        polygons = _polygons(mask, downsample)
        if not polygons:
            continue
        features.append(
            qupath_feature(
                {"type": "MultiPolygon", "coordinates": polygons},
                object_type="annotation",
                classification=QUPATH_NAMES[name],
                colour=CLASS_COLOURS[name],
                name=QUPATH_NAMES[name],
                locked=False,
            )
        )
    return feature_collection(features)


def _ring(contour: np.ndarray, downsample: float, exterior: bool) -> list[list[float]] | None:
    # Mask pixel (i, j) covers [i, i+1) in mask px: its corner in level-0 px.
    return oriented_ring(contour.reshape(-1, 2).astype(np.float64) * downsample, exterior)


def _polygons(mask: np.ndarray, downsample: float) -> list[list[list[list[float]]]]:
    if not mask.any():
        return []
    contours, hierarchy = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[0][i][3] != -1:
            continue  # a hole: added with its outer ring below
        outer = _ring(contour, downsample, exterior=True)
        if outer is None:
            continue
        rings = [outer]
        child = hierarchy[0][i][2]
        while child != -1:
            hole = _ring(contours[child], downsample, exterior=False)
            if hole is not None:
                rings.append(hole)
            child = hierarchy[0][child][0]
        polygons.append(rings)
    return polygons


def write_report(result: QcResult, out: str | Path) -> Path:
    """Write the QC files of one slide (see the module docstring); ``qc.json`` last.

    Returns:
        The path of ``qc.json``.
    """
    folder = Path(out)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    classes = result.class_masks()
    _write_atomic(folder / "thumbnail.png", _png(result.thumbnail))
    for name, mask in classes.items():
        _write_atomic(
            folder / "masks" / f"{name}.png", _png(np.where(mask, 255, 0).astype(np.uint8))
        )
    _write_atomic(folder / "overlay.png", _png(overlay(result.thumbnail, classes)))
    write_geojson(folder / "qc.geojson", geojson(classes, result.masks.downsample))
    path = folder / QC_JSON
    _write_atomic(path, (json.dumps(result.report, indent=1) + "\n").encode())
    return path
