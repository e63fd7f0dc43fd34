"""The report's figures, drawn with matplotlib (Agg) in one style, as PNG files.

The inputs are small dataclasses of plain arrays so that any metrics code can feed
them. Figures are built on ``matplotlib.figure.Figure`` (no pyplot state), so a
server may draw them from several threads.

Coordinates follow the project convention: (x, y) of a patch's top-left corner at
level 0 and (width, height) in level-0 pixels; a thumbnail's ``downsample`` is level-0
pixels per thumbnail pixel.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from services.common.errors import InvalidInput

matplotlib.use("Agg")

#: Resolution of every PNG, dots per inch.
DPI = 110
#: matplotlib settings shared by every figure.
STYLE: dict[str, object] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.color": "0.9",
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}
#: Colour of each evaluation level in the curve panels.
LEVEL_COLOURS = {"patch": "tab:blue", "slide": "tab:orange"}
#: Colour of each feature family in the importance chart.
FAMILY_COLOURS = {
    "morphology": "tab:purple",
    "intensity": "tab:red",
    "spatial": "tab:green",
    "other": "0.5",
}
#: Colour map of patch probabilities on heatmaps (blue 0 -> red 1).
HEATMAP_CMAP = "RdYlBu_r"


@dataclass(frozen=True)
class CurveSet:
    """ROC, precision-recall and MCC-F1 curves of one biomarker at one level.

    Attributes:
        name: Biomarker, e.g. ``TP53``.
        level: ``patch`` or ``slide``.
        fpr, tpr: ROC curve points.
        precision, recall: Precision-recall curve points.
        mcc_f1_points: (N, 2) array of (F1, unit-normalized MCC = (MCC + 1) / 2) per
            threshold (Cao et al. 2020).
        auroc, auprc, mcc_f1: The curves' summary metrics.
        prevalence: Share of positives (the PR chance line); optional.
        auroc_ci, auprc_ci: Optional (low, high) confidence intervals.
    """

    name: str
    level: Literal["patch", "slide"]
    fpr: np.ndarray
    tpr: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    mcc_f1_points: np.ndarray
    auroc: float
    auprc: float
    mcc_f1: float
    prevalence: float | None = None
    auroc_ci: tuple[float, float] | None = None
    auprc_ci: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.level not in LEVEL_COLOURS:
            raise InvalidInput(f"curve level must be patch or slide, got {self.level!r}")
        if np.shape(self.fpr) != np.shape(self.tpr) or np.ndim(self.fpr) != 1:
            raise InvalidInput(f"{self.name} {self.level}: fpr and tpr must be equal 1-d arrays")
        if np.shape(self.precision) != np.shape(self.recall) or np.ndim(self.recall) != 1:
            raise InvalidInput(
                f"{self.name} {self.level}: precision and recall must be equal 1-d arrays"
            )
        points = np.asarray(self.mcc_f1_points)
        if points.ndim != 2 or points.shape[1] != 2:
            raise InvalidInput(f"{self.name} {self.level}: mcc_f1_points must be (N, 2)")


@dataclass(frozen=True)
class ReliabilitySet:
    """Calibration of one model: probabilities (one array per name, e.g. before and
    after temperature scaling) against 0/1 labels."""

    name: str
    probabilities_by_name: Mapping[str, np.ndarray]
    labels: np.ndarray


@dataclass(frozen=True)
class PatchExample:
    """One patch for a montage: an RGB uint8 array (H, W, 3) or PNG/JPEG bytes."""

    image: np.ndarray | bytes
    caption: str = ""


@dataclass(frozen=True)
class PatchMontage:
    """Top BD patches of one biomarker: class name -> patches, best first."""

    biomarker: str
    classes: Mapping[str, Sequence[PatchExample]]


@dataclass(frozen=True)
class SlideHeatmap:
    """Patch probabilities of one slide drawn over its thumbnail.

    Attributes:
        slide_id: The slide.
        biomarker: The model whose probabilities are shown.
        thumbnail: RGB uint8 (H, W, 3) image of the whole slide.
        downsample: Level-0 pixels per thumbnail pixel.
        patches: Columns ``x, y, width, height`` (level 0, pixels) and
            ``probability`` in [0, 1].
        label: The slide's true class, shown in the title; optional.
        slide_probability: The slide score (mean patch probability); optional.
    """

    slide_id: str
    biomarker: str
    thumbnail: np.ndarray
    downsample: float
    patches: pd.DataFrame = field(repr=False)
    label: str | None = None
    slide_probability: float | None = None


def styled(grid: bool = True) -> AbstractContextManager[None]:
    """The report's matplotlib style (:data:`STYLE`), with or without axes grids."""
    # cast: matplotlib types rc_context's keys as a Literal of every rcParam name.
    return matplotlib.rc_context(cast(Any, STYLE | {"axes.grid": grid}))


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # "tight" keeps axis labels that equal-aspect panels push to the edge inside.
    figure.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.12)
    return path


def _interval(ci: tuple[float, float] | None) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else ""


def curves_figure(biomarker: str, curves: Sequence[CurveSet], path: Path) -> Path:
    """ROC | PR | MCC-F1 panels of one biomarker; patch and slide curves in each."""
    if not curves:
        raise InvalidInput(f"no curves for {biomarker}")
    with styled():
        figure = Figure(figsize=(12.6, 4.3), layout="constrained")
        roc, pr, mcc = figure.subplots(1, 3)
        roc.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
        for curve in curves:
            colour = LEVEL_COLOURS[curve.level]
            roc.plot(
                curve.fpr,
                curve.tpr,
                color=colour,
                label=f"{curve.level}: AUROC {curve.auroc:.3f}{_interval(curve.auroc_ci)}",
            )
            pr.step(
                curve.recall,
                curve.precision,
                where="post",
                color=colour,
                label=f"{curve.level}: AUPRC {curve.auprc:.3f}{_interval(curve.auprc_ci)}",
            )
            if curve.prevalence is not None:
                pr.axhline(curve.prevalence, color=colour, linestyle=":", linewidth=1)
            points = np.asarray(curve.mcc_f1_points, np.float64)
            mcc.plot(
                points[:, 0],
                points[:, 1],
                color=colour,
                label=f"{curve.level}: MCC-F1 {curve.mcc_f1:.3f}",
            )
            if len(points) and np.isfinite(points[:, 1]).any():
                best = int(np.nanargmax(points[:, 1]))
                mcc.plot(*points[best], marker="o", color=colour, markersize=5)
        mcc.plot([1], [1], marker="*", color="black", markersize=9, label="perfect")
        mcc.axhline(0.5, color="0.6", linestyle="--", linewidth=1)
        for axes, title, xlabel, ylabel, where in (
            (roc, "ROC", "false positive rate", "true positive rate", "lower right"),
            (pr, "Precision-recall (dotted: prevalence)", "recall", "precision", "lower left"),
            (mcc, "MCC-F1 (dot: best threshold)", "F1", "normalized MCC", "lower right"),
        ):
            # A little room past 1 so the "perfect" star and end points are not clipped.
            axes.set_xlim(-0.01, 1.03)
            axes.set_ylim(-0.01, 1.03)
            axes.set_aspect("equal")
            axes.set_title(title)
            axes.set_xlabel(xlabel)
            axes.set_ylabel(ylabel)
            axes.legend(loc=where)
        figure.suptitle(biomarker, fontsize=12, fontweight="bold")
        return _save(figure, path)


def reliability_figure(reliability: ReliabilitySet, path: Path) -> Path:
    """Reliability diagram, drawn by the inference package's calibration module."""
    # Imported here: the calibration module imports torch, needed only for this figure.
    from services.inference.calibration import reliability_diagram

    with styled():
        return reliability_diagram(
            dict(reliability.probabilities_by_name),
            np.asarray(reliability.labels),
            path,
            title=f"Reliability: {reliability.name}",
        )


def decode_image(image: np.ndarray | bytes) -> np.ndarray:
    """An RGB uint8 (H, W, 3) array from an array (gray, RGB or RGBA) or image bytes."""
    if isinstance(image, bytes | bytearray):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(image)) as opened:
                return np.asarray(opened.convert("RGB"))
        except OSError as error:
            raise InvalidInput(f"patch image bytes are not a readable image: {error}") from None
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise InvalidInput(f"patch image must be (H, W, 3|4), got {array.shape}")
    array = array[:, :, :3]
    if array.dtype != np.uint8:
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
    return array


def montage_figure(montage: PatchMontage, path: Path, columns: int = 6) -> Path:
    """A grid of patches: one row per class, best first, captions below each."""
    rows = [(name, list(patches)[:columns]) for name, patches in montage.classes.items()]
    rows = [(name, patches) for name, patches in rows if patches]
    if not rows:
        raise InvalidInput(f"montage of {montage.biomarker} has no patches")
    width = max(len(patches) for _, patches in rows)
    with styled(grid=False):
        figure = Figure(figsize=(1.9 * width + 0.6, 2.15 * len(rows) + 0.5), layout="constrained")
        grid = np.atleast_2d(np.asarray(figure.subplots(len(rows), width, squeeze=False)))
        for row, (name, patches) in enumerate(rows):
            for column in range(width):
                axes = grid[row, column]
                axes.set_xticks([])
                axes.set_yticks([])
                if column >= len(patches):
                    axes.set_axis_off()
                    continue
                axes.imshow(decode_image(patches[column].image))
                axes.set_xlabel(textwrap.fill(patches[column].caption, 26), fontsize=7)
                for spine in axes.spines.values():
                    spine.set_visible(True)
                    spine.set_color("0.7")
            grid[row, 0].set_ylabel(textwrap.fill(name, 18), fontsize=10, fontweight="bold")
        figure.suptitle(f"{montage.biomarker}: top BD patches per class", fontsize=11)
        return _save(figure, path)


def probability_grid(heatmap: SlideHeatmap) -> np.ndarray:
    """Patch probabilities painted on the thumbnail grid; NaN where no patch.

    Larger patches are painted first, so smaller (e.g. 40x) patches stay visible.
    """
    thumbnail = np.asarray(heatmap.thumbnail)
    if thumbnail.ndim not in (2, 3) or thumbnail.shape[0] == 0 or thumbnail.shape[1] == 0:
        raise InvalidInput(
            f"{heatmap.slide_id}: thumbnail must be (H, W[, 3]), got {thumbnail.shape}"
        )
    if not heatmap.downsample > 0:
        raise InvalidInput(f"{heatmap.slide_id}: downsample must be > 0")
    missing = {"x", "y", "width", "height", "probability"} - set(heatmap.patches.columns)
    if missing:
        raise InvalidInput(f"{heatmap.slide_id}: patch table lacks {sorted(missing)}")
    probabilities = heatmap.patches["probability"].to_numpy(np.float64)
    if ((probabilities < 0) | (probabilities > 1)).any():
        raise InvalidInput(f"{heatmap.slide_id}: probabilities must lie in [0, 1]")
    height, width = thumbnail.shape[:2]
    grid = np.full((height, width), np.nan)
    patches = heatmap.patches.assign(_area=heatmap.patches["width"] * heatmap.patches["height"])
    for row in patches.sort_values("_area", ascending=False, kind="stable").itertuples():
        left = max(math.floor(float(row.x) / heatmap.downsample), 0)
        top = max(math.floor(float(row.y) / heatmap.downsample), 0)
        right = min(math.ceil((float(row.x) + float(row.width)) / heatmap.downsample), width)
        bottom = min(math.ceil((float(row.y) + float(row.height)) / heatmap.downsample), height)
        if right > left and bottom > top:
            grid[top:bottom, left:right] = float(row.probability)
    return grid


def heatmap_figure(heatmap: SlideHeatmap, path: Path) -> Path:
    """The thumbnail with patch probabilities over it and a colour bar."""
    grid = probability_grid(heatmap)
    thumbnail = decode_image(np.asarray(heatmap.thumbnail))
    height, width = grid.shape
    aspect = height / width
    title = f"{heatmap.slide_id}: {heatmap.biomarker}"
    details = []
    if heatmap.label is not None:
        details.append(f"label {heatmap.label}")
    if heatmap.slide_probability is not None:
        details.append(f"slide p = {heatmap.slide_probability:.2f}")
    details.append(f"{len(heatmap.patches)} patches")
    with styled(grid=False):
        figure = Figure(figsize=(6.0, min(max(5.2 * aspect, 2.5), 9.0) + 0.7), layout="constrained")
        axes = figure.subplots()
        axes.imshow(thumbnail)
        norm = Normalize(vmin=0.0, vmax=1.0)
        axes.imshow(np.ma.masked_invalid(grid), cmap=HEATMAP_CMAP, norm=norm, alpha=0.6)
        axes.set_axis_off()
        axes.set_title(f"{title}\n{', '.join(details)}")
        # The bar at full opacity: the overlay's alpha would wash its colours out.
        bar = figure.colorbar(
            ScalarMappable(norm=norm, cmap=HEATMAP_CMAP), ax=axes, shrink=0.8, pad=0.02
        )
        bar.set_label(f"p({heatmap.biomarker} positive), per patch")
        return _save(figure, path)


def importance_figure(importances: pd.DataFrame, title: str, path: Path) -> Path:
    """Horizontal bars of permutation importance (mean drop of AUPRC, with std),
    coloured by feature family; the table of ``ablation.permutation_importances``."""
    missing = {"feature", "importance_mean"} - set(importances.columns)
    if missing:
        raise InvalidInput(f"importance table lacks {sorted(missing)}")
    ordered = importances.sort_values("importance_mean", kind="stable")
    families = ordered.get("family", pd.Series("other", index=ordered.index))
    colours = [FAMILY_COLOURS.get(str(family), FAMILY_COLOURS["other"]) for family in families]
    errors = ordered.get("importance_std")
    with styled():
        figure = Figure(figsize=(6.0, 0.26 * len(ordered) + 1.2), layout="constrained")
        axes = figure.subplots()
        axes.barh(ordered["feature"], ordered["importance_mean"], xerr=errors, color=colours)
        axes.set_xlabel("drop in AUPRC when permuted")
        axes.set_title(title)
        axes.tick_params(axis="y", labelsize=8)
        axes.legend(
            handles=[
                Patch(color=FAMILY_COLOURS.get(family, FAMILY_COLOURS["other"]), label=family)
                for family in dict.fromkeys(str(f) for f in families)
            ],
            loc="lower right",
        )
        return _save(figure, path)
