"""Site-aware folds and patient bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from services.analysis.metrics import auroc
from services.common.errors import InvalidInput
from services.mil.folds import bootstrap_ci, patient_sites, site_folds, site_of


@pytest.mark.parametrize(
    ("identifier", "site"),
    [
        ("TCGA-A2-A0T2-01Z-00-DX1", "A2"),
        ("TCGA-A2-A0T2", "A2"),
        ("tcga-e9-a1nd-01a", "E9"),
        ("SYN-SA-0002-01Z-00-DX1", "SA"),
        ("SYN-SF-0107", "SF"),
    ],
)
def test_site_of_reads_the_tissue_source_site(identifier: str, site: str) -> None:
    assert site_of(identifier) == site


@pytest.mark.parametrize("identifier", ["A2-A0T2", "TCGA-A0T2", "patient-7", ""])
def test_site_of_refuses_ids_without_a_site(identifier: str) -> None:
    with pytest.raises(InvalidInput, match="give the sites explicitly"):
        site_of(identifier)


def test_patient_sites_prefer_the_manifest_column() -> None:
    table = pd.DataFrame(
        {
            "patient_id": ["SYN-SA-0001", "SYN-SA-0001", "P-7", "TCGA-A2-A0T2"],
            "site": ["SC", "SC", "LAB1", ""],
        }
    )
    assert patient_sites(table) == {"SYN-SA-0001": "SC", "P-7": "LAB1", "TCGA-A2-A0T2": "A2"}
    table.loc[1, "site"] = "SD"
    with pytest.raises(InvalidInput, match="two sites"):
        patient_sites(table)


def _cohort(seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """12 sites of very different sizes; 6 tasks with some unknown labels."""
    rng = np.random.default_rng(seed)
    sizes = [40, 31, 25, 22, 18, 15, 12, 10, 8, 6, 5, 3]
    patients, sites = [], []
    for s, size in enumerate(sizes):
        code = f"S{s:X}"
        patients += [f"TCGA-{code}-{i:04d}" for i in range(size)]
        sites += [code] * size
    labels = (rng.random((len(patients), 6)) < [0.3, 0.3, 0.7, 0.6, 0.15, 0.2]).astype(float)
    labels[rng.random(labels.shape) < 0.1] = np.nan
    return patients, sites, labels


def test_folds_keep_sites_whole_and_cover_every_patient_once() -> None:
    patients, sites, labels = _cohort()
    folds = site_folds(patients, sites, labels, k=5, seed=0)
    assert folds.shape == (len(patients),) and folds.dtype == np.int64
    assert set(folds) == set(range(5))
    table = pd.DataFrame({"site": sites, "fold": folds})
    assert (table.groupby("site")["fold"].nunique() == 1).all()
    # Sizes: 195 patients in 5 folds is 39 each; the largest site is 40.
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 8, sizes

    # Positives of each task: spread better than almost any random whole-site split.
    def spread(assigned: np.ndarray) -> float:
        positives = np.stack(
            [np.bincount(assigned, weights=labels[:, t] == 1, minlength=5) for t in range(6)]
        )
        return float(((positives - positives.mean(axis=1, keepdims=True)) ** 2).sum())

    codes = np.unique(sites, return_inverse=True)[1]
    rng = np.random.default_rng(1)
    random_spreads = [spread(rng.integers(0, 5, 12)[codes]) for _ in range(300)]
    assert spread(folds) < np.quantile(random_spreads, 0.05)


def test_folds_depend_on_the_seed_only_through_ties_and_repeat() -> None:
    patients, sites, labels = _cohort()
    a = site_folds(patients, sites, labels, k=4, seed=1)
    np.testing.assert_array_equal(a, site_folds(patients, sites, labels, k=4, seed=1))


def test_sites_are_read_from_ids_when_not_given() -> None:
    patients, sites, _ = _cohort()
    by_id = site_folds(patients, None, None, k=3)
    assert (pd.DataFrame({"s": sites, "f": by_id}).groupby("s")["f"].nunique() == 1).all()


def test_exactly_k_sites_give_one_site_per_fold() -> None:
    patients = [f"SYN-S{c}-{i:04d}" for c in "ABC" for i in range(5)]
    folds = site_folds(patients, None, None, k=3)
    assert sorted(np.bincount(folds)) == [5, 5, 5]


def test_too_few_sites_or_bad_input_are_refused() -> None:
    patients = [f"SYN-S{c}-{i:04d}" for c in "AB" for i in range(5)]
    with pytest.raises(InvalidInput, match="2 site\\(s\\) for 3 folds"):
        site_folds(patients, None, None, k=3)
    with pytest.raises(InvalidInput, match="unique"):
        site_folds(patients + patients[:1], None, None, k=2)
    with pytest.raises(InvalidInput, match="k must be >= 2"):
        site_folds(patients, None, None, k=1)
    with pytest.raises(InvalidInput, match="empty"):
        site_folds(patients, ["A"] * 9 + [""], None, k=2)


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    return y, 1 / (1 + np.exp(-(1.2 * (y - 0.5) + rng.normal(0, 1, n))))


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_patients() -> None:
    widths = []
    for n in (60, 600):
        y, p = _scores(n, seed=n)
        estimate, low, high = bootstrap_ci(y, p, n=400, seed=0)
        assert estimate == pytest.approx(auroc(y, p))
        assert low <= estimate <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_bootstrap_leaves_out_unknown_labels_and_takes_any_metric() -> None:
    y, p = _scores(100, seed=1)
    with_nan = np.r_[y, np.nan, np.nan]
    scores = np.r_[p, 0.1, 0.9]
    assert bootstrap_ci(with_nan, scores, n=50) == bootstrap_ci(y, p, n=50)

    def accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
        return float(((probabilities >= 0.5) == labels).mean())

    estimate, low, high = bootstrap_ci(y, p, metric=accuracy, n=200)
    assert low <= estimate <= high and estimate == accuracy(y, p)
    with pytest.raises(InvalidInput, match="only one class"):
        bootstrap_ci(np.ones(5), np.full(5, 0.5))
