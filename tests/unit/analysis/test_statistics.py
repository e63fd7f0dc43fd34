"""Mann-Whitney U per variable, Benjamini-Hochberg, and one covariate by status."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from services.analysis.statistics import (
    COMPARISON_COLUMNS,
    benjamini_hochberg,
    compare_covariate,
    compare_groups,
)
from services.common.errors import InvalidInput


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_benjamini_hochberg_equals_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = np.r_[rng.uniform(0, 1, 40), rng.uniform(0, 0.01, 10), [0.02, 0.02, 1.0, 0.0]]
    rng.shuffle(p)
    np.testing.assert_allclose(
        benjamini_hochberg(p), stats.false_discovery_control(p, method="bh"), atol=1e-15
    )


def test_benjamini_hochberg_keeps_nan_out_of_the_count() -> None:
    q = benjamini_hochberg([0.01, np.nan, 0.04])
    np.testing.assert_allclose(q, [0.02, np.nan, 0.04])
    with pytest.raises(InvalidInput, match=r"p-values must lie in \[0, 1\]"):
        benjamini_hochberg([0.5, 1.5])


def _features(seed: int = 0, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = np.repeat([0, 1], n // 2)
    table = pd.DataFrame(
        {
            "label": label,
            "shifted": rng.normal(0, 1, n) + 1.2 * label,
            "noise": rng.normal(0, 1, n),
            "ties": rng.integers(0, 4, n).astype(float),
            "constant": np.full(n, 3.0),
            "holes": rng.normal(0, 1, n),
        }
    )
    table.loc[[0, 5, 40], "holes"] = np.nan
    return table


def test_mann_whitney_per_feature_equals_scipy() -> None:
    table = _features()
    result = compare_groups(table, "label")
    assert list(result.columns) == list(COMPARISON_COLUMNS)
    assert result["variable"].tolist() == ["shifted", "noise", "ties", "constant", "holes"]
    assert result.attrs["group_a"] == 1 and result.attrs["group_b"] == 0
    a, b = table[table["label"] == 1], table[table["label"] == 0]
    for column in ("shifted", "noise", "ties", "holes"):
        row = result.set_index("variable").loc[column]
        x, y = a[column].dropna(), b[column].dropna()
        expected = stats.mannwhitneyu(x, y, alternative="two-sided")
        assert row["u_statistic"] == pytest.approx(expected.statistic, abs=1e-12)
        assert row["p_value"] == pytest.approx(expected.pvalue, rel=1e-12)
        assert row["median_a"] == pytest.approx(np.median(x))
        assert row["median_b"] == pytest.approx(np.median(y))
        assert row["auc"] == pytest.approx(expected.statistic / (len(x) * len(y)))
        assert row["rank_biserial"] == pytest.approx(2 * row["auc"] - 1)
    np.testing.assert_allclose(
        result["q_value"], stats.false_discovery_control(result["p_value"], method="bh")
    )
    shifted = result.set_index("variable").loc["shifted"]
    assert shifted["significant"] and shifted["rank_biserial"] > 0.3


def test_nans_dropped_per_feature_and_constant_features_get_p_one() -> None:
    result = compare_groups(_features(), "label").set_index("variable")
    assert result.loc["holes", "nan_dropped"] == 3
    assert (result.loc["holes", "count_a"], result.loc["holes", "count_b"]) == (29, 28)
    assert result.loc["shifted", "nan_dropped"] == 0
    assert result.loc["constant", "p_value"] == 1.0
    assert result.loc["constant", "u_statistic"] == 30 * 30 / 2
    assert result.loc["constant", "rank_biserial"] == 0.0


def test_a_group_without_values_has_no_p_and_is_left_out_of_fdr() -> None:
    table = _features().assign(empty_in_a=lambda t: np.where(t["label"] == 1, np.nan, 1.0))
    result = compare_groups(table, "label", ["shifted", "empty_in_a"]).set_index("variable")
    assert np.isnan(result.loc["empty_in_a", "p_value"])
    assert not result.loc["empty_in_a", "significant"]
    assert result.loc["shifted", "q_value"] == result.loc["shifted", "p_value"]  # m = 1


def test_immune_score_by_tp53_status() -> None:
    rng = np.random.default_rng(4)
    slides = pd.DataFrame(
        {
            "tp53": ["mutated"] * 25 + ["wildtype"] * 35,
            "immune_score": np.r_[rng.normal(1.0, 1, 25), rng.normal(0.0, 1, 35)],
        }
    )
    result = compare_covariate(slides, "immune_score", "tp53", group_a="mutated")
    assert len(result) == 1
    row = result.iloc[0]
    expected = stats.mannwhitneyu(
        slides["immune_score"][:25], slides["immune_score"][25:], alternative="two-sided"
    )
    assert row["p_value"] == pytest.approx(expected.pvalue, rel=1e-12)
    assert row["q_value"] == row["p_value"]
    assert (row["count_a"], row["count_b"]) == (25, 35)
    assert result.attrs["group_b"] == "wildtype"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_column": "missing"}, "lacks the group column 'missing'"),
        ({"group_column": "label", "value_columns": ["nope"]}, "lacks column(s) nope"),
        ({"group_column": "label", "group_a": 7}, "group 7 is not in label"),
        ({"group_column": "label", "alternative": "bigger"}, "unknown alternative 'bigger'"),
        ({"group_column": "label", "fdr": 0}, "fdr must be strictly between 0 and 1"),
        ({"group_column": "ties"}, "ties must hold exactly two groups, found 4"),
    ],
)
def test_bad_input_is_named(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        compare_groups(_features(), **kwargs)
    assert message in str(caught.value)
