"""Patch scores to slide scores, and metrics at both levels side by side.

A slide's score is the mean of its patch probabilities (the paper's choice), or
optionally their median or the mean of its k highest. Patch tables have one row per
patch with ``slide_id``, ``label`` (0/1, the slide's label), ``probability`` (0-1)
and optionally ``patient_id``; without it each slide is its own patient.

Bootstrap intervals resample patients, so every patch and slide of a patient moves
together: patch-level intervals resample patients (slides when no ``patient_id``),
slide-level intervals resample patients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from services.analysis.metrics import (
    BOOTSTRAP_RESAMPLES,
    CONFIDENCE,
    MCC_F1_BINS,
    MetricReport,
    compute_metrics,
    validate_binary,
)
from services.common.errors import InvalidInput

#: The ways of aggregating, by name.
AGGREGATIONS = ("mean", "median", "topk")
#: Patches averaged by "topk" by default.
TOP_K = 10
#: Columns of a patch table; ``patient_id`` is optional.
PATCH_COLUMNS = ("slide_id", "label", "probability")
#: Columns of the slide table ``aggregate_slides`` returns.
SLIDE_COLUMNS = ("slide_id", "patient_id", "label", "probability", "patch_count")


def check_aggregation(method: str, top_k: int = TOP_K) -> None:
    """Raises InvalidInput for an unknown method or a top-k below 1."""
    if method not in AGGREGATIONS:
        raise InvalidInput(
            f"unknown aggregation {method!r}; choose one of {', '.join(AGGREGATIONS)}"
        )
    if method == "topk" and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InvalidInput(f"top-k must be a whole number >= 1, got {top_k!r}")


def validate_patch_table(table: pd.DataFrame) -> pd.DataFrame:
    """A clean copy of a patch table: the columns present, labels 0/1, probabilities
    in [0, 1], ids as strings, one label and one patient per slide.

    Raises:
        InvalidInput: The message names the missing column or the offending rows/slides.
    """
    missing = [c for c in PATCH_COLUMNS if c not in table.columns]
    if missing:
        raise InvalidInput(
            f"the table lacks column(s) {', '.join(missing)} "
            f"(it has {', '.join(map(str, table.columns)) or 'none'})"
        )
    clean = table.reset_index(drop=True)
    for column in ("slide_id", "patient_id"):
        if column in clean.columns:
            absent = clean[column].isna().to_numpy()
            if absent.any():
                rows = ", ".join(str(int(r)) for r in np.flatnonzero(absent)[:10])
                raise InvalidInput(f"{column} is missing at rows {rows}")
    label = pd.to_numeric(clean["label"], errors="coerce")
    if label.isna().any() and not clean["label"].isna().any():
        raise InvalidInput("labels must be 0 or 1; some are not numbers")
    probability = pd.to_numeric(clean["probability"], errors="coerce")
    if probability.isna().any() and not clean["probability"].isna().any():
        raise InvalidInput("probabilities must be numbers; some are not")
    scores = validate_binary(label.to_numpy(np.float64), probability.to_numpy(np.float64))
    slide = clean["slide_id"].astype(str)
    patient = clean["patient_id"].astype(str) if "patient_id" in clean.columns else slide
    out = pd.DataFrame(
        {
            "slide_id": slide,
            "patient_id": patient,
            "label": scores.labels,
            "probability": scores.probabilities,
        }
    )
    per_slide = out.groupby("slide_id", sort=False).agg(
        labels=("label", "nunique"), patients=("patient_id", "nunique")
    )
    mixed = per_slide.index[per_slide["labels"] > 1].tolist()
    if mixed:
        raise InvalidInput(f"slide(s) {', '.join(mixed[:10])} have patches of both labels")
    shared = per_slide.index[per_slide["patients"] > 1].tolist()
    if shared:
        raise InvalidInput(f"slide(s) {', '.join(shared[:10])} belong to more than one patient")
    return out


def slide_probability(grouped: Any, method: str, top_k: int = TOP_K) -> pd.Series:
    """Each slide's probability from its patches' (``grouped``: patches grouped by
    slide) by ``method``: mean, median or the mean of the ``top_k`` highest."""
    if method == "mean":
        return grouped["probability"].mean()
    if method == "median":
        return grouped["probability"].median()
    return grouped["probability"].apply(lambda p: p.nlargest(top_k).mean())


def aggregate_slides(table: pd.DataFrame, method: str = "mean", top_k: int = TOP_K) -> pd.DataFrame:
    """One row per slide: slide_id, patient_id, label, probability, patch_count.

    Args:
        table: Patch table (see the module docstring).
        method: "mean" (default, the paper's), "median", or "topk" — the mean of the
            ``top_k`` highest patch probabilities (all of them when a slide has fewer).
        top_k: Patches averaged by "topk".

    Raises:
        InvalidInput: Bad method, top-k or table.
    """
    check_aggregation(method, top_k)
    patches = validate_patch_table(table)
    grouped = patches.groupby("slide_id", sort=True)
    probability = slide_probability(grouped, method, top_k)
    first = grouped[["patient_id", "label"]].first()
    slides = pd.DataFrame(
        {
            "slide_id": probability.index.astype(str),
            "patient_id": first["patient_id"].to_numpy(),
            "label": first["label"].to_numpy(np.int64),
            "probability": probability.to_numpy(np.float64),
            "patch_count": grouped.size().to_numpy(np.int64),
        }
    )
    return slides.loc[:, list(SLIDE_COLUMNS)]


@dataclass(frozen=True)
class LevelMetrics:
    """Patch-level and slide-level metrics of one patch table, and the slide table."""

    patch: MetricReport
    slide: MetricReport
    slides: pd.DataFrame
    aggregation: str
    top_k: int | None
    patient_count: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "aggregation": self.aggregation,
            "top_k": self.top_k,
            "patients": self.patient_count,
            "patch_level": self.patch.as_dict(),
            "slide_level": self.slide.as_dict(),
        }


def patch_and_slide_metrics(
    table: pd.DataFrame,
    method: str = "mean",
    top_k: int = TOP_K,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    bins: int = MCC_F1_BINS,
) -> LevelMetrics:
    """AUROC, AUPRC and MCC-F1 with intervals over patches and over slides.

    Both levels resample patients (slides when the table has no ``patient_id``) with
    the same seed.

    Raises:
        InvalidInput: Bad table or arguments; also when the slides hold one class.
    """
    check_aggregation(method, top_k)
    patches = validate_patch_table(table)
    has_patients = "patient_id" in table.columns
    unit = "patient_id" if has_patients else "slide_id"

    def level(scored: pd.DataFrame) -> MetricReport:
        return compute_metrics(
            scored["label"],
            scored["probability"],
            scored["patient_id"],
            resamples=resamples,
            confidence=confidence,
            seed=seed,
            bins=bins,
            unit=unit,
        )

    slides = aggregate_slides(patches, method, top_k)
    patch, slide = level(patches), level(slides)
    return LevelMetrics(
        patch=patch,
        slide=slide,
        slides=slides,
        aggregation=method,
        top_k=top_k if method == "topk" else None,
        patient_count=int(patches["patient_id"].nunique()),
    )
