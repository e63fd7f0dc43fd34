"""Random-forest ablation: feature groups, patient-grouped CV, Table 2, bad input."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from services.analysis import ablation
from services.analysis.ablation import (
    FEATURE_GROUPS,
    RESULT_COLUMNS,
    patient_folds,
    permutation_importances,
    run_ablation,
    table2,
)
from services.common.errors import InvalidInput
from services.nuclei.features import FEATURE_NAMES

FAST = {"n_estimators": 25, "bootstrap": 60, "folds": 4, "seed": 3}


def synthetic_table(
    patients: int = 24, patches: int = 12, signal: float = 1.5, seed: int = 0
) -> pd.DataFrame:
    """Patches whose intensity features carry the label; morphology and spatial are
    noise. Labels are per patient, half positive."""
    rng = np.random.default_rng(seed)
    patient_labels = np.arange(patients) % 2
    rows = patients * patches
    patient = np.repeat([f"P{i:03d}" for i in range(patients)], patches)
    label = np.repeat(patient_labels, patches)
    values = rng.normal(size=(rows, len(FEATURE_NAMES)))
    intensity = [i for i, name in enumerate(FEATURE_NAMES) if name.startswith("intensity.")]
    values[:, intensity] += signal * label[:, None] * rng.uniform(0.5, 1.0, len(intensity))
    table = pd.DataFrame(values, columns=list(FEATURE_NAMES))
    table.insert(0, "patient_id", patient)
    table.insert(1, "tp53", label)
    return table


@pytest.fixture(scope="module")
def two_sets() -> pd.DataFrame:
    bd = synthetic_table(signal=1.5, seed=1).assign(patch_set="BD")
    cd = synthetic_table(signal=0.3, seed=2).assign(patch_set="CD")
    return pd.concat([cd, bd], ignore_index=True)


@pytest.fixture(scope="module")
def results(two_sets: pd.DataFrame) -> pd.DataFrame:
    return run_ablation(two_sets, "tp53", biomarker="TP53", **FAST)


def test_groups_are_the_seven_of_the_paper() -> None:
    sizes = {name: len(features) for name, features in FEATURE_GROUPS.items()}
    assert sizes == {
        "all": 75,
        "intensity": 15,
        "spatial": 20,
        "morphology": 40,
        "morphology+spatial": 60,
        "spatial+intensity": 35,
        "morphology+intensity": 55,
    }
    assert all(f.startswith("intensity.") for f in FEATURE_GROUPS["intensity"])
    assert set(FEATURE_GROUPS["morphology+spatial"]) == set(FEATURE_GROUPS["morphology"]) | set(
        FEATURE_GROUPS["spatial"]
    )


def test_intensity_beats_morphology_and_bd_beats_cd(results: pd.DataFrame) -> None:
    assert list(results.columns) == list(RESULT_COLUMNS)
    assert len(results) == 14
    assert list(dict.fromkeys(results["patch_set"])) == ["BD", "CD"]
    score = results.set_index(["patch_set", "group"])["auprc"]
    assert score["BD", "intensity"] > score["BD", "morphology"] + 0.2
    assert score["BD", "intensity"] > 0.8
    assert score["BD", "all"] > score["CD", "all"]
    bd = results[results["patch_set"] == "BD"]
    assert (bd["ci_low"] <= bd["auprc"]).all() and (bd["auprc"] <= bd["ci_high"]).all()
    assert (results["n_patients"] == 24).all() and (results["n_patches"] == 288).all()
    assert (results["note"] == "").all()


def test_folds_never_share_a_patient() -> None:
    table = synthetic_table(patients=30, patches=7)
    labels = table["tp53"].to_numpy()
    patients = table["patient_id"].to_numpy()
    for seed in range(5):
        fold_of_row = patient_folds(labels, patients, 5, seed)
        assert set(fold_of_row) == set(range(5))
        # Every patient's rows lie in one fold: never in train and test at once.
        assert pd.Series(fold_of_row).groupby(patients).nunique().max() == 1


def test_run_ablation_uses_patient_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[np.ndarray] = []
    original = ablation.out_of_fold_probabilities

    def spy(x, labels, fold_of_row, *args):  # type: ignore[no-untyped-def]
        seen.append(fold_of_row)
        return original(x, labels, fold_of_row, *args)

    monkeypatch.setattr(ablation, "out_of_fold_probabilities", spy)
    table = synthetic_table(patients=10, patches=5)
    run_ablation({"BD": table}, "tp53", groups={"i": FEATURE_GROUPS["intensity"]}, **FAST)
    patients = table["patient_id"].to_numpy()
    assert len(seen) == 1
    assert pd.Series(seen[0]).groupby(patients).nunique().max() == 1


def test_a_leaking_splitter_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.model_selection import KFold

    class Leaky:
        def __init__(self, n_splits: int, shuffle: bool, random_state: int) -> None:
            self.inner = KFold(n_splits, shuffle=True, random_state=random_state)

        def split(self, x, y, groups):  # type: ignore[no-untyped-def]
            return self.inner.split(x)

    monkeypatch.setattr(ablation, "StratifiedGroupKFold", Leaky)
    table = synthetic_table(patients=10, patches=5)
    with pytest.raises(RuntimeError, match="in train and test"):
        patient_folds(table["tp53"].to_numpy(), table["patient_id"].to_numpy(), 3, 0)


def test_table2_shape_and_labels(results: pd.DataFrame) -> None:
    twice = pd.concat([results, results.assign(biomarker="ER")], ignore_index=True)
    wide = table2(twice)
    assert list(wide.index) == [
        "all (75)",
        "intensity (15)",
        "spatial (20)",
        "morphology (40)",
        "morphology+spatial (60)",
        "spatial+intensity (35)",
        "morphology+intensity (55)",
    ]
    assert list(wide.columns) == [("TP53", "BD"), ("TP53", "CD"), ("ER", "BD"), ("ER", "CD")]
    row = results[(results["patch_set"] == "BD") & (results["group"] == "intensity")].iloc[0]
    expected = f"{row.auprc:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}]"
    assert wide.loc["intensity (15)", ("TP53", "BD")] == expected
    cell = re.compile(r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\]")
    assert wide.map(lambda text: cell.fullmatch(text) is not None).all().all()


def test_table2_marks_missing_cells() -> None:
    partial = pd.DataFrame(
        [
            ("TP53", "BD", "all", 75, 0.9, 0.8, 0.95),
            ("TP53", "CD", "all", 75, 0.6, float("nan"), float("nan")),
            ("TP53", "BD", "intensity", 15, 0.7, 0.6, 0.8),
        ],
        columns=["biomarker", "patch_set", "group", "n_features", "auprc", "ci_low", "ci_high"],
    )
    wide = table2(partial)
    assert wide.loc["all (75)", ("TP53", "CD")] == "0.60"
    assert wide.loc["intensity (15)", ("TP53", "CD")] == "n/a"


def test_fewer_patients_than_folds_reduces_folds_with_a_note() -> None:
    table = synthetic_table(patients=4, patches=6)
    out = run_ablation(
        {"BD": table},
        "tp53",
        groups={"intensity": FEATURE_GROUPS["intensity"]},
        **FAST | {"folds": 5},
    )
    assert out.loc[0, "folds"] == 4
    assert "folds reduced from 5 to 4" in out.loc[0, "note"]


def test_nan_features_are_dropped_and_counted() -> None:
    table = synthetic_table(patients=8, patches=5)
    table.loc[[0, 7, 11], "morph.area.mean"] = np.nan
    table.loc[3, "intensity.red.std"] = np.inf
    out = run_ablation({"BD": table}, "tp53", groups={"all": FEATURE_NAMES}, **FAST)
    assert out.loc[0, "dropped_rows"] == 4
    assert out.loc[0, "n_patches"] == 36
    assert "dropped 4 row(s)" in out.loc[0, "note"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop(columns=["intensity.red.mean"]), "lacks column.*intensity.red.mean"),
        (lambda t: t.drop(columns=["patient_id"]), "lacks column.*patient_id"),
        (lambda t: t.assign(tp53=1), "only one class"),
        (lambda t: t.assign(tp53=2 * t["tp53"]), "labels must be 0/1"),
        (lambda t: t.assign(tp53=t["tp53"].where(t.index > 0)), "1 row.*no label"),
        (lambda t: t.assign(tp53=np.arange(len(t)) % 2), "labels are per patient"),
        (lambda t: t[t["patient_id"].isin(["P000", "P001", "P002"])], "at least 2 patients"),
        (lambda t: t.assign(**{n: np.nan for n in FEATURE_NAMES}), "no rows with finite"),
    ],
)
def test_bad_input_is_refused_with_a_message(change, message) -> None:  # type: ignore[no-untyped-def]
    table = change(synthetic_table(patients=8, patches=4))
    with pytest.raises(InvalidInput, match=message):
        run_ablation({"BD": table}, "tp53", **FAST)


def test_bad_arguments_are_refused() -> None:
    table = synthetic_table(patients=8, patches=4)
    with pytest.raises(InvalidInput, match="folds must be >= 2"):
        run_ablation({"BD": table}, "tp53", folds=1)
    with pytest.raises(InvalidInput, match="without features"):
        run_ablation({"BD": table}, "tp53", groups={"none": ()})
    with pytest.raises(InvalidInput, match=r"lacks column.*patch_set"):
        run_ablation(table, "tp53")
    with pytest.raises(InvalidInput, match="no rows for patch set"):
        run_ablation(table.assign(patch_set="BD"), "tp53", patch_sets=["BD", "CD"])


def test_permutation_importances_rank_the_signal_first() -> None:
    table = synthetic_table(patients=16, patches=8, signal=2.0)
    features = [*FEATURE_GROUPS["intensity"][:5], *FEATURE_GROUPS["morphology"][:10]]
    top = permutation_importances(
        table, "tp53", features=features, folds=4, n_estimators=25, repeats=3, top=5
    )
    assert list(top.columns) == ["rank", "feature", "family", "importance_mean", "importance_std"]
    assert list(top["rank"]) == [1, 2, 3, 4, 5]
    assert top.loc[0, "family"] == "intensity"
    assert top["importance_mean"].is_monotonic_decreasing
