"""The demo's side-by-side table and the MIL calls' held-out calibration."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from services.apps.demo_heldout.scores import TaskResult
from services.apps.demo_mil import calibration, comparison
from services.inference.calibration import expected_calibration_error


def _table(y: np.ndarray, p: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"kind": "cancer", "er": y.astype(float), "er_probability": p})


def test_calibration_undoes_the_temperature_for_the_before_figure() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.5).astype(np.int64)
    z = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.0, 400)  # well calibrated at T = 1
    t = 3.0
    calibrated = 1 / (1 + np.exp(-z / t))  # an over-softened answer
    [row] = calibration(_table(y, calibrated), {"er": t}, ["er"])
    assert row["slides"] == 400 and row["temperature"] == 3.0
    raw = 1 / (1 + np.exp(-z))
    assert row["ece_before"] == pytest.approx(expected_calibration_error(raw, y, 10), abs=1e-4)
    assert row["ece_after"] == pytest.approx(
        expected_calibration_error(calibrated, y, 10), abs=1e-4
    )
    assert row["ece_after"] > row["ece_before"]  # T = 3 on calibrated logits hurts


def test_slides_without_a_label_or_a_call_are_left_out() -> None:
    table = _table(np.array([1, 0, np.nan, 1]), np.array([0.8, 0.3, 0.5, math.nan]))
    [row] = calibration(table, {}, ["er"])
    assert row["slides"] == 2 and row["temperature"] == 1.0


def test_comparison_counts_where_mil_is_at_least_the_paper() -> None:
    paper = [
        TaskResult("cancer", 0.99, 10, 5, 0.97),
        TaskResult("er", 0.80, 10, 5, 0.8),
        TaskResult("pr", 0.70, 10, 5, 0.8),
        TaskResult("her2", math.nan, 10, 0, 0.8, "one class only"),
    ]
    mil = [TaskResult("er", 0.80, 10, 5, 0.8), TaskResult("pr", 0.65, 10, 5, 0.8)]
    out = comparison(paper, mil, [])
    assert [r["biomarker"] for r in out["rows"]] == ["er", "pr", "her2"]
    assert [r["mil_at_least_paper"] for r in out["rows"]] == [True, False, False]
    assert out["mil_at_least_paper"] == 1
    assert "| ER | 0.800 | 0.800 | yes |" in out["markdown"]
    assert "| HER2 | n/a | n/a | no |" in out["markdown"]
    assert "on 1 of 3 biomarkers" in out["markdown"]
