"""Site-aware cross-validation folds and patient-level bootstrap intervals.

Slides from one tissue source site share a lab's staining and a scanner, and a model
can learn the site instead of the biology; TCGA's sites also differ in case mix. So
folds keep whole sites together (:func:`site_folds`): no site is on both sides of
any split, and a fold's score says how the model does on sites it never saw.

Sites come from the manifest's ``site`` column where it is filled, else from the
ids (:func:`site_of`): a TCGA barcode ``TCGA-A2-A0T2-01Z-00-DX1`` is site ``A2``, a
synthetic id ``SYN-SA-0002-01Z-00-DX1`` site ``SA``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from services.analysis.metrics import auroc, bootstrap
from services.common.errors import InvalidInput

#: Patient, sample or slide ids whose second field is the site: TCGA and synthetic.
_SITE_ID = re.compile(r"(?:TCGA|SYN)-([A-Z0-9]{2})-[A-Z0-9]+(?:-.*)?", re.IGNORECASE)

Metric = Callable[[np.ndarray, np.ndarray], float]


def site_of(identifier: str) -> str:
    """The tissue source site code in a TCGA or synthetic patient or slide id.

    Args:
        identifier: e.g. ``TCGA-A2-A0T2``, ``TCGA-A2-A0T2-01Z-00-DX1``,
            ``SYN-SA-0002-01Z-00-DX1``.

    Returns:
        The two-character site code, upper case (``A2``, ``SA``).

    Raises:
        InvalidInput: ``identifier`` is neither kind of id.
    """
    match = _SITE_ID.fullmatch(str(identifier).strip())
    if match is None:
        raise InvalidInput(
            f"{identifier!r} is not a TCGA or synthetic id with a site (expected e.g. "
            "TCGA-A2-A0T2-01Z-00-DX1 or SYN-SA-0002-01Z-00-DX1); give the sites explicitly"
        )
    return match.group(1).upper()


def patient_sites(table: pd.DataFrame) -> dict[str, str]:
    """Patient id -> site, from manifest rows (``patient_id``, optional ``site``).

    The ``site`` column is used where it is filled; otherwise the site is read from
    the patient id with :func:`site_of`.

    Raises:
        InvalidInput: No ``patient_id`` column, an id without a site where the column
            is empty, or one patient's slides at two sites.
    """
    if "patient_id" not in table.columns:
        raise InvalidInput("manifest rows need a patient_id column to find sites")
    given = table["site"] if "site" in table.columns else pd.Series([""] * len(table))
    out: dict[str, str] = {}
    for patient, site in zip(table["patient_id"].astype(str), given, strict=True):
        text = "" if pd.isna(site) else str(site).strip()
        code = text or site_of(patient)
        if out.setdefault(patient, code) != code:
            raise InvalidInput(f"patient {patient} has slides at two sites: {out[patient]}, {code}")
    return out


def site_folds(
    patients: Sequence[str],
    sites: Sequence[str] | None,
    labels: Any | None,
    k: int,
    seed: int = 0,
) -> np.ndarray:
    """Assign whole sites to k folds, balancing patients and each task's classes.

    Sites are placed largest first (ties in a seeded random order), each into the
    fold where it raises the imbalance least; then single sites are moved, and pairs
    of sites swapped, between folds while that lowers it. The imbalance is the sum of
    squared relative deviations from an even share (1/k of the total) of the fold's
    patient count, and (weighted 1/(2T) each) of its positive and negative patients
    per task.

    Args:
        patients: Patient ids, one per row (no repeats).
        sites: Their site codes; None reads them from the ids (:func:`site_of`).
        labels: (n, T) 1, 0 or NaN (unknown), or None to balance sizes only.
        k: Number of folds (>= 2).
        seed: Seed of the tie order.

    Returns:
        int64 (n,) fold index in [0, k) per patient; every fold non-empty.

    Raises:
        InvalidInput: Fewer distinct sites than k, k < 2, repeated patients, an empty
            site, or mismatched lengths.
    """
    ids = [str(p) for p in patients]
    n = len(ids)
    if k < 2:
        raise InvalidInput(f"k must be >= 2 folds, got {k}")
    if len(set(ids)) != n:
        raise InvalidInput("patients must be unique: give one row per patient")
    codes = [site_of(p) for p in ids] if sites is None else [str(s).strip() for s in sites]
    if len(codes) != n:
        raise InvalidInput(f"{len(codes)} sites for {n} patients")
    if any(not c for c in codes):
        raise InvalidInput("every patient needs a site; some are empty")
    y = np.zeros((n, 0)) if labels is None else np.asarray(labels, np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.shape[0] != n:
        raise InvalidInput(f"labels have {y.shape[0]} rows for {n} patients")
    names, site_index = np.unique(np.asarray(codes), return_inverse=True)
    if len(names) < k:
        raise InvalidInput(
            f"{len(names)} site(s) for {k} folds: site-aware folds need at least one site per "
            "fold; lower k"
        )
    # Per site: patients, then positives and negatives per task.
    counts = np.column_stack([np.ones(n), y == 1, y == 0]).astype(np.float64)
    per_site = np.zeros((len(names), counts.shape[1]))
    np.add.at(per_site, site_index, counts)
    fold_of_site = _assign(per_site, k, np.random.default_rng(seed))
    return fold_of_site[site_index].astype(np.int64)


def _imbalance(totals: np.ndarray, share: np.ndarray, weights: np.ndarray) -> float:
    return float((((totals - share) / share) ** 2 * weights).sum())


def _assign(per_site: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold per site minimizing :func:`_imbalance` greedily, then by local moves."""
    n_tasks = (per_site.shape[1] - 1) // 2
    share = np.maximum(per_site.sum(axis=0) / k, 1e-9)
    weights = np.r_[1.0, np.full(2 * n_tasks, 1.0 / (2 * max(n_tasks, 1)))]
    # Columns with nothing to balance (no positive of a task at all) weigh nothing.
    weights = np.where(per_site.sum(axis=0) > 0, weights, 0.0)
    n_sites = len(per_site)
    tie = rng.permutation(n_sites)
    order = np.lexsort((tie, -per_site[:, 0]))
    fold = np.full(n_sites, -1)
    totals = np.zeros((k, per_site.shape[1]))
    for s in order:
        costs = []
        for f in range(k):
            totals[f] += per_site[s]
            costs.append(_imbalance(totals, share, weights))
            totals[f] -= per_site[s]
        # A fold still empty takes the site when there are just enough sites left.
        empty = [f for f in range(k) if not (fold == f).any()]
        left = int((fold < 0).sum())
        choice = empty[0] if empty and left <= len(empty) else int(np.argmin(costs))
        fold[s] = choice
        totals[choice] += per_site[s]
    return _improve(per_site, fold, totals, share, weights, k)


def _improve(
    per_site: np.ndarray,
    fold: np.ndarray,
    totals: np.ndarray,
    share: np.ndarray,
    weights: np.ndarray,
    k: int,
    rounds: int = 50,
) -> np.ndarray:
    """Move single sites or swap pairs between folds while the imbalance drops; no
    fold is left empty."""
    current = _imbalance(totals, share, weights)
    for _ in range(rounds):
        improved = False
        for s in range(len(fold)):
            here = fold[s]
            if (fold == here).sum() > 1:
                for f in range(k):
                    if f == here:
                        continue
                    totals[here] -= per_site[s]
                    totals[f] += per_site[s]
                    cost = _imbalance(totals, share, weights)
                    if cost < current - 1e-12:
                        fold[s], here, current, improved = f, f, cost, True
                    else:
                        totals[f] -= per_site[s]
                        totals[here] += per_site[s]
            for t in range(s + 1, len(fold)):
                a, b = fold[s], fold[t]
                if a == b:
                    continue
                delta = per_site[t] - per_site[s]
                totals[a] += delta
                totals[b] -= delta
                cost = _imbalance(totals, share, weights)
                if cost < current - 1e-12:
                    fold[s], fold[t], current, improved = b, a, cost, True
                else:
                    totals[a] -= delta
                    totals[b] += delta
        if not improved:
            break
    return fold


def bootstrap_ci(
    y_true: Any,
    y_score: Any,
    metric: Metric = auroc,
    n: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """A metric over patients with its percentile bootstrap interval.

    Each resample draws as many patients as there are, with replacement; resamples
    holding one class only are skipped (see
    :func:`services.analysis.metrics.bootstrap`). Patients whose label is NaN are
    left out first.

    Args:
        y_true: (n,) 1, 0 or NaN per patient.
        y_score: (n,) probability per patient.
        metric: (labels, scores) -> value; default AUROC.
        n: Resamples.
        seed: Seed of the resampling.
        confidence: Level of the interval.

    Returns:
        (estimate, low, high); low and high are NaN when every resample was skipped.

    Raises:
        InvalidInput: Mismatched lengths, a single class, scores outside [0, 1].
    """
    y = np.asarray(y_true, np.float64).reshape(-1)
    p = np.asarray(y_score, np.float64).reshape(-1)
    if y.shape != p.shape:
        raise InvalidInput(f"{len(y)} labels but {len(p)} scores")
    known = ~np.isnan(y)
    estimates, _ = bootstrap(
        lambda labels, scores: {"value": metric(labels, scores)},
        y[known],
        p[known],
        resamples=n,
        confidence=confidence,
        seed=seed,
        unit="patient",
    )
    e = estimates["value"]
    return e.value, e.ci_low, e.ci_high
