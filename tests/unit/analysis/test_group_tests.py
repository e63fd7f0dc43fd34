"""CompareGroups' tests: a table (optionally the first patch set holding both groups),
inline variables, and a slide covariate of a manifest, tagged so tables can be joined."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from services.analysis.group_tests import compare_inline, compare_slide_covariate, compare_table
from services.analysis.statistics import COMPARISON_COLUMNS, compare_covariate, compare_groups
from services.common.errors import InvalidInput

TWO_SIDED = dict(alternative="two-sided", fdr=0.05)


def _patch_sets(seed: int = 0) -> pd.DataFrame:
    """BD rows holding one class, CD rows holding both, with two feature columns."""
    rng = np.random.default_rng(seed)
    cd = pd.DataFrame(
        {
            "label": np.repeat([0, 1], 10),
            "f1": rng.normal(0, 1, 20) + np.repeat([0, 2], 10),
            "f2": rng.normal(0, 1, 20),
        }
    )
    bd = cd[cd["label"] == 1]
    return pd.concat([bd.assign(patch_set="BD"), cd.assign(patch_set="CD")], ignore_index=True)


def test_the_first_patch_set_holding_both_groups_is_tested_and_named() -> None:
    table = _patch_sets()
    result = compare_table(
        table, "label", "", ["f1", "f2"], patch_sets=["BD", "CD"], biomarker="tp53", **TWO_SIDED
    )
    cd = table[table["patch_set"] == "CD"]
    expected = compare_groups(cd, "label", ["f1", "f2"]).assign(biomarker="tp53", patch_set="CD")
    assert result.note == ""
    pd.testing.assert_frame_equal(result.table, expected)
    assert list(result.table.columns) == [*COMPARISON_COLUMNS, "biomarker", "patch_set"]
    assert result.table.attrs["group_a"] == 1  # the larger value, e.g. mutated


def test_no_patch_set_with_both_groups_is_a_note_not_an_error() -> None:
    one_class = _patch_sets().assign(label=1)
    result = compare_table(
        one_class, "label", "", ["f1"], patch_sets=["BD", "CD"], biomarker="er", **TWO_SIDED
    )
    assert result.table.empty
    assert result.note == "er: no patch set holds both classes"


def test_a_table_without_patch_sets_compares_every_row_with_group_a_as_text() -> None:
    table = _patch_sets()
    result = compare_table(table, "label", "0", ["f1"], **TWO_SIDED)
    expected = compare_groups(table, "label", ["f1"], group_a=0)
    pd.testing.assert_frame_equal(result.table, expected)
    assert "biomarker" not in result.table
    with pytest.raises(InvalidInput, match="group '7' is not a value of label"):
        compare_table(table, "label", "7", ["f1"], **TWO_SIDED)
    with pytest.raises(InvalidInput, match="group_column is required"):
        compare_table(table, "", "", [], **TWO_SIDED)


def test_inline_variables_count_only_the_callers_nan() -> None:
    result = compare_inline([("v", [5, 6, 7, 8], [1, 2]), ("w", [1, 2], [1, 2, 3])], **TWO_SIDED)
    table = result.table
    assert table["nan_dropped"].tolist() == [0, 0]
    assert (table.attrs["group_a"], table.attrs["group_b"]) == ("A", "B")
    with pytest.raises(InvalidInput, match="'v' group_a holds NaN"):
        compare_inline([("v", [1.0, float("nan")], [1.0])], **TWO_SIDED)
    tagged = compare_inline([("v", [1, 2], [3, 4])], biomarker="tp53", **TWO_SIDED)
    assert tagged.table["biomarker"].tolist() == ["tp53"]


def _manifest() -> pd.DataFrame:
    """A typed manifest: TP53 nullable, the immune score nullable."""
    return pd.DataFrame(
        {
            "slide_id": [f"S{i}" for i in range(8)],
            "tp53": pd.array([1, 0, 1, 0, None, 1, 0, 1], dtype="Int8"),
            "immune_score": pd.array([1.2, -0.5, 0.9, None, 2.0, 1.5, -1.1, 0.1], dtype="Float64"),
        }
    )


def test_the_covariate_of_the_listed_slides_by_class() -> None:
    slides = ["S0", "S1", "S2", "S3", "S4", "S5", "S6"]
    result = compare_slide_covariate(_manifest(), "tp53", "", slides, **TWO_SIDED)
    kept = _manifest().iloc[[0, 1, 2, 5, 6]]  # S3 has no score, S4 no class, S7 not listed
    frame = pd.DataFrame(
        {"tp53": kept["tp53"].astype(int), "immune_score": kept["immune_score"].astype(float)}
    )
    expected = compare_covariate(frame).assign(biomarker="tp53", patch_set="slides")
    pd.testing.assert_frame_equal(result.table, expected)
    assert result.table["count_a"].tolist() == [3] and result.table["count_b"].tolist() == [2]


def test_a_covariate_over_one_class_is_a_note_and_missing_columns_are_refused() -> None:
    result = compare_slide_covariate(_manifest(), "tp53", "", ["S0", "S2"], **TWO_SIDED)
    assert result.table.empty and result.note.startswith("tp53: ")
    with pytest.raises(InvalidInput, match="lacks column"):
        compare_slide_covariate(_manifest(), "er", "", [], **TWO_SIDED)
