"""Temperature scaling (Guo et al. 2017) and the calibration scores around it.

q = softmax(z / T) with one scalar T > 0 fitted on held-out logits by minimizing the
negative log-likelihood. T does not change which class is largest, so accuracy is
unchanged; only confidence moves.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from services.common.errors import InvalidInput

#: Bins of the expected calibration error (the usual 15, equal width).
ECE_BINS = 15


@dataclass(frozen=True)
class CalibrationScores:
    """How well probabilities match outcomes (lower is better for all three).

    Attributes:
        ece: Expected calibration error of the top-class confidence, 15 equal bins.
        nll: Mean negative log-likelihood of the true class, nats.
        brier: Mean squared error of the probability vector against the one-hot label.
        accuracy: Fraction of top-class calls that are right.
    """

    ece: float
    nll: float
    brier: float
    accuracy: float


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature with the scores before and after it."""

    temperature: float
    before: CalibrationScores
    after: CalibrationScores

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise InvalidInput(f"logits must be (N, classes >= 2), got {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise InvalidInput(f"labels must be ({logits.shape[0]},), got {labels.shape}")
    if logits.shape[0] == 0:
        raise InvalidInput("no samples to calibrate on")
    if not np.isfinite(logits).all():
        raise InvalidInput("logits contain NaN or infinity")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise InvalidInput("labels must be class indices within the logits' classes")
    return logits, labels.astype(np.int64)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, numerically stable."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE of the top-class confidence: sum over equal-width bins of
    (bin share) x |accuracy - mean confidence|.

    ``probabilities`` is (N, classes), or (N,) for the positive class of a binary task.
    """
    p = np.asarray(probabilities, np.float64)
    if p.ndim == 1:
        p = np.stack([1 - p, p], axis=1)
    labels = np.asarray(labels).astype(np.int64)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Right-closed bins, the first also closed on the left: a confidence of exactly
    # 1.0 lands in the last bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def scores(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> CalibrationScores:
    """ECE, NLL, Brier score and accuracy of ``softmax(logits / T)``."""
    logits, labels = _check(logits, labels)
    p = softmax(logits, temperature)
    rows = np.arange(len(labels))
    nll = float(-np.log(np.clip(p[rows, labels], 1e-12, 1.0)).mean())
    onehot = np.zeros_like(p)
    onehot[rows, labels] = 1.0
    brier = float(((p - onehot) ** 2).sum(axis=1).mean())
    accuracy = float((p.argmax(axis=1) == labels).mean())
    return CalibrationScores(expected_calibration_error(p, labels), nll, brier, accuracy)


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, max_iterations: int = 200
) -> TemperatureFit:
    """Fit T by minimizing the NLL of ``softmax(logits / T)`` over log T (LBFGS).

    Optimizing log T keeps T positive without constraints. T is clipped to
    [0.05, 100] so a degenerate validation set cannot produce an absurd model.

    Raises:
        InvalidInput: Malformed logits or labels.
    """
    logits, labels = _check(logits, labels)
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=0.5, max_iter=max_iterations, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(np.clip(log_t.exp().item(), 0.05, 100.0))
    return TemperatureFit(temperature, scores(logits, labels), scores(logits, labels, temperature))


def reliability_diagram(
    probabilities_by_name: dict[str, np.ndarray],
    labels: np.ndarray,
    path: Path,
    title: str = "Reliability",
    bins: int = ECE_BINS,
) -> Path:
    """Write a reliability diagram PNG: accuracy vs confidence per bin, one line per
    named set of probabilities (e.g. before and after temperature scaling), with
    the ECE in the legend and the share of samples per bin below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels).astype(np.int64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    for (name, probabilities), colour in zip(
        probabilities_by_name.items(),
        ("tab:red", "tab:blue", "tab:green", "tab:purple"),
        strict=False,
    ):
        p = np.asarray(probabilities, np.float64)
        if p.ndim == 1:
            p = np.stack([1 - p, p], axis=1)
        confidence = p.max(axis=1)
        correct = p.argmax(axis=1) == labels
        which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
        accuracy = np.full(bins, np.nan)
        share = np.zeros(bins)
        for b in range(bins):
            members = which == b
            share[b] = members.mean()
            if members.any():
                accuracy[b] = correct[members].mean()
        ece = expected_calibration_error(p, labels, bins)
        top.plot(centres, accuracy, marker="o", color=colour, label=f"{name} (ECE {ece:.3f})")
        bottom.bar(centres, share, width=1 / bins, alpha=0.4, color=colour, edgecolor=colour)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(title)
    top.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("confidence (top class)")
    bottom.set_ylabel("share")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
