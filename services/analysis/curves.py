"""Scored patches to metrics, slide scores and the report's curve sets.

What ComputeMetrics, AggregateSlides and BuildReport's curves share: patch tables
given inline or read from the store, picked by biomarker, checked, aggregated into
slides, measured with :mod:`metrics` and drawn as :class:`CurveSet` and
:class:`ReliabilitySet` entries. No gRPC here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from services.analysis.aggregate import (
    TOP_K,
    LevelMetrics,
    aggregate_slides,
    check_aggregation,
    patch_and_slide_metrics,
    slide_probability,
    validate_patch_table,
)
from services.analysis.figures import CurveSet, ReliabilitySet
from services.analysis.metrics import MetricReport, compute_metrics, mcc_f1, pr_curve, roc_curve
from services.analysis.tables import check_numeric
from services.common.errors import InvalidInput

#: Name of the curves when the predictions table has no ``biomarker`` column.
ALL_SCORES = "scores"
#: Name of the probabilities in a reliability diagram when the caller gives none.
CALIBRATED = "calibrated"
#: The two levels every curve set is drawn at.
LEVELS = ("patch", "slide")


# --- patch tables -----------------------------------------------------------------


def inline_patches(
    slide_ids: Sequence[str],
    probabilities: Sequence[float],
    labels: Sequence[bool],
    patient_ids: Sequence[str],
) -> pd.DataFrame:
    """A patch table from columns given inline; every given list must be as long as
    ``slide_ids`` (empty ``labels`` / ``patient_ids`` mean not given)."""
    n = len(slide_ids)
    if n == 0:
        raise InvalidInput("scores: no patches given (slide_ids is empty)")
    for name, values, optional in (
        ("probabilities", probabilities, False),
        ("labels", labels, True),
        ("patient_ids", patient_ids, True),
    ):
        if (len(values) or not optional) and len(values) != n:
            raise InvalidInput(
                f"scores: slide_ids and {name} differ in length ({n} vs {len(values)})"
            )
    table = pd.DataFrame({"slide_id": list(slide_ids), "probability": list(probabilities)})
    if labels:
        table["label"] = np.asarray(list(labels), dtype=np.int64)
    if patient_ids:
        table["patient_id"] = list(patient_ids)
    return table


def with_probability(table: pd.DataFrame) -> pd.DataFrame:
    """``score`` renamed ``probability`` when only the former is present."""
    if "probability" not in table.columns and "score" in table.columns:
        return table.rename(columns={"score": "probability"})
    return table


def select_biomarker(table: pd.DataFrame, biomarker: str | None, what: str) -> pd.DataFrame:
    """The rows of ``biomarker`` when the table has a ``biomarker`` column."""
    if "biomarker" not in table.columns:
        return table
    names = table["biomarker"].astype(str).str.lower()
    if not biomarker:
        present = sorted(set(names))
        if len(present) > 1:
            raise InvalidInput(
                f"{what} holds several biomarkers ({', '.join(present[:6])}): say which"
            )
        return table
    chosen = table.loc[names == biomarker].reset_index(drop=True)
    if chosen.empty:
        raise InvalidInput(f"{what} has no rows of biomarker {biomarker!r}")
    return chosen


def select_split(table: pd.DataFrame, split: str, what: str) -> pd.DataFrame:
    """The rows whose ``split`` column reads ``split``; every row for an empty one."""
    if not split:
        return table
    if "split" not in table.columns:
        raise InvalidInput(f"{what} has no split column to pick {split!r} rows from")
    chosen = table.loc[table["split"] == split]
    if chosen.empty:
        raise InvalidInput(f"{what} has no rows of split {split!r}")
    return chosen


# --- metrics and slide scores ---------------------------------------------------------


def level_metrics(
    table: pd.DataFrame,
    method: str,
    top_k: int,
    *,
    resamples: int,
    confidence: float,
    seed: int,
) -> LevelMetrics:
    """Patch- and slide-level metrics of a patch table (see ``patch_and_slide_metrics``)."""
    table = with_probability(table)
    check_numeric(table, ("label", "probability"), "table")
    return patch_and_slide_metrics(
        table, method, top_k, resamples=resamples, confidence=confidence, seed=seed
    )


def slide_scores(table: pd.DataFrame, method: str, top_k: int = TOP_K) -> pd.DataFrame:
    """One row per slide (``SLIDE_COLUMNS``; ``label`` only when the patches have one).

    Labelled tables go through ``aggregate.aggregate_slides``; unlabelled ones (e.g.
    fresh predictions) are aggregated the same way after checking the probabilities.
    """
    check_aggregation(method, top_k)
    table = with_probability(table)
    check_numeric(table, ("label", "probability"), "table")
    if "label" in table.columns:
        return aggregate_slides(table, method, top_k)
    missing = [c for c in ("slide_id", "probability") if c not in table.columns]
    if missing:
        raise InvalidInput(
            f"the table lacks column(s) {', '.join(missing)} "
            f"(it has {', '.join(table.columns) or 'none'})"
        )
    if table.empty:
        raise InvalidInput("no patches to aggregate (the table is empty)")
    probability = pd.to_numeric(table["probability"], errors="coerce").to_numpy(np.float64)
    if np.isnan(probability).any():
        rows = ", ".join(str(int(r)) for r in np.flatnonzero(np.isnan(probability))[:10])
        raise InvalidInput(f"probabilities contain NaN at rows {rows}")
    outside = (probability < 0) | (probability > 1)
    if outside.any():
        rows = ", ".join(str(int(r)) for r in np.flatnonzero(outside)[:10])
        raise InvalidInput(f"probabilities outside [0, 1] at rows {rows}")
    for column in ("slide_id", "patient_id"):
        if column in table.columns and table[column].isna().any():
            raise InvalidInput(f"{column} is missing for some rows")
    slide = table["slide_id"].astype(str)
    patient = table["patient_id"].astype(str) if "patient_id" in table.columns else slide
    patches = pd.DataFrame({"slide_id": slide, "patient_id": patient, "probability": probability})
    if (patches.groupby("slide_id")["patient_id"].nunique() > 1).any():
        raise InvalidInput("some slides belong to more than one patient")
    grouped = patches.groupby("slide_id", sort=True)
    score = slide_probability(grouped, method, top_k)
    return pd.DataFrame(
        {
            "slide_id": score.index.astype(str),
            "patient_id": grouped["patient_id"].first().to_numpy(),
            "probability": score.to_numpy(np.float64),
            "patch_count": grouped.size().to_numpy(np.int64),
        }
    )


def metrics_json(result: LevelMetrics, biomarker: str | None) -> dict[str, Any]:
    """The stored metrics document: the CLI's ``--json`` shape plus the biomarker."""
    return {"biomarker": biomarker, **result.as_dict()}


# --- curve sets ---------------------------------------------------------------------


def curve_set(name: str, level: str, scored: pd.DataFrame, report: MetricReport) -> CurveSet:
    """The ROC, PR and MCC-F1 curves of checked scores (``validate_patch_table``'s
    columns) with the values of ``report``; intervals only when it has them."""
    labels = scored["label"].to_numpy()
    probabilities = scored["probability"].to_numpy()
    roc = roc_curve(labels, probabilities)
    pr = pr_curve(labels, probabilities)
    best = mcc_f1(labels, probabilities)

    def interval(low: float, high: float) -> tuple[float, float] | None:
        return None if report.auroc.confidence == 0 or math.isnan(low) else (low, high)

    return CurveSet(
        name=name,
        level="patch" if level == "patch" else "slide",
        fpr=roc.fpr,
        tpr=roc.tpr,
        precision=pr.precision,
        recall=pr.recall,
        mcc_f1_points=np.column_stack([best.curve.f1, best.curve.normalized_mcc]),
        auroc=report.auroc.value,
        auprc=report.auprc.value,
        mcc_f1=report.mcc_f1.value,
        prevalence=report.positive_count / report.count,
        auroc_ci=interval(report.auroc.ci_low, report.auroc.ci_high),
        auprc_ci=interval(report.auprc.ci_low, report.auprc.ci_high),
    )


def _checked_levels(
    rows_by_level: dict[str, pd.DataFrame], name: str, what: str
) -> dict[str, pd.DataFrame]:
    """Checked scores per level; the slide level made from the patches (mean) when
    only patches are given."""
    scored: dict[str, pd.DataFrame] = {}
    for level, rows in rows_by_level.items():
        try:
            check_numeric(rows.reset_index(drop=True), ("label", "probability"), "rows")
            scored[level] = validate_patch_table(rows)
        except InvalidInput as exc:
            raise InvalidInput(f"{what}, {name}, {level} level: {exc}") from None
    if "slide" not in scored:
        scored["slide"] = aggregate_slides(scored["patch"], "mean")
    return scored


def _level_curves(
    name: str, scored: dict[str, pd.DataFrame], what: str, *, resamples: int, seed: int
) -> list[CurveSet]:
    curves = []
    for level, rows in scored.items():
        try:
            report = compute_metrics(
                rows["label"], rows["probability"], rows["patient_id"],
                resamples=resamples, seed=seed,
            )  # fmt: skip
        except InvalidInput as exc:
            raise InvalidInput(f"{what}, {name}, {level} level: {exc}") from None
        curves.append(curve_set(name, level, rows, report))
    return curves


def prediction_curves(
    predictions: pd.DataFrame, *, resamples: int, seed: int
) -> tuple[list[CurveSet], list[ReliabilitySet]]:
    """Patch and slide curves per biomarker, and a reliability diagram per biomarker
    (patch level, or slide level when only slides are given).

    Raises:
        InvalidInput: Naming the biomarker and level whose rows are bad.
    """
    table = with_probability(predictions)
    if table.empty:
        raise InvalidInput("predictions: the table is empty")
    if "biomarker" in table.columns:
        if table["biomarker"].isna().any():
            raise InvalidInput("predictions: biomarker is missing for some rows")
        names = table["biomarker"].astype(str)
    else:
        names = pd.Series(ALL_SCORES, index=table.index)
    if "level" in table.columns:
        levels = table["level"].astype(str).str.lower()
        unknown = sorted(set(levels) - set(LEVELS))
        if unknown:
            raise InvalidInput(f"predictions: level must be patch or slide, got {unknown[:5]}")
    else:
        levels = pd.Series("patch", index=table.index)
    curves: list[CurveSet] = []
    reliability: list[ReliabilitySet] = []
    for name in dict.fromkeys(names):
        given = {
            level: table.loc[(names == name) & (levels == level)]
            for level in LEVELS
            if ((names == name) & (levels == level)).any()
        }
        scored = _checked_levels(given, name, "predictions")
        curves += _level_curves(name, scored, "predictions", resamples=resamples, seed=seed)
        first = scored.get("patch", scored["slide"])
        reliability.append(
            ReliabilitySet(
                name=f"{name} ({'patch' if 'patch' in scored else 'slide'} level)",
                probabilities_by_name={CALIBRATED: first["probability"].to_numpy()},
                labels=first["label"].to_numpy(),
            )
        )
    return curves, reliability


def biomarker_curves(
    biomarker: str,
    patches: pd.DataFrame,
    *,
    split: str = "",
    probabilities_name: str = "",
    resamples: int = 0,
    seed: int = 0,
) -> tuple[list[CurveSet], ReliabilitySet]:
    """One biomarker's patch and slide curves (slide score = mean patch probability)
    and its patch-level reliability diagram, titled with its upper-case name.

    Args:
        biomarker: Its name, e.g. ``tp53``.
        patches: Scored patches (``slide_id``, ``label``, ``probability``, optionally
            ``patient_id`` and ``split``).
        split: Only the rows of this split (e.g. ``validation``); all when empty.
        probabilities_name: Their name in the diagram; ``calibrated`` when empty.
        resamples: Bootstrap resamples over patients for the intervals (0: none).
        seed: Seed of the bootstrap.

    Raises:
        InvalidInput: Naming the biomarker and level whose rows are bad.
    """
    name = biomarker.upper()
    what = f"scores of {biomarker}"
    rows = select_split(with_probability(patches), split, what)
    scored = _checked_levels({"patch": rows}, name, what)
    curves = _level_curves(name, scored, what, resamples=resamples, seed=seed)
    reliability = ReliabilitySet(
        name=name,
        probabilities_by_name={
            probabilities_name or CALIBRATED: scored["patch"]["probability"].to_numpy()
        },
        labels=scored["patch"]["label"].to_numpy(),
    )
    return curves, reliability
