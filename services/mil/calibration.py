"""Per-task temperature scaling of binary logits.

A binary task's calibrated probability is sigmoid(z / T_t), with one temperature
per task. sigmoid(z / T) is the positive class of softmax([0, z] / T), so the fit,
the scores (ECE of the top-class confidence in 15 bins, NLL, Brier summed over both
classes, accuracy at 0.5) and the reliability diagrams are those of
:mod:`services.inference.calibration`, applied to the two-column logits [0, z].

T is kept within [:data:`MIN_TEMPERATURE`, :data:`MAX_TEMPERATURE`]: a validation set
that the model separates perfectly (common with a few dozen bags) has its NLL
minimum at T -> 0, infinite confidence that no new slide deserves; a task the model
has not learned has it at T -> infinity, where 20 is already p ~ 0.5. A task is
only fitted when its validation labels hold both classes (:data:`MIN_PER_CLASS`
each); otherwise, or when the fit would not lower the validation NLL, T stays 1 and
``fitted`` is False.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from services.common.errors import InvalidInput
from services.inference.calibration import fit_temperature, reliability_diagram, scores

#: Known validation labels each class needs before a task's T is fitted.
MIN_PER_CLASS = 2
#: Bounds of a fitted temperature (see the module docstring).
MIN_TEMPERATURE = 0.25
MAX_TEMPERATURE = 20.0


@dataclass(frozen=True)
class TaskCalibration:
    """One task's temperature and its validation scores before and after.

    Attributes:
        task: The task (biomarker).
        temperature: T > 0; calibrated p = sigmoid(logit / T).
        fitted: False when T was left at 1 (too few labels, or no NLL gain).
        n: Validation bags with a known label for this task.
        positives: How many of them are positive.
        ece_before, ece_after: Expected calibration error, 15 bins (NaN if n = 0).
        nll_before, nll_after: Mean negative log-likelihood, nats (NaN if n = 0).
    """

    task: str
    temperature: float
    fitted: bool
    n: int
    positives: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def two_class(logits: np.ndarray) -> np.ndarray:
    """Binary logits (n,) as the two-class logits [0, z] (n, 2)."""
    z = np.asarray(logits, np.float64).reshape(-1)
    return np.stack([np.zeros_like(z), z], axis=1)


def sigmoid(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """sigmoid(z / T), computed without overflow."""
    return 0.5 * (1.0 + np.tanh(np.asarray(z, np.float64) / (2.0 * temperature)))


def fit_task_temperature(task: str, logits: np.ndarray, labels: np.ndarray) -> TaskCalibration:
    """Fit T for one binary task on validation logits; NaN labels are left out.

    Args:
        task: Its name.
        logits: (n,) validation logits.
        labels: (n,) 1, 0 or NaN (unknown).
    """
    z = np.asarray(logits, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1)
    if z.shape != y.shape:
        raise InvalidInput(f"task {task}: {len(z)} logits but {len(y)} labels")
    known = ~np.isnan(y)
    z, y = z[known], y[known]
    if ((y != 0) & (y != 1)).any():
        raise InvalidInput(f"task {task}: labels must be 0, 1 or NaN")
    positives = int(y.sum())
    if len(y) == 0:
        nan = float("nan")
        return TaskCalibration(task, 1.0, False, 0, 0, nan, nan, nan, nan)
    pair, classes = two_class(z), y.astype(np.int64)
    before = scores(pair, classes)
    if min(positives, len(y) - positives) < MIN_PER_CLASS:
        return TaskCalibration(
            task, 1.0, False, len(y), positives, before.ece, before.ece, before.nll, before.nll
        )
    fitted = float(
        np.clip(fit_temperature(pair, classes).temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
    )
    after = scores(pair, classes, fitted)
    if not after.nll < before.nll:
        # T = 1 is already at least as good (or the bounds cut the fit off): keep it.
        return TaskCalibration(
            task, 1.0, False, len(y), positives, before.ece, before.ece, before.nll, before.nll
        )
    return TaskCalibration(
        task, fitted, True, len(y), positives, before.ece, after.ece, before.nll, after.nll
    )


def fit_task_temperatures(
    tasks: Sequence[str], logits: np.ndarray, labels: np.ndarray
) -> list[TaskCalibration]:
    """:func:`fit_task_temperature` for each column of (n, T) logits and labels."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    if z.shape != y.shape or z.ndim != 2 or z.shape[1] != len(tasks):
        raise InvalidInput(f"logits {z.shape} and labels {y.shape} must both be (n, {len(tasks)})")
    return [fit_task_temperature(task, z[:, t], y[:, t]) for t, task in enumerate(tasks)]


def reliability_diagrams(
    calibrations: Sequence[TaskCalibration],
    logits: np.ndarray,
    labels: np.ndarray,
    folder: str | Path,
    prefix: str = "reliability",
) -> dict[str, Path]:
    """One reliability diagram PNG per task with known labels: before and after T.

    Args:
        calibrations: One per column of ``logits``, in order.
        logits: (n, T) validation logits.
        labels: (n, T) 1, 0 or NaN.
        folder: Where to write ``{prefix}_{task}.png``.

    Returns:
        Task -> the PNG written (tasks without known labels are skipped).
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    out: dict[str, Path] = {}
    for t, calibration in enumerate(calibrations):
        known = ~np.isnan(y[:, t])
        if not known.any():
            continue
        zt = z[known, t]
        out[calibration.task] = reliability_diagram(
            {
                "before": sigmoid(zt),
                f"after (T={calibration.temperature:.2f})": sigmoid(zt, calibration.temperature),
            },
            y[known, t].astype(np.int64),
            Path(folder) / f"{prefix}_{calibration.task}.png",
            title=f"{calibration.task}: validation, {int(known.sum())} bags",
        )
    return out
