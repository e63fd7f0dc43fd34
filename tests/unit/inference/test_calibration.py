"""Temperature scaling and calibration scores on known cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss

from services.common.errors import InvalidInput
from services.inference.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability_diagram,
    scores,
    softmax,
)


def _overconfident(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model that is right 80% of the time but says ~99%."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    right = rng.random(n) < 0.8
    called = np.where(right, labels, 1 - labels)
    margin = rng.normal(5.0, 1.0, n)  # sigmoid(5) ~ 0.993
    logits = np.zeros((n, 2))
    logits[np.arange(n), called] = margin
    return logits, labels


def test_temperature_repairs_an_overconfident_model_without_changing_accuracy() -> None:
    logits, labels = _overconfident()
    fit = fit_temperature(logits, labels)
    assert fit.temperature > 2.0
    assert fit.after.ece < fit.before.ece / 4 and fit.after.ece < 0.03
    assert fit.after.nll < fit.before.nll and fit.after.brier < fit.before.brier
    assert fit.after.accuracy == fit.before.accuracy == pytest.approx(0.8, abs=0.02)
    # Held-out data from the same model: the fitted T generalizes.
    test_logits, test_labels = _overconfident(seed=1)
    held_out = scores(test_logits, test_labels, fit.temperature)
    assert held_out.ece < scores(test_logits, test_labels).ece / 3


def test_calibrated_model_keeps_temperature_near_one() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (5000, 2))
    labels = (rng.random(5000) < softmax(logits)[:, 1]).astype(int)
    assert fit_temperature(logits, labels).temperature == pytest.approx(1.0, abs=0.1)


def test_scores_match_scikit_learn() -> None:
    logits, labels = _overconfident(500)
    p = softmax(logits)
    result = scores(logits, labels)
    assert result.nll == pytest.approx(log_loss(labels, p), rel=1e-6)
    # Our Brier sums over both classes: twice the binary definition.
    assert result.brier == pytest.approx(2 * brier_score_loss(labels, p[:, 1]), rel=1e-6)


def test_ece_by_hand() -> None:
    # Two samples at confidence 0.95 (one right), two at 0.55 (both right).
    p = np.array([[0.05, 0.95], [0.95, 0.05], [0.45, 0.55], [0.55, 0.45]])
    labels = np.array([1, 1, 1, 0])
    expected = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.55)
    assert expected_calibration_error(p, labels) == pytest.approx(expected)
    assert expected_calibration_error(p[:, 1], labels) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("logits", "labels"),
    [
        (np.zeros((3,)), np.zeros(3)),
        (np.zeros((3, 2)), np.zeros(2)),
        (np.full((2, 2), np.nan), np.zeros(2)),
        (np.zeros((2, 2)), np.array([0, 2])),
        (np.zeros((0, 2)), np.zeros(0)),
    ],
)
def test_bad_input_is_refused(logits: np.ndarray, labels: np.ndarray) -> None:
    with pytest.raises(InvalidInput):
        fit_temperature(logits, labels)


def test_reliability_diagram_is_a_png(tmp_path: Path) -> None:
    logits, labels = _overconfident(1000)
    fit = fit_temperature(logits, labels)
    path = reliability_diagram(
        {"before": softmax(logits), "after": softmax(logits, fit.temperature)},
        labels,
        tmp_path / "reliability.png",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_an_overconfident_network_is_calibrated_by_temperature() -> None:
    """A real classifier made over-confident by scaling its logits: T repairs it."""
    import torch

    rng = np.random.default_rng(4)

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = rng.integers(0, 2, n)
        features = rng.normal(0, 1, (n, 8)) + 0.6 * labels[:, None]  # overlapping classes
        return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=100)
    x_train, y_train = data(2000)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x_train), y_train)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():  # over-confidence, as from overfitting: logits x8
        model.weight *= 8
        model.bias *= 8
    x_val, y_val = data(3000)
    with torch.no_grad():
        logits = model(x_val).numpy()
    fit = fit_temperature(logits, y_val.numpy())
    assert fit.temperature > 4
    assert fit.before.ece > 0.1 and fit.after.ece < fit.before.ece / 3
    assert fit.after.accuracy == fit.before.accuracy
