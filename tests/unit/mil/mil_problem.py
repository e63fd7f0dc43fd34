"""A small synthetic multiple-instance problem shared by the MIL tests.

Bags of Gaussian instances in D = 16; a bag positive for task t holds a few
instances shifted along axis t (the planted ones), so each task's label is decided
by a handful of its instances, as a biomarker by a few regions of a slide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIM = 16
TASKS = 6
SHIFT = 4.0
PLANTED = 3


@dataclass(frozen=True)
class MilProblem:
    """Bags, their true labels (no NaN) and which instances were planted per task."""

    bags: list[np.ndarray]
    labels: np.ndarray  # (n, T) 0/1
    planted: list[list[np.ndarray]]  # [bag][task] -> instance rows shifted for that task


def make_problem(n_bags: int, seed: int) -> MilProblem:
    """``n_bags`` bags of 20-60 instances with independent 0/1 labels per task."""
    rng = np.random.default_rng(seed)
    bags, planted = [], []
    labels = (rng.random((n_bags, TASKS)) < 0.5).astype(np.float64)
    for i in range(n_bags):
        n = int(rng.integers(20, 61))
        x = rng.normal(size=(n, DIM)).astype(np.float32)
        rows = rng.permutation(n)
        per_task = []
        for t in range(TASKS):
            mine = rows[t * PLANTED : (t + 1) * PLANTED] if labels[i, t] else rows[:0]
            x[mine, t] += SHIFT
            per_task.append(np.sort(mine))
        bags.append(x)
        planted.append(per_task)
    return MilProblem(bags, labels, planted)


def hide(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A copy of ``labels`` with about ``fraction`` of the entries set to NaN."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    out[rng.random(out.shape) < fraction] = np.nan
    return out
