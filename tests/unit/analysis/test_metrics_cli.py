"""``histomarker metrics TABLE``: JSON shape, readable output, formats, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from services.cli import main


def _table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(12):
        label = patient % 2
        for slide in range(2):
            for _ in range(8):
                p = float(np.clip(rng.normal(0.4 + 0.2 * label, 0.2), 0, 1))
                rows.append((f"P{patient}", f"P{patient}-S{slide}", label, p))
    return pd.DataFrame(rows, columns=["patient_id", "slide_id", "label", "probability"])


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_has_both_levels_with_intervals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _table()
    path = tmp_path / "scores.csv"
    table.to_csv(path, index=False)

    code, out, err = _run(["metrics", str(path), "--json", "--bootstrap", "50"], capsys)

    assert code == 0, err
    result = json.loads(out)
    assert (result["patches"], result["slides"], result["patients"]) == (192, 24, 12)
    assert result["aggregation"] == "mean" and result["top_k"] is None
    assert result["bootstrap"] == {"resamples": 50, "seed": 0, "confidence": 0.95}
    for level in ("patch_level", "slide_level"):
        metrics = result[level]
        for name in ("auroc", "auprc"):
            e = metrics[name]
            assert e["ci_low"] <= e["value"] <= e["ci_high"]
        assert set(metrics["mcc_f1"]) == {"metric", "best_threshold", "best_mcc", "best_f1"}
        assert 0 <= metrics["mcc_f1"]["metric"]["value"] <= 1
        assert metrics["bootstrap"]["unit"] == "patient_id"
    assert result["patch_level"]["auroc"]["value"] == pytest.approx(
        roc_auc_score(table["label"], table["probability"]), abs=1e-12
    )
    again = _run(["metrics", str(path), "--json", "--bootstrap", "50"], capsys)[1]
    assert json.loads(again) == result  # seeded


def test_readable_output_tsv_parquet_and_topk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _table(1).rename(columns={"probability": "score"})  # the proto's name
    tsv = tmp_path / "scores.tsv"
    table.to_csv(tsv, sep="\t", index=False)
    code, out, err = _run(["metrics", str(tsv), "--bootstrap", "20"], capsys)
    assert code == 0, err
    lines = {k: v.strip() for k, v in (line.split(": ", 1) for line in out.strip().splitlines())}
    assert {"auroc", "auprc", "mcc_f1", "best_threshold", "bootstrap"} <= set(lines)
    assert lines["auroc"].startswith("patch ") and " slide " in lines["auroc"]
    assert "95% CI" in lines["auroc"]

    parquet = tmp_path / "scores.parquet"
    table.to_parquet(parquet)
    argv = ["metrics", str(parquet), "--json", "--bootstrap", "0", "--aggregate", "topk"]
    code, out, err = _run([*argv, "--top-k", "3"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["aggregation"] == "topk" and result["top_k"] == 3
    assert result["slide_level"]["auroc"]["confidence"] == 0.0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.assign(label=1), "only one class present"),
        (lambda t: t.assign(probability=t["probability"] + 1), "probabilities outside [0, 1]"),
        (lambda t: t.drop(columns="slide_id"), "lacks column(s) slide_id"),
        (lambda t: t.assign(probability=t["probability"].mask(t.index == 4)), "NaN at rows 4"),
    ],
)
def test_bad_tables_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mutate, message: str
) -> None:
    path = tmp_path / "bad.csv"
    mutate(_table()).to_csv(path, index=False)
    code, out, err = _run(["metrics", str(path), "--json", "--bootstrap", "5"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("histomarker metrics: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bootstrap", "-1"], "--bootstrap must be >= 0"),
        (["--aggregate", "topk", "--top-k", "0"], "--top-k must be >= 1"),
        (["--aggregate", "max"], "invalid choice: 'max'"),
    ],
)
def test_bad_arguments_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    path = tmp_path / "t.csv"
    _table().to_csv(path, index=False)
    code, _, err = _run(["metrics", str(path), *argv], capsys)
    assert code == 2 and message in err


def test_missing_file_and_unknown_format_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["metrics", str(tmp_path / "none.csv")], capsys)
    assert code == 2 and "no table file" in err
    odd = tmp_path / "scores.xlsx"
    odd.write_text("x")
    code, _, err = _run(["metrics", str(odd)], capsys)
    assert code == 2 and "use .csv, .tsv or .parquet" in err
