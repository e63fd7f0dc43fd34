"""BuildReport's inputs from stored objects, and the report written to the store.

Images are read header first and bounded, montage patches come out of tar shards,
heatmap patches are checked against their thumbnail, an ablation table is checked
so that Table 2 can be drawn from it; :func:`write_report` draws the report with
:func:`report.build_report` and uploads it, ``report.html`` last. No gRPC here.
"""

from __future__ import annotations

import io
import math
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from services.analysis.figures import decode_image
from services.analysis.report import (
    FIGURES_DIR,
    CurveSet,
    PatchExample,
    PatchMontage,
    ReliabilitySet,
    SlideHeatmap,
    build_report,
)
from services.analysis.tables import run_prefix
from services.common.cancellation import WorkBudget
from services.common.errors import InvalidInput, NotFound
from services.common.objectstore import ObjectInfo, ObjectStore, validate_prefix

#: Largest side of a thumbnail or patch image, px.
MAX_IMAGE_SIDE_PX = 4096
#: Most patches in all montages of one report (a count).
MAX_MONTAGE_PATCHES = 64
#: Most heatmaps in one report (a count).
MAX_HEATMAPS = 32
#: Most characters of a report's title (and of a summary line's name), kept.
MAX_TITLE_CHARS = 200
#: Most characters of the free-text description, kept.
MAX_DESCRIPTION_CHARS = 2000
#: Most characters of one summary line's value (longer ones are refused).
MAX_SUMMARY_VALUE_CHARS = 20_000
#: Most lines a caller may add to the summary (a count).
MAX_SUMMARY_LINES = 64


# --- images -----------------------------------------------------------------------


def decode_checked_image(data: bytes, what: str) -> np.ndarray:
    """RGB uint8 pixels of a PNG/JPEG of at most 4096 px a side, read header first."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
    except Exception:  # PIL raises OSError, ValueError, SyntaxError, bomb errors
        raise InvalidInput(f"{what} is not a readable image") from None
    if max(width, height) > MAX_IMAGE_SIDE_PX or min(width, height) < 1:
        raise InvalidInput(f"{what} is {width}x{height} px; at most {MAX_IMAGE_SIDE_PX} a side")
    try:
        return decode_image(bytes(data))
    except InvalidInput as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    except Exception:
        raise InvalidInput(f"{what} cannot be decoded") from None


def shard_member(data: bytes, member: str, shard_key: str) -> bytes:
    """The bytes of ``member`` in a tar shard's content."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            try:
                info = tar.getmember(member)
            except KeyError:
                raise NotFound(f"shard {shard_key!r} has no member {member[:200]!r}") from None
            handle = tar.extractfile(info) if info.isfile() else None
            if handle is None:
                raise InvalidInput(f"shard {shard_key!r}: {member[:200]!r} is not a file")
            return handle.read()
    except tarfile.TarError:
        raise InvalidInput(f"shard {shard_key!r} is not a tar shard") from None


# --- sections -----------------------------------------------------------------------


def summary_lines(lines: Sequence[tuple[str, str]]) -> dict[str, object]:
    """The caller's summary lines, in order, as the report's summary mapping.

    Raises:
        InvalidInput: Too many lines, an empty, overlong or repeated name (or ``run``,
            the title's line), or an overlong value.
    """
    if len(lines) > MAX_SUMMARY_LINES:
        raise InvalidInput(f"summary: at most {MAX_SUMMARY_LINES} lines")
    summary: dict[str, object] = {}
    for i, (name, value) in enumerate(lines):
        if not name.strip() or len(name) > MAX_TITLE_CHARS:
            raise InvalidInput(f"summary[{i}].name must be 1-{MAX_TITLE_CHARS} characters")
        if name in summary or name == "run":
            raise InvalidInput(f"summary[{i}].name {name[:80]!r} is given twice (or is 'run')")
        if len(value) > MAX_SUMMARY_VALUE_CHARS:
            raise InvalidInput(f"summary[{i}].value is over {MAX_SUMMARY_VALUE_CHARS} characters")
        summary[name] = value
    return summary


def ablation_for_report(table: pd.DataFrame) -> pd.DataFrame:
    """An ablation table checked so that Table 2 can be drawn from it."""
    needed = ["biomarker", "patch_set", "group", "n_features", "auprc"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise InvalidInput(f"ablation table lacks column(s) {', '.join(missing)}")
    if table.empty:
        raise InvalidInput("ablation table is empty")
    clean = table.copy()
    for column in ("biomarker", "patch_set", "group", "note"):
        if column in clean.columns:
            text = clean[column].astype(object)
            clean[column] = text.where(text.notna(), "").astype(str)
    for column in ("ci_low", "ci_high", "prevalence"):
        if column not in clean.columns:
            clean[column] = np.nan
    for column in ("n_features", "auprc", "ci_low", "ci_high", "prevalence", "folds"):
        if column not in clean.columns:
            continue
        values = pd.to_numeric(clean[column], errors="coerce")
        required = column in ("n_features", "auprc", "folds")
        if (required and values.isna().any()) or np.isinf(values).any():
            raise InvalidInput(f"ablation table: {column} must be finite numbers")
        clean[column] = values
    if ((clean["auprc"] < 0) | (clean["auprc"] > 1)).any():
        raise InvalidInput("ablation table: auprc must lie in [0, 1]")
    if (clean["n_features"] < 0).any() or (clean["n_features"] > 1e6).any():
        raise InvalidInput("ablation table: n_features must be a count")
    if "folds" in clean.columns and ((clean["folds"] < 0) | (clean["folds"] > 1e6)).any():
        raise InvalidInput("ablation table: folds must be a count")
    clean["n_features"] = clean["n_features"].astype(np.int64)
    return clean


def heatmap_patches(
    table: pd.DataFrame, slide_id: str, biomarker: str | None, downsample: float, what: str
) -> pd.DataFrame:
    """The rows of one slide (and biomarker) with finite level-0 boxes and probabilities
    in [0, 1] that map to finite thumbnail pixels."""
    if not downsample > 0 or not math.isfinite(downsample):
        raise InvalidInput(f"{what}: downsample must be a finite number > 0")
    missing = [c for c in ("x", "y", "width", "height", "probability") if c not in table.columns]
    if missing:
        raise InvalidInput(f"{what}: the patch table lacks column(s) {', '.join(missing)}")
    rows = table
    if "slide_id" in rows.columns and slide_id:
        rows = rows.loc[rows["slide_id"].astype(str) == slide_id]
    if "biomarker" in rows.columns and biomarker:
        rows = rows.loc[rows["biomarker"].astype(str).str.lower() == biomarker]
    if rows.empty:
        raise InvalidInput(f"{what}: no patches of slide {slide_id!r} in the patch table")
    numbers = rows.loc[:, ["x", "y", "width", "height", "probability"]].apply(
        pd.to_numeric, errors="coerce"
    )
    values = numbers.to_numpy(np.float64)
    if not np.isfinite(values).all():
        raise InvalidInput(f"{what}: x, y, width, height and probability must be finite numbers")
    with np.errstate(over="ignore"):
        far = (np.abs(values[:, :2]) + np.abs(values[:, 2:4])) / downsample
    if not np.isfinite(far).all() or (far > 1e12).any():
        raise InvalidInput(f"{what}: patch boxes lie too far outside the thumbnail")
    probability = values[:, 4]
    if ((probability < 0) | (probability > 1)).any():
        raise InvalidInput(f"{what}: probabilities outside [0, 1]")
    return numbers.reset_index(drop=True)


def heatmap(
    slide_id: str,
    biomarker: str,
    thumbnail: np.ndarray,
    downsample: float,
    patches: pd.DataFrame,
    label: str = "",
) -> SlideHeatmap:
    """A slide heatmap; its slide score is the mean patch probability."""
    return SlideHeatmap(
        slide_id=slide_id or "slide",
        biomarker=biomarker,
        thumbnail=thumbnail,
        downsample=downsample,
        patches=patches,
        label=label or None,
        slide_probability=float(patches["probability"].mean()),
    )


def montage(biomarker: str, patches: Sequence[tuple[str, np.ndarray, str]]) -> PatchMontage:
    """A montage from (class name, RGB image, caption) triples, in the given order."""
    classes: dict[str, list[PatchExample]] = {}
    for class_name, image, caption in patches:
        classes.setdefault(class_name or "patches", []).append(PatchExample(image, caption))
    return PatchMontage(biomarker=biomarker, classes=classes)


# --- the report -----------------------------------------------------------------------


@dataclass
class ReportInputs:
    """Everything one report is drawn from (see ``report.build_report``)."""

    title: str
    summary: dict[str, object] = field(default_factory=dict)
    curves: list[CurveSet] = field(default_factory=list)
    reliability: list[ReliabilitySet] = field(default_factory=list)
    ablation: pd.DataFrame | None = None
    statistics: pd.DataFrame | None = None
    montages: list[PatchMontage] = field(default_factory=list)
    heatmaps: list[SlideHeatmap] = field(default_factory=list)

    def is_empty(self) -> bool:
        """True when no section beyond the summary would be drawn."""
        return not (
            self.curves
            or self.ablation is not None
            or self.statistics is not None
            or self.montages
            or self.heatmaps
        )


def report_prefix(output_prefix: str, run_id: str) -> str:
    """Where the report goes: the prefix given, else ``runs/{run_id}/analysis/report``."""
    if output_prefix:
        prefix = output_prefix.rstrip("/")
        if not prefix:
            raise InvalidInput(f"output_prefix {output_prefix!r} names no folder")
        return validate_prefix(prefix)
    if not run_id:
        raise InvalidInput("give output_prefix or run_id: where to write the report")
    return f"{run_prefix(run_id)}/report"


def write_report(
    store: ObjectStore,
    prefix: str,
    inputs: ReportInputs,
    *,
    progress: Callable[[int, int], None] | None = None,
    budget: WorkBudget | None = None,
) -> tuple[ObjectInfo, list[ObjectInfo]]:
    """Draw the report locally, upload its figures, then ``report.html`` last (so a
    report that exists is complete); figures of an earlier report there are removed.

    Returns:
        The stored HTML and the stored figures.
    """
    budget = budget or WorkBudget.unlimited()

    def report(done: int, total: int) -> None:
        budget.check()
        if progress is not None:
            progress(done, total)

    budget.check()
    with tempfile.TemporaryDirectory(prefix="histomarker-report-") as folder:
        html = build_report(
            Path(folder),
            inputs.title,
            summary=inputs.summary,
            curves=inputs.curves,
            reliability=inputs.reliability,
            ablation=inputs.ablation,
            statistics=inputs.statistics,
            montages=inputs.montages,
            heatmaps=inputs.heatmaps,
            progress=report,
        )
        figures = []
        for path in sorted((Path(folder) / FIGURES_DIR).glob("*.png")):
            key = f"{prefix}/{FIGURES_DIR}/{path.name}"
            figures.append(store.put_bytes(key, path.read_bytes(), content_type="image/png"))
        kept = {info.key for info in figures}
        for stale in list(store.list(f"{prefix}/{FIGURES_DIR}/")):
            if stale.key not in kept and stale.key.endswith(".png"):
                store.delete(stale.key)
        stored = store.put_bytes(
            f"{prefix}/report.html", html.read_bytes(), content_type="text/html; charset=utf-8"
        )
    return stored, figures
