"""The QC verdict from a summary's areas and shares, under given thresholds."""

from __future__ import annotations

from services.slide.qc import QcSummary, QcThresholds, judged


def _summary(tissue: float, usable: float, **shares: float) -> QcSummary:
    fractions = {"pen_green": 0.0, "blur": 0.0, "fold": 0.0, "edge": 0.0, **shares}
    return QcSummary(
        verdict="pass",
        reasons=(),
        tissue_area_mm2=tissue,
        usable_area_mm2=usable,
        usable_fraction=usable / tissue if tissue else 0.0,
        artifact_fractions=fractions,
    )


def test_clean_tissue_above_the_floor_passes() -> None:
    result = judged(_summary(10.0, 9.5), QcThresholds())
    assert result.verdict == "pass" and result.reasons == ()


def test_too_little_usable_tissue_fails_with_its_reasons() -> None:
    result = judged(_summary(1.0, 0.2, blur=0.8), QcThresholds(min_usable_mm2=0.5))
    assert result.verdict == "fail"
    assert result.reasons[0] == "usable tissue 0.2 mm² is under 0.5 mm²"
    assert "only 20% of the tissue is usable (at least 30% needed)" in result.reasons
    assert "blur covers 80% of the tissue area" in result.reasons


def test_a_share_of_artifact_over_the_warning_line_warns() -> None:
    result = judged(_summary(10.0, 8.0, fold=0.15), QcThresholds())
    assert result.verdict == "warn" and len(result.reasons) == 1
    assert "15%" in result.reasons[0]


def test_no_tissue_fails() -> None:
    result = judged(_summary(0.0, 0.0), QcThresholds())
    assert result.verdict == "fail" and result.reasons == ("no tissue found",)


def test_a_stored_summary_round_trips_and_is_judged_again() -> None:
    strict = judged(_summary(1.0, 0.9), QcThresholds(min_usable_mm2=2.0))
    stored = QcSummary.from_dict(strict.as_dict())
    assert stored == strict and strict.verdict == "fail"
    lenient = judged(stored, QcThresholds(min_usable_mm2=0.5))
    assert lenient.verdict == "pass" and lenient.usable_area_mm2 == strict.usable_area_mm2
