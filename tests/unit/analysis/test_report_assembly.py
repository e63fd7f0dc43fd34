"""BuildReport's inputs from stored objects, and the report written to the store."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from services.analysis.report_assembly import (
    ReportInputs,
    ablation_for_report,
    decode_checked_image,
    heatmap_patches,
    report_prefix,
    shard_member,
    summary_lines,
    write_report,
)
from services.common.errors import InvalidInput, NotFound
from services.common.objectstore import open_store


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 180)).save(buffer, "PNG")
    return buffer.getvalue()


def test_summary_lines_keep_their_order_and_refuse_clashes() -> None:
    lines = [("cohort", "tiny"), ("biomarker slides", "6"), ("notes", "none")]
    assert list(summary_lines(lines).items()) == lines
    with pytest.raises(InvalidInput, match=r"summary\[1\].name 'cohort' is given twice"):
        summary_lines([("cohort", "a"), ("cohort", "b")])
    with pytest.raises(InvalidInput, match="is given twice \\(or is 'run'\\)"):
        summary_lines([("run", "x")])
    with pytest.raises(InvalidInput, match=r"summary\[0\].name must be"):
        summary_lines([(" ", "x")])
    with pytest.raises(InvalidInput, match="over 20000 characters"):
        summary_lines([("notes", "x" * 20_001)])


def test_ablation_for_report_fills_what_table_2_needs() -> None:
    table = pd.DataFrame(
        {
            "biomarker": ["tp53"],
            "patch_set": ["CD"],
            "group": ["all"],
            "n_features": [75.0],
            "auprc": [0.6],
            "note": [None],
        }
    )
    clean = ablation_for_report(table)
    assert clean["note"].tolist() == [""] and clean["n_features"].dtype == np.int64
    assert np.isnan(clean["ci_low"]).all()
    with pytest.raises(InvalidInput, match=r"auprc must lie in \[0, 1\]"):
        ablation_for_report(table.assign(auprc=1.5))
    with pytest.raises(InvalidInput, match="lacks column"):
        ablation_for_report(table.drop(columns="group"))


def test_images_are_checked_before_they_are_decoded() -> None:
    assert decode_checked_image(_png(8, 4), "thumbnail").shape == (4, 8, 3)
    with pytest.raises(InvalidInput, match="thumbnail is 5000x2 px"):
        decode_checked_image(_png(5000, 2), "thumbnail")
    with pytest.raises(InvalidInput, match="not a readable image"):
        decode_checked_image(b"nope", "thumbnail")


def test_shard_members_are_read_from_tar_bytes() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("x0_y0.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert shard_member(buffer.getvalue(), "x0_y0.png", "s.tar") == b"abc"
    with pytest.raises(NotFound, match="has no member"):
        shard_member(buffer.getvalue(), "x1_y0.png", "s.tar")
    with pytest.raises(InvalidInput, match="is not a tar shard"):
        shard_member(b"plain bytes", "x0_y0.png", "s.tar")


def test_heatmap_patches_of_one_slide_and_biomarker() -> None:
    table = pd.DataFrame(
        {
            "slide_id": ["a", "a", "b"],
            "biomarker": ["tp53", "er", "tp53"],
            "x": [0, 0, 0],
            "y": [0, 0, 0],
            "width": [512, 512, 512],
            "height": [512, 512, 512],
            "probability": [0.2, 0.9, 0.5],
        }
    )
    rows = heatmap_patches(table, "a", "tp53", 16.0, "heatmaps[0]")
    assert rows["probability"].tolist() == [0.2]
    with pytest.raises(InvalidInput, match="downsample must be a finite number"):
        heatmap_patches(table, "a", "tp53", 0.0, "heatmaps[0]")


def test_report_prefix_given_or_under_the_run() -> None:
    assert report_prefix("runs/r1/report/", "") == "runs/r1/report"
    assert report_prefix("", "r1") == "runs/r1/analysis/report"
    with pytest.raises(InvalidInput, match="give output_prefix or run_id"):
        report_prefix("", "")


def test_write_report_stores_the_html_last_and_drops_stale_figures(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    store.put_bytes("runs/r1/report/figures/old.png", _png(2, 2))
    statistics = pd.DataFrame({"variable": ["immune_score"], "p_value": [0.01]})
    inputs = ReportInputs(
        title="a run", summary={"cohort": "tiny", "notes": "none"}, statistics=statistics
    )
    html, figures = write_report(store, "runs/r1/report", inputs)
    assert html.key == "runs/r1/report/report.html" and figures == []
    assert not store.exists("runs/r1/report/figures/old.png")
    page = store.get_bytes(html.key).decode()
    assert page.index(">cohort<") < page.index(">notes<") < page.index("immune_score")
    assert inputs.is_empty() is False and ReportInputs(title="t").is_empty()
