"""Per-task temperature scaling of binary logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.errors import InvalidInput
from services.mil.calibration import (
    MIN_TEMPERATURE,
    fit_task_temperature,
    fit_task_temperatures,
    reliability_diagrams,
    sigmoid,
)


def _drawn(temperature: float, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true probability is sigmoid(z / temperature)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 4.0, n)
    y = (rng.random(n) < sigmoid(z, temperature)).astype(np.float64)
    return z, y


@pytest.mark.parametrize("truth", [0.5, 3.0])
def test_the_fit_recovers_the_temperature_and_lowers_nll(truth: float) -> None:
    z, y = _drawn(truth)
    fit = fit_task_temperature("tp53", z, y)
    assert fit.fitted and fit.temperature == pytest.approx(truth, rel=0.1)
    assert fit.nll_after < fit.nll_before and fit.ece_after < fit.ece_before
    assert (fit.n, fit.positives) == (len(y), int(y.sum()))


def test_unknown_labels_are_left_out() -> None:
    z, y = _drawn(2.0, n=1000)
    with_nan = np.r_[y, [np.nan] * 50]
    wild = np.r_[z, np.full(50, 1e6)]
    assert fit_task_temperature("er", wild, with_nan) == fit_task_temperature("er", z, y)


def test_a_separable_set_stops_at_the_lower_bound() -> None:
    z = np.r_[np.linspace(-3, -1, 20), np.linspace(1, 3, 20)]
    y = np.r_[np.zeros(20), np.ones(20)]
    fit = fit_task_temperature("her2", z, y)
    assert fit.temperature == MIN_TEMPERATURE and fit.nll_after < fit.nll_before


def test_too_few_labels_of_a_class_keep_t_at_one() -> None:
    fit = fit_task_temperature("pr", np.array([2.0, 1.0, -3.0]), np.array([1.0, 1.0, 0.0]))
    assert (fit.temperature, fit.fitted, fit.n) == (1.0, False, 3)
    assert fit.nll_after == fit.nll_before
    empty = fit_task_temperature("pr", np.array([1.0]), np.array([np.nan]))
    assert (empty.n, empty.fitted) == (0, False) and np.isnan(empty.nll_before)


def test_shapes_and_labels_are_checked() -> None:
    with pytest.raises(InvalidInput, match="must both be"):
        fit_task_temperatures(["a", "b"], np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(InvalidInput, match="0, 1 or NaN"):
        fit_task_temperature("a", np.zeros(3), np.array([0.0, 2.0, 1.0]))


def test_reliability_diagrams_skip_tasks_without_labels(tmp_path: Path) -> None:
    z, y = _drawn(2.0, n=300)
    logits = np.column_stack([z, z])
    labels = np.column_stack([y, np.full_like(y, np.nan)])
    calibrations = fit_task_temperatures(["tp53", "pik3ca"], logits, labels)
    written = reliability_diagrams(calibrations, logits, labels, tmp_path)
    assert list(written) == ["tp53"]
    assert written["tp53"] == tmp_path / "reliability_tp53.png"
    assert written["tp53"].read_bytes()[:4] == b"\x89PNG"
