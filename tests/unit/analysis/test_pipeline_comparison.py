"""The paper's pipeline and MIL side by side: pairing, the paired patient bootstrap,
undefined AUROCs, the page and its JSON, and ``histomarker analysis compare``."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from services.analysis.comparison import (
    ECE_BINS,
    UNKNOWN_SITE,
    brier_score,
    compare,
    compare_biomarker,
    load_pair,
    pair_tables,
)
from services.analysis.comparison_report import (
    COMPARISON_HTML,
    COMPARISON_JSON,
    readable,
    write_comparison,
)
from services.analysis.metrics import auroc, bootstrap
from services.cli import main
from services.common.errors import InvalidInput, NotFound
from services.common.vocabulary import BIOMARKERS
from services.inference.calibration import expected_calibration_error


def _tables(
    patients: int = 60, seed: int = 0, mil: str = "perfect"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Demo-shaped prediction tables of the same slides: every third patient has two
    slides, labels alternate by patient, the paper's probabilities are noise; the MIL
    ones separate the classes (``perfect``) or equal the paper's (``same``). HER2 is
    negative throughout."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(patients):
        for s in range(1 + (i % 3 == 0)):
            row: dict[str, object] = {
                "slide_id": f"P{i:03d}-S{s}",
                "patient_id": f"P{i:03d}",
                "kind": "cancer",
                "status": "ok",
            }
            for k, name in enumerate(BIOMARKERS):
                row[name] = 0 if name == "her2" else (i + k) % 2
                row[f"{name}_probability"] = float(rng.uniform())
            rows.append(row)
    paper = pd.DataFrame(rows)
    other = paper.copy()
    if mil == "perfect":
        for name in BIOMARKERS:
            labels = other[name].to_numpy(np.float64)
            other[f"{name}_probability"] = 0.15 + 0.7 * labels + rng.uniform(-0.1, 0.1, len(other))
    return paper, other


def _row(result: object, name: str) -> dict:
    return next(b for b in result["biomarkers"] if b["biomarker"] == name)  # type: ignore[index]


# --- pairing ------------------------------------------------------------------------


def test_pairs_common_cancer_slides_and_counts_each_table() -> None:
    paper, mil = _tables(patients=12)
    normal = paper.iloc[:1].assign(slide_id="N-1", patient_id="N", kind="normal")
    paper_only = paper.iloc[:1].assign(slide_id="X-1", patient_id="X")
    mil_only = mil.iloc[:1].assign(slide_id="Y-1", patient_id="Y")
    paired = pair_tables(
        pd.concat([paper, normal, paper_only]), pd.concat([mil, mil_only]).drop(columns="kind")
    )
    assert len(paired.table) == len(paper)
    assert set(paired.table["slide_id"]) == set(paper["slide_id"])
    assert (paired.paper_slides, paired.mil_slides) == (len(paper) + 1, len(mil) + 1)
    assert paired.biomarkers == BIOMARKERS
    assert set(paired.table["site"]) == {UNKNOWN_SITE}


def test_sites_come_from_a_table_else_the_manifest(tmp_path: Path) -> None:
    paper, mil = _tables(patients=6)
    sites = {slide: f"S{i % 2}" for i, slide in enumerate(paper["slide_id"])}
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"slide_id": list(sites), "site": list(sites.values())}).to_csv(
        manifest, index=False
    )
    paper.to_csv(tmp_path / "paper.csv", index=False)
    mil.to_csv(tmp_path / "mil.csv", index=False)
    paired = load_pair(tmp_path / "paper.csv", tmp_path / "mil.csv", manifest)
    assert dict(zip(paired.table["slide_id"], paired.table["site"], strict=True)) == sites

    in_table = pair_tables(paper.assign(site="A1"), mil, sites)
    assert set(in_table.table["site"]) == {"A1"}  # the table's own site wins


def test_a_slide_unscored_by_one_pipeline_leaves_both_and_is_counted() -> None:
    paper, mil = _tables(patients=20)
    mil.loc[0, "tp53_probability"] = np.nan
    paper.loc[1, "tp53"] = mil.loc[1, "tp53"] = np.nan
    paper.loc[2, "tp53"] = np.nan  # known in the MIL table: still scored
    result = compare_biomarker(pair_tables(paper, mil), "tp53", resamples=50)
    assert result.slides == len(paper) - 2
    assert result.unlabelled == 1
    assert result.unscored == {"paper": 0, "mil": 1}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p, m: (p.drop(columns="patient_id"), m), "lacks column(s) patient_id"),
        (lambda p, m: (p, m.assign(slide_id="other-" + m["slide_id"])), "no slide is in both"),
        (lambda p, m: (p, m.assign(patient_id="Q")), "another patient"),
        (lambda p, m: (p, m.assign(tp53=1 - m["tp53"])), "another tp53 label"),
        (lambda p, m: (p.assign(er_probability=1.5), m), "outside [0, 1]"),
        (lambda p, m: (p.assign(pr=2), m), "must be 0, 1 or empty"),
        (lambda p, m: (pd.concat([p, p.iloc[:1]]), m), "slide_id repeated"),
        (
            lambda p, m: (p[["slide_id", "patient_id"]], m),
            "has no biomarker columns",
        ),
    ],
)
def test_bad_tables_say_what_is_wrong(change: object, message: str) -> None:
    paper, mil = _tables(patients=6)
    a, b = change(paper, mil)  # type: ignore[operator]
    with pytest.raises(InvalidInput, match=re.escape(message)):
        pair_tables(a, b)


# --- the numbers --------------------------------------------------------------------


def test_perfect_against_random_the_paired_interval_excludes_zero() -> None:
    paper, mil = _tables(patients=80, mil="perfect")
    paired = pair_tables(paper, mil)
    result = compare_biomarker(paired, "tp53", resamples=2000, seed=1)
    y = paper["tp53"].to_numpy()
    assert result.mil.auroc is not None and result.paper.auroc is not None
    assert result.mil.auroc.value == 1.0
    assert result.mil.auroc.ci_low == result.mil.auroc.ci_high == 1.0
    assert result.paper.auroc.value == pytest.approx(
        roc_auc_score(y, paper["tp53_probability"]), abs=1e-12
    )
    assert 0.35 < result.paper.auroc.value < 0.65
    d = result.difference
    assert d is not None
    assert d.value == pytest.approx(1.0 - result.paper.auroc.value, abs=1e-12)
    assert 0 < d.ci_low < d.value < d.ci_high
    assert result.verdict == "MIL higher" and result.better("auroc") == "mil"
    assert (result.slides, result.patients, result.positives + result.negatives) == (
        len(paper),
        80,
        len(paper),
    )
    assert result.resamples_used + result.skipped_single_class == 2000


def test_identical_pipelines_differ_by_exactly_zero() -> None:
    paper, mil = _tables(patients=30, mil="same")
    comparison = compare(pair_tables(paper, mil), resamples=500)
    for result in comparison.biomarkers:
        if not result.defined:
            continue
        d = result.difference
        assert d is not None
        assert (d.value, d.ci_low, d.ci_high) == (0.0, 0.0, 0.0)
        assert result.paper.auroc == result.mil.auroc
        assert result.verdict == "no clear difference"
        assert result.better("auroc") is None and result.better("brier") is None


def test_intervals_equal_the_metrics_bootstrap_over_patients() -> None:
    """The weighted pair counts score a resample as metrics.auroc scores the rows of
    the drawn patients repeated; with the same seed the draws are the same."""
    paper, mil = _tables(patients=25, seed=3)
    paired = pair_tables(paper, mil)
    result = compare_biomarker(paired, "er", resamples=300, seed=7)
    table = paired.table
    for pipeline, scores in (("paper", result.paper), ("mil", result.mil)):
        expected, info = bootstrap(
            lambda y, p: {"auroc": auroc(y, p)},
            table["er"],
            table[f"er_{pipeline}"],
            table["patient_id"],
            resamples=300,
            seed=7,
        )
        assert scores.auroc is not None
        assert scores.auroc.value == pytest.approx(expected["auroc"].value, abs=1e-12)
        assert scores.auroc.ci_low == pytest.approx(expected["auroc"].ci_low, abs=1e-12)
        assert scores.auroc.ci_high == pytest.approx(expected["auroc"].ci_high, abs=1e-12)
        assert info.used == result.resamples_used and info.unit_count == 25


def test_ece_and_brier_are_the_demo_definitions() -> None:
    paper, mil = _tables(patients=20)
    result = compare_biomarker(pair_tables(paper, mil), "pr", resamples=20)
    y = paper["pr"].to_numpy()
    p = paper["pr_probability"].to_numpy()
    assert result.paper.ece == pytest.approx(expected_calibration_error(p, y, bins=ECE_BINS))
    assert result.paper.brier == pytest.approx(float(np.mean((p - y) ** 2)))
    assert brier_score(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0


def test_one_class_biomarker_is_undefined_not_an_error() -> None:
    paper, mil = _tables(patients=10)
    result = compare_biomarker(pair_tables(paper, mil), "her2")
    assert not result.defined
    assert result.paper.auroc is None and result.difference is None
    assert "one class only" in result.note and "negative" in result.note
    assert result.verdict == "undefined"
    assert result.paper.ece is not None and result.mil.brier is not None  # still defined
    row = result.as_dict()
    assert row["paper"]["auroc"] is None and row["difference_mil_minus_paper"] is None


def test_no_labelled_slide_is_undefined_too() -> None:
    paper, mil = _tables(patients=6)
    paper["basal"] = np.nan
    mil["basal"] = np.nan
    result = compare_biomarker(pair_tables(paper, mil), "basal")
    assert (result.slides, result.defined, result.paper.ece) == (0, False, None)
    assert "no slide" in result.note


def test_seeded() -> None:
    paired = pair_tables(*_tables(patients=20))
    first = compare(paired, resamples=200, seed=4).as_dict()
    assert compare(paired, resamples=200, seed=4).as_dict() == first
    assert compare(paired, resamples=200, seed=5).as_dict() != first


# --- the page -----------------------------------------------------------------------


def test_page_references_its_pngs_and_json_holds_the_numbers(tmp_path: Path) -> None:
    paper, mil = _tables(patients=40)
    paper["site"] = ["A1" if i % 2 else "B2" for i in range(len(paper))]
    paper["basal"] = mil["basal"] = np.nan  # no label: a panel that says so
    paired = pair_tables(paper, mil)
    outputs = write_comparison(paired, tmp_path, resamples=300, seed=2)

    assert outputs.html == tmp_path / COMPARISON_HTML
    page = outputs.html.read_text()
    files = re.findall(r'data-file="([^"]+)"', page)
    assert len(files) == 2 and set(re.findall(r'href="([^"#]+)"', page)) == set(files)
    for relative in files:
        assert (tmp_path / relative).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        assert base64.b64decode(data)[:4] == b"\x89PNG"
    assert f"{len(paper)} held-out cancer slides of 40 patients from 2 site(s)" in page
    assert "resamples of patients" in page and "one class only" in page
    assert page.count('class="best"') >= 4 * 2  # AUROC and Brier of 4 defined biomarkers
    assert not list(tmp_path.rglob("*.partial"))

    document = json.loads(outputs.json.read_text())
    assert document == json.loads(json.dumps(outputs.comparison.as_dict()))
    assert document["bootstrap"]["unit"] == "patient"
    assert document["ece"]["bins"] == ECE_BINS
    assert (document["common_slides"], document["common_patients"], document["sites"]) == (
        len(paper),
        40,
        2,
    )
    tp53 = _row(document, "tp53")
    again = compare_biomarker(paired, "tp53", resamples=300, seed=2)
    assert again.mil.auroc is not None and again.difference is not None
    assert tp53["mil"]["auroc"]["value"] == again.mil.auroc.value
    assert tp53["difference_mil_minus_paper"]["ci_low"] == again.difference.ci_low
    assert _row(document, "her2")["defined"] is False
    assert _row(document, "basal")["slides"] == 0 and _row(document, "basal")["mil"]["ece"] is None

    lines = readable(outputs)  # the CLI's output without --json
    assert lines["tp53"].strip().startswith("AUROC paper 0.") and "(MIL higher)" in lines["tp53"]
    assert "one class only" in lines["her2"]
    # "key: value" lines with the values lined up
    assert len({len(key) + len(v) - len(v.lstrip()) for key, v in lines.items()}) == 1


# --- the command --------------------------------------------------------------------


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_the_page_and_prints_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paper, mil = _tables(patients=30)
    paper.to_csv(tmp_path / "predictions.csv", index=False)
    mil.to_csv(tmp_path / "predictions_mil.csv", index=False)
    argv = ["analysis", "compare", str(tmp_path / "predictions.csv")]
    argv += [str(tmp_path / "predictions_mil.csv"), "--out", str(tmp_path / "out")]

    code, out, err = _run([*argv, "--json", "--bootstrap", "200"], capsys)

    assert code == 0, err
    result = json.loads(out)
    assert Path(result["html"]).is_file() and all(Path(f).is_file() for f in result["figures"])
    written = json.loads((tmp_path / "out" / COMPARISON_JSON).read_text())
    assert {k: v for k, v in result.items() if k not in {"html", "json", "figures"}} == written
    assert written["bootstrap"]["resamples"] == 200


def test_cli_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paper, mil = _tables(patients=6)
    paper.to_csv(tmp_path / "paper.csv", index=False)
    mil.assign(slide_id="other").iloc[:1].to_csv(tmp_path / "disjoint.csv", index=False)
    mil.drop(columns="slide_id").to_csv(tmp_path / "no_ids.csv", index=False)
    out = ["--out", str(tmp_path / "out")]
    cases = {
        "no table file": [str(tmp_path / "missing.csv"), str(tmp_path / "paper.csv")],
        "lacks column(s) slide_id": [str(tmp_path / "paper.csv"), str(tmp_path / "no_ids.csv")],
        "no slide is in both": [str(tmp_path / "paper.csv"), str(tmp_path / "disjoint.csv")],
        "--bootstrap must be >= 1": [
            str(tmp_path / "paper.csv"),
            str(tmp_path / "paper.csv"),
            "--bootstrap",
            "0",
        ],
    }
    for message, args in cases.items():
        code, stdout, err = _run(["analysis", "compare", *args, *out], capsys)
        assert code == 2, (message, err)
        assert message in err and err.count("\n") == 1 and not stdout
    assert _run(["analysis", "compare", str(tmp_path / "paper.csv")], capsys)[0] == 2
    assert not (tmp_path / "out" / COMPARISON_HTML).exists()


def test_missing_manifest_is_not_found(tmp_path: Path) -> None:
    paper, mil = _tables(patients=4)
    paper.to_csv(tmp_path / "p.csv", index=False)
    mil.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(NotFound):
        load_pair(tmp_path / "p.csv", tmp_path / "m.csv", tmp_path / "manifest.csv")
