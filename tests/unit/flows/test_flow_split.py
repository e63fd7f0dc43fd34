"""The paper's split, CD selection and the bounded fan-out's argument checks."""

from __future__ import annotations

import pandas as pd
import pytest

from flows.training.config import Selection
from flows.training.discriminative import choose_cd
from flows.training.split import paper_split, untrainable_reason
from services.common.errors import InvalidInput


def _cohort(normals: int, cancers: int) -> pd.DataFrame:
    rows = [{"slide_id": f"N{i}", "patient_id": f"PN{i}", "kind": "normal"} for i in range(normals)]
    rows += [
        {"slide_id": f"C{i}", "patient_id": f"PC{i}", "kind": "cancer"} for i in range(cancers)
    ]
    return pd.DataFrame(rows)


def test_all_normals_and_as_many_cancers_train_the_detector() -> None:
    split = paper_split(_cohort(3, 10), seed=0)
    detector = set(split.detector)
    assert {"N0", "N1", "N2"} <= detector
    assert len([s for s in detector if s.startswith("C")]) == 3
    assert set(split.biomarker) == {f"C{i}" for i in range(10)} - detector
    assert not detector & set(split.biomarker)
    assert paper_split(_cohort(3, 10), seed=0) == split
    assert paper_split(_cohort(3, 10), seed=1) != split


def test_a_patient_with_two_slides_stays_in_one_set() -> None:
    table = _cohort(1, 4)
    table.loc[table["slide_id"] == "C1", "patient_id"] = "PC0"
    for seed in range(10):
        split = paper_split(table, seed)
        assert ({"C0", "C1"} <= set(split.detector)) or not ({"C0", "C1"} & set(split.detector))


@pytest.mark.parametrize(("normals", "cancers"), [(0, 5), (3, 3), (3, 2)])
def test_a_cohort_that_cannot_be_split_is_refused(normals: int, cancers: int) -> None:
    with pytest.raises(InvalidInput):
        paper_split(_cohort(normals, cancers), seed=0)


def test_a_biomarker_needs_two_patients_per_class() -> None:
    labels = pd.DataFrame({"patient_id": ["a", "b", "c", "d"], "tp53": [1, 1, 0, pd.NA]})
    assert "1 negative" in str(untrainable_reason(labels, "tp53"))
    labels.loc[3, "tp53"] = 0
    assert untrainable_reason(labels, "tp53") is None


def _scores() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "x": [0, 128, 256, 384],
            "y": [0, 0, 0, 0],
            "cancer_probability": [0.95, 0.5, 0.97, 0.2],
            "label": ["cancer", "normal", "cancer", "normal"],
        }
    )


def test_cd_patches_are_confident_cancer_calls() -> None:
    chosen, fallback = choose_cd(_scores(), Selection(threshold=0.9))
    assert list(chosen["x"]) == [256, 0] and not fallback
    chosen, _ = choose_cd(_scores(), Selection(threshold=0.9, max_patches_per_slide=1))
    assert list(chosen["x"]) == [256]


def test_the_fallback_keeps_the_most_probable_patches_and_says_so() -> None:
    chosen, fallback = choose_cd(_scores(), Selection(threshold=0.99, min_patches_per_slide=3))
    assert fallback and list(chosen["x"]) == [256, 0, 128]
    none, fallback = choose_cd(_scores(), Selection(threshold=0.99))
    assert none.empty and not fallback


def test_the_fan_out_needs_a_positive_limit() -> None:
    from flows.runtime.fanout import submit_bounded
    from flows.training.preprocess import tile_slide

    with pytest.raises(InvalidInput, match=">= 1"):
        submit_bounded(tile_slide, [], 0)
