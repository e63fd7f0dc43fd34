"""Group comparisons: Mann-Whitney U per variable with Benjamini-Hochberg FDR.

Used for the nucleus features between classes (e.g. TP53-mutated vs wild-type BD
patches) and for one slide-level covariate at a time (the paper's immune score by TP53
status). The test is ``scipy.stats.mannwhitneyu`` (two-sided by default, scipy's
automatic choice of exact or asymptotic p-value). For each variable:

- NaNs are dropped per variable, and how many were dropped is reported;
- a variable with one value throughout both groups gets U = n_a·n_b/2 and p = 1;
- a variable with no values left in a group gets NaN p and q, and is left out of the
  FDR correction;
- effect sizes: ``auc`` = U_a / (n_a·n_b), the chance a value of group a exceeds one
  of group b (ties half), and ``rank_biserial`` = 2·auc − 1, in [−1, 1], positive
  when group a tends higher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from services.common.errors import InvalidInput

#: Alternatives ``scipy.stats.mannwhitneyu`` understands.
ALTERNATIVES = ("two-sided", "less", "greater")
#: Columns of the comparison tables, in order.
COMPARISON_COLUMNS = (
    "variable",
    "count_a",
    "count_b",
    "nan_dropped",
    "median_a",
    "median_b",
    "u_statistic",
    "p_value",
    "q_value",
    "significant",
    "auc",
    "rank_biserial",
)


def benjamini_hochberg(p_values: Any) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input's order.

    q_(i) = min over j >= i of p_(j)·m/j, capped at 1, with p sorted ascending and m
    the count of non-NaN p-values; NaN stays NaN and does not count in m.

    Raises:
        InvalidInput: A p-value outside [0, 1] or an input that is not one-dimensional.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise InvalidInput(f"p-values must be one-dimensional, got shape {p.shape}")
    present = ~np.isnan(p)
    if ((p[present] < 0) | (p[present] > 1)).any():
        raise InvalidInput("p-values must lie in [0, 1]")
    q = np.full(p.shape, np.nan)
    values = p[present]
    m = len(values)
    if m == 0:
        return q
    order = np.argsort(values, kind="stable")
    scaled = values[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    out = np.empty(m)
    out[order] = adjusted
    q[present] = out
    return q


def _compare(name: str, a: np.ndarray, b: np.ndarray, alternative: str) -> dict[str, Any]:
    nan_dropped = int(np.isnan(a).sum() + np.isnan(b).sum())
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    row: dict[str, Any] = {
        "variable": name,
        "count_a": len(a),
        "count_b": len(b),
        "nan_dropped": nan_dropped,
        "median_a": float(np.median(a)) if len(a) else np.nan,
        "median_b": float(np.median(b)) if len(b) else np.nan,
    }
    if len(a) == 0 or len(b) == 0:
        u, p = np.nan, np.nan
    elif np.ptp(np.r_[a, b]) == 0:
        # One value throughout: no evidence of a difference (scipy would divide by a
        # zero variance here).
        u, p = len(a) * len(b) / 2.0, 1.0
    else:
        result = stats.mannwhitneyu(a, b, alternative=alternative)
        u, p = float(result.statistic), float(result.pvalue)
    auc = u / (len(a) * len(b)) if len(a) and len(b) else np.nan
    row.update({"u_statistic": u, "p_value": p, "auc": auc, "rank_biserial": 2 * auc - 1})
    return row


def _split(
    table: pd.DataFrame, group_column: str, group_a: Any | None
) -> tuple[np.ndarray, Any, Any]:
    if group_column not in table.columns:
        raise InvalidInput(f"the table lacks the group column {group_column!r}")
    groups = table[group_column]
    if groups.isna().any():
        rows = ", ".join(str(r) for r in np.flatnonzero(groups.isna().to_numpy())[:10])
        raise InvalidInput(f"{group_column} is missing at rows {rows}")
    values = groups.unique().tolist()
    try:
        values.sort()
    except TypeError:  # mixed types: compare as text
        values.sort(key=str)
    if len(values) != 2:
        raise InvalidInput(
            f"{group_column} must hold exactly two groups, found {len(values)}: "
            f"{', '.join(map(str, values[:10]))}"
        )
    if group_a is None:
        group_a = values[1]  # e.g. 1 (mutated) vs 0, True vs False
    elif group_a not in values:
        raise InvalidInput(f"group {group_a!r} is not in {group_column} ({values[0]}, {values[1]})")
    group_b = values[0] if group_a == values[1] else values[1]
    return (groups == group_a).to_numpy(), group_a, group_b


def compare_groups(
    table: pd.DataFrame,
    group_column: str,
    value_columns: Sequence[str] | None = None,
    *,
    group_a: Any | None = None,
    alternative: str = "two-sided",
    fdr: float = 0.05,
) -> pd.DataFrame:
    """Mann-Whitney U of each value column between the two groups of ``group_column``,
    with Benjamini-Hochberg q-values over the columns.

    Args:
        table: One row per item (patch or slide).
        group_column: Column with exactly two distinct values.
        value_columns: Variables to test; default every numeric column but the group's.
        group_a: The group called "a" (e.g. 1 = mutated); default the larger value.
        alternative: "two-sided" (default), "less" or "greater" (a vs b).
        fdr: q-value below which a variable is called significant.

    Returns:
        One row per variable, columns ``COMPARISON_COLUMNS``, with attributes
        ``attrs["group_a"]`` and ``attrs["group_b"]``.

    Raises:
        InvalidInput: A missing or non-numeric column, not two groups, bad arguments.
    """
    if alternative not in ALTERNATIVES:
        raise InvalidInput(f"unknown alternative {alternative!r}; choose {', '.join(ALTERNATIVES)}")
    if not 0 < fdr < 1:
        raise InvalidInput(f"fdr must be strictly between 0 and 1, got {fdr}")
    in_a, group_a, group_b = _split(table, group_column, group_a)
    if value_columns is None:
        value_columns = [
            c
            for c in table.columns
            if c != group_column
            and pd.api.types.is_numeric_dtype(table[c])
            and not pd.api.types.is_bool_dtype(table[c])
        ]
    if not value_columns:
        raise InvalidInput("no value columns to compare")
    absent = [c for c in value_columns if c not in table.columns]
    if absent:
        raise InvalidInput(f"the table lacks column(s) {', '.join(map(str, absent))}")
    rows = []
    for column in value_columns:
        try:
            values = pd.to_numeric(table[column], errors="raise").to_numpy(np.float64)
        except (TypeError, ValueError):
            raise InvalidInput(f"column {column!r} is not numeric") from None
        if np.isinf(values).any():
            raise InvalidInput(f"column {column!r} holds infinite values")
        rows.append(_compare(str(column), values[in_a], values[~in_a], alternative))
    result = pd.DataFrame(rows)
    result["q_value"] = benjamini_hochberg(result["p_value"].to_numpy())
    result["significant"] = (result["q_value"] < fdr).fillna(False).astype(bool)
    result = result.loc[:, list(COMPARISON_COLUMNS)]
    result.attrs.update({"group_a": group_a, "group_b": group_b, "group_column": group_column})
    return result


def compare_covariate(
    table: pd.DataFrame,
    covariate: str = "immune_score",
    status: str = "tp53",
    *,
    group_a: Any | None = None,
    alternative: str = "two-sided",
    fdr: float = 0.05,
) -> pd.DataFrame:
    """Mann-Whitney U of one slide- or patient-level covariate between the two status
    groups (by default the immune score by TP53 status); one row, q = p.

    Raises:
        InvalidInput: As ``compare_groups``.
    """
    return compare_groups(
        table, status, [covariate], group_a=group_a, alternative=alternative, fdr=fdr
    )
