"""``histomarker mil train`` and ``mil predict`` end to end, in process.

The cohort is the synthetic generator's manifest (its labels, patients and six
sites, no pixels), with a few patients given a second slide and some labels made
unknown. Its bags are written directly: Gaussian patch embeddings in which a bag
positive for biomarker t holds a few patches shifted along axis t, so every
biomarker is learnable from a handful of patches, as from a few regions of a slide.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from services.cli import main
from services.cohort.manifest import Manifest
from services.common.vocabulary import BIOMARKERS
from services.mil.bags import write_bag
from services.mil.heads import build_head
from services.mil.model import FittedMIL
from services.synth.labels import manifest_rows, sample_cohort

pytestmark = pytest.mark.slow

ENCODER = "uni"
SHA = "ab" * 32
DIM = 24
SHIFT = 5.0
PLANTED = 5
PATCH_PX, PATCH_MPP, LEVEL0_MPP = 224, 0.5, 0.25
SIDE_PX = PATCH_PX * PATCH_MPP / LEVEL0_MPP
#: Quick head settings: the defaults are sized for real encoders and cohorts.
TRAIN = ["--epochs", "14", "--patience", "5", "--lr", "5e-3", "--hidden-dim", "32"]
TRAIN += ["--threads", "1", "--bootstrap", "200", "--seed", "0"]


def _bag(path: Path, slide_id: str, labels: dict[str, int], rng: np.random.Generator, **kw):
    n = int(rng.integers(20, 41))
    features = rng.normal(size=(n, kw.pop("dim", DIM))).astype(np.float32)
    rows = rng.permutation(n)
    for t, task in enumerate(BIOMARKERS):
        if labels.get(task) == 1:
            features[rows[t * PLANTED : (t + 1) * PLANTED], t] += SHIFT
    grid = np.stack(np.divmod(np.arange(n), 8), axis=1)[:, ::-1]  # (col, row)
    write_bag(
        path,
        features,
        (grid * SIDE_PX).astype(np.int64),
        slide_id=slide_id,
        encoder=kw.pop("encoder", ENCODER),
        encoder_sha256=kw.pop("sha", SHA),
        patch_px=PATCH_PX,
        patch_mpp=PATCH_MPP,
        level0_mpp=LEVEL0_MPP,
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """manifest.csv (synthetic rows, six sites, unknown labels, second slides) and a
    bags folder in the object store's layout, one slide's bag missing."""
    root = tmp_path_factory.mktemp("mil-cohort")
    rows = manifest_rows(sample_cohort(96, seed=11))
    truth = {r["slide_id"]: {t: r[t] for t in BIOMARKERS} for r in rows}
    cancer = [r for r in rows if r["kind"] == "cancer"]
    for r in cancer[:4]:  # second slides: same patient, labels and site
        second = dict(r, slide_id=r["slide_id"].replace("DX1", "DX2"))
        rows.append(second)
        truth[second["slide_id"]] = truth[r["slide_id"]]
    rng = np.random.default_rng(5)
    for r in cancer[4:]:  # about 8% of the labels unknown
        for task in BIOMARKERS:
            if rng.random() < 0.08:
                r[task] = ""
    for r in rows:
        r["slide_path"] = f"slides/{r['slide_id']}.tiff"
    frame = pd.DataFrame(rows)
    assert frame["site"].nunique() == 6
    Manifest.from_frame(frame, root=root).write(root / "manifest.csv")
    folder = root / "store" / "bags" / ENCODER
    for slide_id, labels in truth.items():
        _bag(folder / f"{slide_id}.h5", slide_id, labels, rng)
    missing = cancer[-1]["slide_id"]
    (folder / f"{missing}.h5").unlink()
    return {"root": root, "manifest": root / "manifest.csv", "store": root / "store"}


@pytest.fixture(scope="module")
def trained(cohort: dict[str, Path]) -> tuple[Path, dict]:
    out = cohort["root"] / "run"
    argv = ["mil", "train", str(cohort["manifest"]), str(cohort["store"]), str(out)]
    argv += ["--folds", "3", *TRAIN, "--json"]
    code, answer = _run_json(argv)
    assert code == 0
    return out, answer


def _run_json(argv: list[str]) -> tuple[int, dict]:
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    text = stdout.getvalue()
    return code, json.loads(text) if code == 0 else {}


def test_train_writes_the_model_card_table_and_figures(trained: tuple[Path, dict]) -> None:
    out, answer = trained
    for name in ("mil_abmil.pt", "model_card.json", "oof_predictions.csv", "cv.md"):
        assert (out / name).is_file(), name
    for task in BIOMARKERS:
        assert (out / f"reliability_{task}.png").stat().st_size > 1000
    card = json.loads((out / "model_card.json").read_text())
    assert card["grid_overlap"] == 0.0  # the bags' patches side by side, as written
    assert card["encoder"]["name"] == ENCODER and card["encoder"]["sha256"] == SHA
    assert card["encoder"]["licence"] == "CC-BY-NC-ND-4.0"
    assert card["head"]["name"] == "abmil"
    data = card["training_data"]
    assert data["synthetic"] is True and data["sites"] == ["SA", "SB", "SC", "SD", "SE", "SF"]
    assert data["n_slides"] == answer["cohort"]["slides"] and data["n_patients"] > 60
    assert data["skipped"]["no bag"]["count"] == 1
    assert data["skipped"]["normal slide (no biomarker labels)"]["count"] > 10
    assert card["command"].startswith("histomarker mil train ")
    assert [r["biomarker"] for r in card["cross_validation"]["table"]] == list(BIOMARKERS)
    assert "| biomarker | n | positives | AUROC |" in (out / "cv.md").read_text()


def test_out_of_fold_auroc_is_high_on_the_planted_signal(trained: tuple[Path, dict]) -> None:
    _, answer = trained
    for row in answer["cross_validation"]:
        assert row["auroc"] > 0.8, row
        assert row["ci_low"] <= row["auroc"] <= row["ci_high"]
        assert 0 < row["positives"] < row["n"]
        assert row["nll_after"] is not None and row["ece_after"] is not None


def test_no_site_is_on_both_sides_of_a_fold(trained: tuple[Path, dict]) -> None:
    out, answer = trained
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert set(oof["fold"]) == {0, 1, 2}
    assert (oof.groupby("site")["fold"].nunique() == 1).all()
    assert (oof.groupby("patient_id")["fold"].nunique() == 1).all()
    for fold in answer["folds"]:  # validation sites come from the training folds only
        assert not set(fold["validation_sites"]) & set(fold["sites"])
    second = oof[oof["bag_id"].str.endswith("DX2")]
    assert len(second) == 4  # the second slides are bags of their own, same patient
    for task in BIOMARKERS:
        p = oof[f"{task}_probability"]
        assert p.between(0, 1).all() and p.nunique() > 10


def test_predict_gives_six_calls_and_attention_export_reads(
    trained: tuple[Path, dict], cohort: dict[str, Path], tmp_path: Path
) -> None:
    out, _ = trained
    bag = next((cohort["store"] / "bags" / ENCODER).glob("*.h5"))
    table = tmp_path / "attention.csv"
    argv = ["mil", "predict", str(out / "mil_abmil.pt"), str(bag)]
    code, answer = _run_json([*argv, "--attention", str(table), "--json"])
    assert code == 0
    assert list(answer["calls"]) == list(BIOMARKERS)
    for call in answer["calls"].values():
        assert 0 <= call["probability"] <= 1
        assert call["call"] == ("positive" if call["probability"] >= 0.5 else "negative")
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["x", "y", "width", "height", *BIOMARKERS]
    assert len(rows) == answer["patches"] and float(rows[0]["width"]) == SIDE_PX
    for task in BIOMARKERS:
        assert sum(float(r[task]) for r in rows) == pytest.approx(1.0, abs=1e-3)
    geojson = tmp_path / "attention.geojson"
    export = ["export", "geojson", str(geojson), "--attention", str(table)]
    assert main([*export, "--patch-size", str(SIDE_PX), "--json"]) == 0
    features = json.loads(geojson.read_text())["features"]
    assert len(features) == answer["patches"]


def test_predict_a_5000_patch_bag_in_under_a_second(tmp_path: Path) -> None:
    """A default-size head (hidden 256) on UNI-wide features, as a real model reads."""
    model = FittedMIL(build_head("abmil", 1024), "abmil", {}, 1024, BIOMARKERS, (1.0,) * 6)
    model.encoder, model.encoder_sha256 = ENCODER, SHA
    path = model.save(tmp_path / "mil_abmil.pt")
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 100_000, size=(5000, 2))
    features = rng.normal(size=(5000, 1024)).astype(np.float32)
    bag = write_bag(
        tmp_path / "big.h5",
        features,
        coords,
        slide_id="big",
        encoder=ENCODER,
        encoder_sha256=SHA,
        patch_px=PATCH_PX,
        patch_mpp=PATCH_MPP,
        level0_mpp=LEVEL0_MPP,
    )
    code, answer = _run_json(["mil", "predict", str(path), str(bag), "--json"])
    assert code == 0 and answer["patches"] == 5000
    assert answer["seconds"] < 1.0


def test_patient_level_gives_one_bag_per_patient(cohort: dict[str, Path]) -> None:
    out = cohort["root"] / "patients"
    argv = ["mil", "train", str(cohort["manifest"]), str(cohort["store"]), str(out)]
    argv += ["--patient-level", "--folds", "2", "--encoder", ENCODER, "--json"]
    argv += ["--epochs", "2", "--hidden-dim", "8", "--threads", "1", "--bootstrap", "0"]
    code, answer = _run_json(argv)
    assert code == 0
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert oof["patient_id"].is_unique and len(oof) == answer["cohort"]["patients"]
    assert oof["slide_ids"].str.contains(";").sum() == 4


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_bag_of_another_encoder_is_refused_naming_the_slide(
    cohort: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bags = tmp_path / "bags"
    shutil.copytree(cohort["store"] / "bags" / ENCODER, bags)
    manifest = Manifest.read(cohort["manifest"]).table
    stray = manifest.loc[manifest["kind"] == "cancer", "slide_id"].iloc[7]
    rng = np.random.default_rng(1)
    _bag(bags / f"{stray}.h5", stray, {}, rng, encoder="conch", sha="cd" * 32)
    argv = ["mil", "train", str(cohort["manifest"]), str(bags), str(tmp_path / "out")]
    line = _one_line_error(capsys, argv)
    assert stray in line and "conch" in line
    _bag(bags / f"{stray}.h5", stray, {}, rng, dim=DIM + 1)
    line = _one_line_error(capsys, argv)
    assert stray in line and "width" in line
    line = _one_line_error(capsys, [*argv, "--encoder", "virchow2"])
    assert "virchow2" in line
    assert not (tmp_path / "out").exists()


def test_missing_manifest_and_foreign_bag_exit_2(
    trained: tuple[Path, dict],
    cohort: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["mil", "train", str(tmp_path / "none.csv"), str(cohort["store"]), str(tmp_path)]
    assert "none.csv" in _one_line_error(capsys, argv)
    out, _ = trained
    foreign = tmp_path / "foreign.h5"
    _bag(foreign, "foreign", {}, np.random.default_rng(2), encoder="h-optimus-0")
    line = _one_line_error(capsys, ["mil", "predict", str(out / "mil_abmil.pt"), str(foreign)])
    assert "h-optimus-0" in line and ENCODER in line
