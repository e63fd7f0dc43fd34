"""RunFeatureAblation's patch sets and run: BD and CD apart or in one table, labels
from a manifest or the tables, and sets that cannot be scored skipped with a note."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from services.analysis.ablation import FEATURE_GROUPS, run_ablation
from services.analysis.feature_ablation import ablation, ablation_sets, split_patch_sets
from services.common.errors import InvalidInput
from services.nuclei.features import FEATURE_NAMES

GROUPS = ["all", "intensity"]
SETTINGS = dict(folds=2, trees=5, bootstrap=0, confidence=0.95, seed=0)


def _patches(seed: int, patients: int = 6, per_patient: int = 4) -> pd.DataFrame:
    """Feature rows of patients half positive, as the training flow joins them."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label = p % 2
        for _ in range(per_patient):
            row: dict[str, object] = {
                "slide_id": f"S{p}",
                "patient_id": f"P{p}",
                "label": label,
                "few_nuclei": False,
            }
            row.update(zip(FEATURE_NAMES, rng.normal(label, 1.0, len(FEATURE_NAMES)), strict=True))
            rows.append(row)
    return pd.DataFrame(rows)


def test_split_patch_sets_keys_bd_and_cd_even_when_one_is_empty() -> None:
    cd = _patches(0).assign(patch_set="CD")
    sets = split_patch_sets(cd, "patch_sets")
    assert list(sets) == ["BD", "CD"] and sets["BD"].empty and len(sets["CD"]) == len(cd)
    with pytest.raises(InvalidInput, match="patch_set must be BD or CD"):
        split_patch_sets(cd.assign(patch_set="XX"), "patch_sets")
    with pytest.raises(InvalidInput, match="lacks the column patch_set"):
        split_patch_sets(_patches(0), "patch_sets")


def test_skipped_sets_are_noted_and_the_others_scored_as_alone() -> None:
    cd = _patches(1)
    bd = cd[cd["label"] == 1]  # one class only
    sets = ablation_sets({"BD": bd, "CD": cd.iloc[:0], "XD": cd}, None, "tp53", allow_empty=True)
    table, notes = ablation(
        sets, "tp53", GROUPS, label_column="label", skip_unusable=True, **SETTINGS
    )
    assert notes == [
        "tp53 BD: patch set 'BD': only one class (1) present",
        "tp53 CD: no patch sets to analyse: the table is empty",
    ]
    alone = run_ablation(
        cd.assign(patch_set="XD"),
        "label",
        biomarker="tp53",
        groups={name: FEATURE_GROUPS[name] for name in GROUPS},
        folds=2,
        n_estimators=5,
        bootstrap=0,
    )
    pd.testing.assert_frame_equal(table, alone)


def test_every_set_skipped_gives_an_empty_table() -> None:
    one_class = _patches(2).assign(label=1)
    table, notes = ablation(
        {"BD": one_class}, "er", GROUPS, label_column="label", skip_unusable=True, **SETTINGS
    )
    assert table.empty and len(notes) == 1 and notes[0].startswith("er BD: ")


def test_without_skipping_an_unusable_set_refuses_the_call() -> None:
    one_class = _patches(2).assign(label=1)
    with pytest.raises(InvalidInput, match="only one class"):
        ablation(
            {"BD": one_class, "CD": _patches(3)}, "er", GROUPS, label_column="label", **SETTINGS
        )


def test_labels_and_patients_come_from_the_manifest() -> None:
    features = _patches(4).drop(columns=["patient_id", "label"])
    features.loc[0, "few_nuclei"] = True
    manifest = pd.DataFrame(
        {
            "slide_id": [f"S{p}" for p in range(6)],
            "patient_id": [f"Q{p}" for p in range(6)],
            "tp53": [0, 1, 0, 1, None, 1],
        }
    )
    (prepared,) = ablation_sets({"CD": features}, manifest, "tp53").values()
    assert "S4" not in set(prepared["slide_id"])  # no label
    assert len(prepared) == 4 * 5 - 1  # and one patch with few nuclei left out
    assert set(prepared["patient_id"]) == {"Q0", "Q1", "Q2", "Q3", "Q5"}
    kept = ablation_sets({"CD": features}, manifest, "tp53", include_few_nuclei=True)
    assert len(kept["CD"]) == 4 * 5
    with pytest.raises(InvalidInput, match="no patch left with a tp53 label"):
        ablation_sets({"CD": features}, manifest.assign(tp53=None), "tp53")
    with pytest.raises(InvalidInput, match="more than once"):
        ablation_sets({"CD": features}, pd.concat([manifest, manifest]), "tp53")
