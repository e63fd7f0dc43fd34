"""CompareGroups' inputs and tests, without gRPC.

Three ways to give the samples: a table with the groups named as text (optionally
only the first patch set whose rows hold both groups), variables given inline, or a
slide covariate of a cohort manifest by a biomarker's classes. Each ends in
:func:`statistics.compare_groups`; a result may be tagged with the biomarker and the
patch set it belongs to, so that the tables of several calls can be joined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from services.analysis.feature_ablation import PATCH_SET_COLUMN
from services.analysis.statistics import compare_covariate, compare_groups
from services.common.errors import InvalidInput

#: The covariate compared when the caller names none (the paper's).
IMMUNE_SCORE = "immune_score"
#: What the ``patch_set`` column reads for a slide-level covariate.
SLIDES = "slides"


@dataclass(frozen=True)
class Comparison:
    """The tests of one call: their table (``COMPARISON_COLUMNS``, then the tags),
    or an empty table and a note saying why nothing was compared."""

    table: pd.DataFrame
    note: str = ""


def _group_value(table: pd.DataFrame, group_column: str, group_a: str) -> Any:
    """The value of ``group_column`` written ``group_a`` as text; None for empty."""
    if not group_a:
        return None
    if group_column not in table.columns:
        raise InvalidInput(f"the table lacks the group column {group_column!r}")
    matches = [v for v in table[group_column].dropna().unique() if str(v) == group_a]
    if not matches:
        raise InvalidInput(f"group {group_a!r} is not a value of {group_column}")
    return matches[0]


def compare_table(
    table: pd.DataFrame,
    group_column: str,
    group_a: str,
    value_columns: Sequence[str],
    *,
    alternative: str,
    fdr: float,
    patch_sets: Sequence[str] = (),
    biomarker: str = "",
) -> Comparison:
    """``compare_groups`` with group A named as text (matched against the values).

    Args:
        table: One row per sample.
        group_column: Column with the two groups.
        group_a: Group A as text; the larger value when empty.
        value_columns: Columns to compare; every numeric one when empty.
        alternative: As ``compare_groups``.
        fdr: As ``compare_groups``.
        patch_sets: Sets to try in order (``BD``, ``CD``): only the rows of the first
            whose rows hold both groups are compared, and the result gains a
            ``patch_set`` column; every row when empty.
        biomarker: Named in a ``biomarker`` column of the result when given.

    Raises:
        InvalidInput: A missing column, not two groups, bad arguments.
    """
    if not group_column:
        raise InvalidInput("table.group_column is required")
    chosen = _group_value(table, group_column, group_a)
    tags: dict[str, str] = {"biomarker": biomarker} if biomarker else {}
    rows = table
    if patch_sets:
        for column in (PATCH_SET_COLUMN, group_column):
            if column not in table.columns:
                raise InvalidInput(f"the table lacks the column {column!r}")
        for name in patch_sets:
            rows = table[table[PATCH_SET_COLUMN] == name]
            if rows[group_column].nunique() == 2:
                tags[PATCH_SET_COLUMN] = name
                break
        else:
            return Comparison(
                pd.DataFrame(), f"{biomarker or group_column}: no patch set holds both classes"
            )
    result = compare_groups(
        rows,
        group_column,
        list(value_columns) or None,
        group_a=chosen,
        alternative=alternative,
        fdr=fdr,
    )
    return Comparison(result.assign(**tags) if tags else result)


def compare_inline(
    variables: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    alternative: str,
    fdr: float,
    biomarker: str = "",
) -> Comparison:
    """``compare_groups`` of variables given as (name, group A values, group B values).

    Raises:
        InvalidInput: No variables, a missing or repeated name, or a NaN/infinite value.
    """
    if not variables:
        raise InvalidInput("variables: at least one variable is required")
    names = [name for name, _, _ in variables]
    if any(not name for name in names):
        raise InvalidInput("variables: every variable needs a name")
    if len(set(names)) != len(names) or "_group" in names:
        raise InvalidInput("variables: names must be unique (and not '_group')")
    size_a = max(len(a) for _, a, _ in variables)
    size_b = max(len(b) for _, _, b in variables)
    if size_a == 0 or size_b == 0:
        raise InvalidInput("variables: both groups need values")
    columns: dict[str, np.ndarray] = {"_group": np.r_[np.ones(size_a), np.zeros(size_b)]}
    padding = {}
    for name, a, b in variables:
        values_a, values_b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        for group, values in (("group_a", values_a), ("group_b", values_b)):
            bad = ~np.isfinite(values)
            if bad.any():
                raise InvalidInput(
                    f"variables: {name!r} {group} holds NaN or infinite values at "
                    f"positions {', '.join(str(int(i)) for i in np.flatnonzero(bad)[:10])}"
                )
        columns[name] = np.r_[
            values_a, np.full(size_a - len(values_a), np.nan),
            values_b, np.full(size_b - len(values_b), np.nan),
        ]  # fmt: skip
        padding[name] = size_a - len(values_a) + size_b - len(values_b)
    result = compare_groups(
        pd.DataFrame(columns), "_group", names, group_a=1.0, alternative=alternative, fdr=fdr
    )
    # The padding is not the caller's NaN: take it back out of the count.
    result["nan_dropped"] = result["nan_dropped"] - result["variable"].map(padding)
    result.attrs.update({"group_a": "A", "group_b": "B"})
    return Comparison(result.assign(biomarker=biomarker) if biomarker else result)


def compare_slide_covariate(
    manifest: pd.DataFrame,
    biomarker: str,
    covariate: str = "",
    slide_ids: Sequence[str] = (),
    *,
    alternative: str,
    fdr: float,
) -> Comparison:
    """A slide covariate (the immune score by default) between the classes of
    ``biomarker`` (group A the positive class), over the listed slides that have both;
    tagged with the biomarker and ``patch_set`` = ``slides``.

    Args:
        manifest: The cohort manifest, typed (``tables.load_manifest``).
        biomarker: Its 0/1 column names the classes, e.g. ``tp53``.
        covariate: The covariate's column; ``immune_score`` when empty.
        slide_ids: Slides to compare; every slide when empty.
        alternative: As ``compare_groups``.
        fdr: As ``compare_groups``.

    Raises:
        InvalidInput: The manifest lacks a column, or the covariate is not numeric.
    """
    covariate = covariate or IMMUNE_SCORE
    missing = [c for c in ("slide_id", biomarker, covariate) if c not in manifest.columns]
    if missing:
        raise InvalidInput(f"covariate.manifest lacks column(s) {', '.join(missing)}")
    rows = manifest[manifest[biomarker].notna()]
    if slide_ids:
        rows = rows[rows["slide_id"].isin(list(slide_ids))]
    rows = rows[rows[covariate].notna()]
    if rows[biomarker].nunique() < 2:
        return Comparison(
            pd.DataFrame(), f"{biomarker}: the slides with a {covariate} hold one class or none"
        )
    try:
        values = rows[covariate].astype(float)
    except (TypeError, ValueError):
        raise InvalidInput(f"covariate.manifest: {covariate} is not numeric") from None
    frame = pd.DataFrame({biomarker: rows[biomarker].astype(int), covariate: values})
    result = compare_covariate(frame, covariate, biomarker, alternative=alternative, fdr=fdr)
    return Comparison(result.assign(biomarker=biomarker, **{PATCH_SET_COLUMN: SLIDES}))
