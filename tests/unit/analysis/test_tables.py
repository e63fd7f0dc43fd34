"""The AnalysisService's tables in the store: keys, reading, writing, joining, checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from services.analysis.tables import (
    MAX_SEED,
    check_count,
    check_numeric,
    check_seed,
    joined,
    load_manifest,
    load_table,
    output_key,
    run_prefix,
    store_json,
    store_table,
    table_format,
)
from services.common.errors import InvalidInput, NotFound
from services.common.objectstore import ObjectStore, open_store


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return open_store((tmp_path / "store").as_uri())


def test_counts_and_seeds_are_checked_with_their_defaults() -> None:
    assert check_count(0, "folds", 5, 20, low=2) == 5
    assert check_count(7, "folds", 5, 20, low=2) == 7
    with pytest.raises(InvalidInput, match=r"folds must be within 2-20 \(0 for 5\), got 1"):
        check_count(1, "folds", 5, 20, low=2)
    assert check_seed(0) == 0 and check_seed(MAX_SEED) == MAX_SEED
    with pytest.raises(InvalidInput, match="seed must be within"):
        check_seed(-1)


def test_results_go_to_the_key_given_or_under_the_run() -> None:
    assert output_key("x/y.parquet", "r1", "z.parquet") == "x/y.parquet"
    assert output_key("", "r1", "z.parquet") == "runs/r1/analysis/z.parquet"
    assert output_key("", "", "z.parquet") is None
    for bad in ("..", "a/b", "", "x" * 129):
        with pytest.raises(InvalidInput, match="run_id"):
            run_prefix(bad)


def test_table_format_follows_the_extension() -> None:
    assert [table_format(k) for k in ("a.parquet", "a.PQ", "b.csv", "c.tsv")] == [
        "parquet",
        "parquet",
        "csv",
        "tsv",
    ]
    with pytest.raises(InvalidInput, match=r"use \.parquet, \.csv or \.tsv"):
        table_format("a.json")


@pytest.mark.parametrize("key", ["t/table.parquet", "t/table.csv", "t/table.tsv"])
def test_a_stored_table_reads_back_equal(store: ObjectStore, key: str) -> None:
    table = pd.DataFrame({"slide_id": ["a", "b"], "probability": [0.25, 0.75], "label": [0, 1]})
    table.attrs = {"group_a": np.int64(1)}  # not JSON: must not reach the file
    info = store_table(store, key, table)
    assert info.key == key
    back = load_table(store, key, "scores")
    pd.testing.assert_frame_equal(back, table, check_dtype=False)


def test_missing_and_corrupt_tables_say_which(store: ObjectStore) -> None:
    with pytest.raises(NotFound, match=r"scores: no table 't/none\.csv'"):
        load_table(store, "t/none.csv", "scores")
    store.put_bytes("t/bad.parquet", b"not parquet")
    with pytest.raises(InvalidInput, match=r"scores \(t/bad.parquet\)") as info:
        load_table(store, "t/bad.parquet", "scores")
    assert "/tmp" not in str(info.value)  # the server's scratch path never shows


def test_json_is_stored_indented(store: ObjectStore) -> None:
    store_json(store, "m.json", {"auroc": 0.5})
    assert store.get_bytes("m.json") == b'{\n  "auroc": 0.5\n}'


def test_joined_keeps_earlier_rows_first_and_renumbers() -> None:
    first = pd.DataFrame({"variable": ["a"], "p_value": [0.1]})
    empty = pd.DataFrame()
    last = pd.DataFrame({"variable": ["b", "c"], "p_value": [0.2, 0.3]}, index=[5, 6])
    both = joined([first, empty], last)
    assert both["variable"].tolist() == ["a", "b", "c"]
    assert both.index.tolist() == [0, 1, 2]
    assert joined([], last) is last


def test_text_that_is_no_number_is_named_by_row() -> None:
    # Text as CSV readers of mixed columns give it (object dtype).
    table = pd.DataFrame({"probability": pd.Series(["0.5", "x", None], dtype=object), "label": 1})
    with pytest.raises(InvalidInput, match="table: probability is not a number at rows 1"):
        check_numeric(table, ("label", "probability", "absent"), "table")


def test_a_stored_manifest_is_typed_as_the_cohort_types_it(store: ObjectStore) -> None:
    header = (
        "slide_id,patient_id,kind,site,split,tp53,pik3ca,er,pr,her2,basal,immune_score,slide_path"
    )
    rows = ["s1,p1,cancer,A,,1,0,,,,,0.4468,slides/s1.svs", "s2,p2,normal,A,,,,,,,,,slides/s2.svs"]
    store.put_bytes("cohorts/c/manifest.csv", "\n".join([header, *rows]).encode())
    table = load_manifest(store, "cohorts/c/manifest.csv", "covariate.manifest")
    assert table["tp53"].tolist()[0] == 1 and pd.isna(table["tp53"].tolist()[1])
    assert table["immune_score"].tolist()[0] == 0.4468
    store.put_bytes("cohorts/bad/manifest.csv", b"slide_id\ns1\n")
    with pytest.raises(InvalidInput, match=r"covariate.manifest \(cohorts/bad/manifest.csv\)"):
        load_manifest(store, "cohorts/bad/manifest.csv", "covariate.manifest")
    with pytest.raises(NotFound, match="no manifest"):
        load_manifest(store, "cohorts/none/manifest.csv", "covariate.manifest")
