"""Slide scores from the PredictionService's answers, and the held-out AUROC table.

Slide scores: for cancer vs normal, the share of the slide's tissue patches the
calibrated cancer detector calls cancer (``cancer_patch_fraction``); for a
biomarker, the mean calibrated probability of the slide's 40x cancer patches (the
method's slide score). Biomarkers are scored on the cancer slides only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from services.analysis.metrics import auroc
from services.common.vocabulary import BIOMARKERS

#: The row of the cancer-vs-normal task in the table.
CANCER_TASK = "cancer"


@dataclass(frozen=True)
class TaskResult:
    """The held-out result of one task.

    Attributes:
        task: ``cancer`` or a biomarker name.
        auroc: Slide-level AUROC (0-1); NaN when a class is missing.
        slides: Slides scored.
        positives: Of them, positive (cancer, mutated, +, Basal).
        target: The AUROC the demo aims for.
        note: Why a task has no AUROC, or how many slides lacked a score.
    """

    task: str
    auroc: float
    slides: int
    positives: int
    target: float
    note: str = ""

    @property
    def met(self) -> bool:
        return bool(np.isfinite(self.auroc) and self.auroc >= self.target)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["auroc"] = None if not math.isfinite(self.auroc) else round(self.auroc, 4)
        out["met"] = self.met
        return out


def slide_table(
    heldout: pd.DataFrame, predictions: Mapping[str, Mapping[str, Any]]
) -> pd.DataFrame:
    """One row per held-out slide: truth and predicted scores.

    Args:
        heldout: Manifest rows of the held-out slides.
        predictions: Slide id -> the SlidePrediction as a dict (``client.to_dict``),
            with biomarker probabilities under ``biomarkers``.

    Returns:
        Columns ``slide_id``, ``patient_id``, ``kind``, ``status``, ``cancer_score``,
        then per biomarker its label and ``{name}_probability`` (NaN when the
        prediction has none).
    """
    rows = []
    for row in heldout.itertuples(index=False):
        prediction = predictions.get(str(row.slide_id), {})
        probabilities = {
            str(item["biomarker"]).removeprefix("BIOMARKER_").lower(): float(item["probability"])
            for item in prediction.get("biomarkers", [])
        }
        out: dict[str, Any] = {
            "slide_id": row.slide_id,
            "patient_id": row.patient_id,
            "kind": row.kind,
            "status": str(prediction.get("status", "missing")),
            "cancer_score": float(prediction.get("cancer_patch_fraction", math.nan)),
        }
        for name in BIOMARKERS:
            value = getattr(row, name)
            out[name] = None if pd.isna(value) else int(value)
            out[f"{name}_probability"] = probabilities.get(name, math.nan)
        rows.append(out)
    return pd.DataFrame(rows)


def _result(task: str, labels: np.ndarray, scores: np.ndarray, target: float) -> TaskResult:
    scored = np.isfinite(scores)
    note = f"{int((~scored).sum())} slide(s) without a score left out" if (~scored).any() else ""
    labels, scores = labels[scored], scores[scored]
    positives = int(labels.sum())
    if positives == 0 or positives == len(labels):
        return TaskResult(task, math.nan, len(labels), positives, target, "one class only")
    return TaskResult(task, float(auroc(labels, scores)), len(labels), positives, target, note)


def heldout_results(
    table: pd.DataFrame,
    biomarkers: Sequence[str],
    cancer_target: float = 0.95,
    biomarker_target: float = 0.75,
) -> list[TaskResult]:
    """Slide-level AUROC per task on the held-out slides (see the module doc)."""
    results = [
        _result(
            CANCER_TASK,
            (table["kind"] == "cancer").to_numpy(np.int64),
            table["cancer_score"].to_numpy(np.float64),
            cancer_target,
        )
    ]
    cancer = table[table["kind"] == "cancer"]
    for name in biomarkers:
        known = cancer[cancer[name].notna()]
        results.append(
            _result(
                name,
                known[name].to_numpy(np.int64),
                known[f"{name}_probability"].to_numpy(np.float64),
                biomarker_target,
            )
        )
    return results


def markdown_table(results: Sequence[TaskResult]) -> str:
    """The results as a Markdown table (task, AUROC, slides, positives, target)."""
    lines = [
        "| task | slide AUROC | held-out slides | positives | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        value = f"{r.auroc:.3f}" if math.isfinite(r.auroc) else "n/a"
        name = "cancer vs normal" if r.task == CANCER_TASK else r.task.upper()
        met = "yes" if r.met else "no"
        note = f" ({r.note})" if r.note else ""
        lines.append(
            f"| {name} | {value} | {r.slides} | {r.positives} | >= {r.target:.2f} | {met}{note} |"
        )
    return "\n".join(lines)
