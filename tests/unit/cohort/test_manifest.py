from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest

from services.cohort.manifest import (
    MANIFEST_COLUMNS,
    Manifest,
    slide_path_text,
)
from services.common.errors import AlreadyExists, InvalidInput, NotFound
from services.common.vocabulary import BIOMARKERS

HEADER = ",".join(MANIFEST_COLUMNS)


def _row(**values: object) -> dict[str, object]:
    row: dict[str, object] = {
        "slide_id": "s1",
        "patient_id": "p1",
        "kind": "cancer",
        "site": "A1",
        "split": "",
        "tp53": 1,
        "pik3ca": 0,
        "er": None,
        "pr": 1.0,
        "her2": float("nan"),
        "basal": True,
        "immune_score": 0.25,
        "slide_path": "slides/s1.svs",
    }
    row.update(values)
    return row


def _write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_columns_are_in_the_documented_order() -> None:
    assert MANIFEST_COLUMNS[0] == "slide_id"
    assert MANIFEST_COLUMNS[-1] == "slide_path"
    assert set(BIOMARKERS) <= set(MANIFEST_COLUMNS)


def test_from_frame_types_the_columns() -> None:
    manifest = Manifest.from_frame(pd.DataFrame([_row()]))
    table = manifest.table
    assert list(table.columns) == list(MANIFEST_COLUMNS)
    assert str(table["tp53"].dtype) == "Int8"
    assert str(table["immune_score"].dtype) == "Float64"
    row = table.iloc[0]
    assert (row["tp53"], row["pik3ca"], row["pr"], row["basal"]) == (1, 0, 1, 1)
    assert row["er"] is pd.NA and row["her2"] is pd.NA
    assert row["split"] == ""
    assert row["immune_score"] == 0.25


def test_write_then_read_round_trips_with_extra_columns(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        [
            _row(truth_mask="truth/s1.png"),
            _row(slide_id="s2", kind="normal", tp53=None, immune_score=None, truth_mask=None),
        ]
    )
    path = Manifest.from_frame(frame).write(tmp_path / "cohort" / "manifest.csv")
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == HEADER + ",truth_mask"
    assert text.splitlines()[1] == "s1,p1,cancer,A1,,1,0,,1,,1,0.25,slides/s1.svs,truth/s1.png"
    assert text.splitlines()[2] == "s2,p1,normal,A1,,,0,,1,,1,,slides/s1.svs,"

    again = Manifest.read(path)
    assert again.extra_columns == ("truth_mask",)
    assert again.root == path.parent
    assert list(again.table["truth_mask"]) == ["truth/s1.png", ""]
    pd.testing.assert_frame_equal(
        again.table[list(MANIFEST_COLUMNS)],
        Manifest.from_frame(frame).table[list(MANIFEST_COLUMNS)],
    )
    assert not list(path.parent.glob(".*.part")), "no temporary file left behind"


def test_write_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    manifest = Manifest.from_frame(pd.DataFrame([_row()]))
    path = manifest.write(tmp_path / "manifest.csv")
    with pytest.raises(AlreadyExists, match="exists already"):
        manifest.write(path)
    changed = Manifest.from_frame(pd.DataFrame([_row(slide_id="other")]))
    changed.write(path, overwrite=True)
    assert list(Manifest.read(path).table["slide_id"]) == ["other"]


def test_write_to_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="is a folder"):
        Manifest.from_frame(pd.DataFrame([_row()])).write(tmp_path)


def test_read_accepts_required_columns_in_any_order(tmp_path: Path) -> None:
    columns = list(reversed(MANIFEST_COLUMNS))
    values = {"slide_id": "s1", "patient_id": "p1", "kind": "normal", "slide_path": "/x.svs"}
    path = _write(
        tmp_path / "m.csv", ",".join(columns), ",".join(values.get(c, "") for c in columns)
    )
    table = Manifest.read(path).table
    assert list(table.columns) == list(MANIFEST_COLUMNS)
    assert table.iloc[0]["kind"] == "normal"


def test_slide_file_resolves_relative_paths_against_the_manifest(tmp_path: Path) -> None:
    path = Manifest.from_frame(pd.DataFrame([_row()])).write(tmp_path / "m.csv")
    manifest = Manifest.read(path)
    assert manifest.slide_file("slides/s1.svs") == tmp_path / "slides" / "s1.svs"
    assert manifest.slide_file("/data/s1.svs") == Path("/data/s1.svs")


def test_slide_path_text_is_relative_inside_and_absolute_outside(tmp_path: Path) -> None:
    inside = tmp_path / "cohort" / "slides" / "a" / "s.svs"
    outside = tmp_path / "elsewhere" / "s.svs"
    assert slide_path_text(inside, tmp_path / "cohort") == "slides/a/s.svs"
    assert slide_path_text(outside, tmp_path / "cohort") == os.path.abspath(outside)


def test_labelled_keeps_cancer_rows_with_a_known_label() -> None:
    frame = pd.DataFrame(
        [_row(), _row(slide_id="s2", tp53=None), _row(slide_id="s3", kind="normal")]
    )
    manifest = Manifest.from_frame(frame)
    assert list(manifest.labelled("tp53")["slide_id"]) == ["s1"]
    with pytest.raises(InvalidInput, match="unknown biomarker"):
        manifest.labelled("brca1")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "tumor"}, "kind 'tumor' is not one of cancer, normal"),
        ({"tp53": 2}, "tp53 label '2' must be 1, 0 or empty"),
        ({"er": "yes"}, "er label 'yes' must be 1, 0 or empty"),
        ({"her2": 0.5}, "her2 label '0.5'"),
        ({"slide_id": ""}, "slide_id is empty"),
        ({"slide_id": "a/b"}, "cannot name an object"),
        ({"slide_id": ".."}, "cannot name an object"),
        ({"patient_id": None}, "patient_id is empty"),
        ({"slide_path": ""}, "slide_path is empty"),
        ({"immune_score": "high"}, "immune_score 'high' must be a finite number"),
        ({"immune_score": math.inf}, "immune_score 'inf' must be a finite number"),
    ],
)
def test_from_frame_rejects_bad_values_naming_the_row(
    changes: dict[str, object], message: str
) -> None:
    frame = pd.DataFrame([_row(slide_id="ok"), _row(**changes)])
    with pytest.raises(InvalidInput, match="table row 1") as info:
        Manifest.from_frame(frame)
    assert message in str(info.value)


def test_from_frame_rejects_a_missing_column() -> None:
    frame = pd.DataFrame([_row()]).drop(columns=["basal", "site"])
    with pytest.raises(InvalidInput, match="missing manifest column"):
        Manifest.from_frame(frame)


def test_from_frame_rejects_repeated_slide_ids() -> None:
    with pytest.raises(InvalidInput, match="slide_id 's1' repeats table row 0"):
        Manifest.from_frame(pd.DataFrame([_row(), _row()]))


def test_read_names_file_and_line_of_a_bad_value(tmp_path: Path) -> None:
    good = "s1,p1,cancer,A1,,1,0,,,,,,s1.svs"
    bad = "s2,p1,cancer,A1,,1,0,,,,maybe,,s2.svs"
    path = _write(tmp_path / "m.csv", HEADER, good, "", bad)
    with pytest.raises(InvalidInput) as info:
        Manifest.read(path)
    assert str(info.value) == (
        f"{path} line 4: basal label 'maybe' must be 1, 0 or empty (unknown)"
    )


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "empty file"),
        ([HEADER.replace(",kind", "")], "missing manifest column(s): kind"),
        ([HEADER + ",slide_id"], "column 'slide_id' appears twice"),
        ([HEADER + ","], "has no name"),
        ([HEADER, "s1,p1,cancer"], "line 2: 3 fields, the header has 13"),
    ],
)
def test_read_rejects_malformed_files(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    with pytest.raises(InvalidInput) as info:
        Manifest.read(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_read_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        Manifest.read(tmp_path / "absent.csv")


def test_read_binary_file_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"\xff\xfe\x00\x01slide")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        Manifest.read(path)
