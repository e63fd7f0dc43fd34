"""Labels, morphology rules and cohort layout of the synthetic cohort generator."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from services.common.errors import InvalidInput
from services.synth.labels import (
    BIOMARKERS,
    MANIFEST_COLUMNS,
    MORPHOLOGY_FIELDS,
    SITES,
    STANDARD_EOSIN_OD,
    STANDARD_HEMATOXYLIN_OD,
    SlideLabels,
    SlideSpec,
    immune_score_for,
    label_probability,
    manifest_rows,
    morphology_for,
    sample_cohort,
    sample_labels,
)

N_MANIFESTS = 200
SLIDES_PER_MANIFEST = 53  # 13 normal + 40 cancer at the default fraction 0.25
CANCER_PER_MANIFEST = 40

#: Marginals as documented in the module docstring (exact values, 4 decimals).
DOCUMENTED_MARGINALS = {
    "basal": 0.2000,
    "tp53": 0.3580,
    "pik3ca": 0.3317,
    "er": 0.7560,
    "pr": 0.6394,
    "her2": 0.2100,
}
#: TCGA-like targets the brief asked for.
TARGET_RANGES = {
    "basal": (0.18, 0.20),
    "tp53": (0.33, 0.37),
    "pik3ca": (0.32, 0.35),
    "er": (0.74, 0.78),
    "pr": (0.62, 0.66),
    "her2": (0.17, 0.22),
}

ALL_COMBINATIONS = [SlideLabels(*values) for values in itertools.product((0, 1), repeat=6)]


def _exact_marginal(name: str) -> float:
    return sum(label_probability(lab) for lab in ALL_COMBINATIONS if getattr(lab, name))


def _exact_conditional(name: str, given: str, value: int) -> float:
    joint = sum(
        label_probability(lab)
        for lab in ALL_COMBINATIONS
        if getattr(lab, name) and getattr(lab, given) == value
    )
    given_p = sum(
        label_probability(lab) for lab in ALL_COMBINATIONS if getattr(lab, given) == value
    )
    return joint / given_p


@pytest.fixture(scope="module")
def manifests() -> list[list[SlideSpec]]:
    return [sample_cohort(SLIDES_PER_MANIFEST, seed) for seed in range(N_MANIFESTS)]


@pytest.fixture(scope="module")
def cancer(manifests: list[list[SlideSpec]]) -> dict[str, np.ndarray]:
    """Labels, morphology and immune score of all 8000 cancer slides, as columns."""
    slides = [s for cohort in manifests for s in cohort if s.kind == "cancer"]
    columns: dict[str, np.ndarray] = {}
    for name in BIOMARKERS:
        columns[name] = np.array([getattr(s.labels, name) for s in slides])
    for name in MORPHOLOGY_FIELDS:
        columns[name] = np.array([getattr(s.morphology, name) for s in slides])
    columns["immune_score"] = np.array([s.immune_score for s in slides])
    return columns


# --- the conditional table ---------------------------------------------------------


def test_label_probabilities_sum_to_one() -> None:
    assert math.isclose(sum(label_probability(lab) for lab in ALL_COMBINATIONS), 1.0)


@pytest.mark.parametrize("name", BIOMARKERS)
def test_exact_marginals_match_the_documentation_and_targets(name: str) -> None:
    exact = _exact_marginal(name)
    assert exact == pytest.approx(DOCUMENTED_MARGINALS[name], abs=5e-5)
    low, high = TARGET_RANGES[name]
    assert low <= exact <= high
    assert 0.18 <= min(exact, 1 - exact) <= 0.48  # the paper's class imbalance


def test_exact_correlations_of_the_table() -> None:
    p_basal, p_er = _exact_marginal("basal"), _exact_marginal("er")
    p_both = sum(label_probability(lab) for lab in ALL_COMBINATIONS if lab.basal and lab.er)
    phi = (p_both - p_basal * p_er) / math.sqrt(p_basal * (1 - p_basal) * p_er * (1 - p_er))
    assert phi == pytest.approx(-0.76, abs=0.01)
    assert _exact_conditional("tp53", "basal", 1) - _exact_conditional("tp53", "basal", 0) > 0.5
    assert _exact_conditional("pik3ca", "er", 1) - _exact_conditional("pik3ca", "er", 0) > 0.25
    # Basal is mostly triple negative.
    assert _exact_conditional("er", "basal", 1) == pytest.approx(0.10)
    assert _exact_conditional("pr", "basal", 1) == pytest.approx(0.154)  # through ER
    assert _exact_conditional("her2", "basal", 1) == pytest.approx(0.05)


# --- sampled labels over 200 manifests ---------------------------------------------


def test_manifests_have_40_cancer_slides(manifests: list[list[SlideSpec]]) -> None:
    assert all(
        sum(s.kind == "cancer" for s in cohort) == CANCER_PER_MANIFEST for cohort in manifests
    )


@pytest.mark.parametrize("name", BIOMARKERS)
def test_sampled_marginals_match_the_exact_ones(name: str, cancer: dict[str, np.ndarray]) -> None:
    n = len(cancer[name])
    assert n == N_MANIFESTS * CANCER_PER_MANIFEST
    exact = _exact_marginal(name)
    tolerance = 4 * math.sqrt(exact * (1 - exact) / n)  # about 0.02
    assert abs(cancer[name].mean() - exact) < tolerance


@pytest.mark.parametrize("name", BIOMARKERS)
def test_per_manifest_minority_share_is_in_range(
    name: str, manifests: list[list[SlideSpec]]
) -> None:
    in_range = 0
    for cohort in manifests:
        values = [getattr(s.labels, name) for s in cohort if s.labels is not None]
        share = min(np.mean(values), 1 - np.mean(values))
        in_range += 0.10 <= share <= 0.55
    assert in_range >= 0.95 * len(manifests)


def test_sampled_correlations(cancer: dict[str, np.ndarray]) -> None:
    basal, er, tp53, pik3ca = cancer["basal"], cancer["er"], cancer["tp53"], cancer["pik3ca"]
    assert np.corrcoef(basal, er)[0, 1] < -0.6
    assert tp53[basal == 1].mean() - tp53[basal == 0].mean() > 0.3
    assert pik3ca[er == 1].mean() > pik3ca[er == 0].mean() + 0.15
    # Basal mostly ER-/PR-/HER2-.
    assert er[basal == 1].mean() < 0.2
    assert cancer["pr"][basal == 1].mean() < 0.2
    assert cancer["her2"][basal == 1].mean() < 0.1


def test_immune_score_follows_lymphocytes_and_tp53(cancer: dict[str, np.ndarray]) -> None:
    immune = cancer["immune_score"]
    density = cancer["lymphocyte_density_per_mm2"]
    assert np.corrcoef(immune, density)[0, 1] > 0.6
    assert np.corrcoef(immune, np.log(density))[0, 1] > 0.8
    assert np.corrcoef(immune, cancer["tp53"])[0, 1] > 0


# --- morphology rules ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "feature"),
    [
        ("tp53", "lymphocyte_density_per_mm2"),
        ("pik3ca", "karyorrhexis_rate"),
        ("er", "gland_fraction"),
        ("basal", "tumour_nucleus_major_um"),
        ("her2", "tumour_nucleus_cv"),
        ("her2", "tumour_nucleolus_fraction"),
    ],
)
def test_single_feature_is_learnable_but_not_trivial(
    label: str, feature: str, cancer: dict[str, np.ndarray]
) -> None:
    # The parameter is never seen, only a sample of it in a slide's tissue: it may
    # separate the classes well, but never perfectly.
    auroc = roc_auc_score(cancer[label], cancer[feature])
    assert 0.85 < auroc < 0.998


def _mean_effect(
    feature: str, label: str, base: SlideLabels, n: int = 400, seed: int = 7
) -> tuple[float, float]:
    """Mean of ``feature`` with ``label`` off and on, all other labels as in ``base``."""
    means = []
    for value in (0, 1):
        labels = dataclasses.replace(base, **{label: value})
        rng = np.random.default_rng(seed)
        samples = [getattr(morphology_for("cancer", labels, rng), feature) for _ in range(n)]
        means.append(float(np.mean(samples)))
    return means[0], means[1]


LUMINAL = SlideLabels(tp53=0, pik3ca=0, er=1, pr=1, her2=0, basal=0)
TRIPLE_NEGATIVE = SlideLabels(tp53=0, pik3ca=0, er=0, pr=0, her2=0, basal=0)


@pytest.mark.parametrize(
    ("label", "feature", "base", "low", "high"),
    [
        # (label, parameter, other labels, documented ratio or difference range)
        ("tp53", "lymphocyte_density_per_mm2", LUMINAL, 2.2, 2.8),  # x2.5
        ("pik3ca", "karyorrhexis_rate", LUMINAL, 7.0, 9.0),  # x8
        ("her2", "tumour_nucleus_cv", LUMINAL, 1.8, 2.2),  # 0.15 -> 0.30
        ("her2", "tumour_density_per_mm2", LUMINAL, 0.70, 0.80),  # x0.75
        ("her2", "hematoxylin_scale", LUMINAL, 1.12, 1.18),  # x1.15
        ("her2", "tumour_nucleolus_fraction", LUMINAL, 1.9, 2.1),  # x2.0
        ("basal", "tumour_density_per_mm2", TRIPLE_NEGATIVE, 1.25, 1.35),  # +30%
    ],
)
def test_multiplicative_rules(
    label: str, feature: str, base: SlideLabels, low: float, high: float
) -> None:
    off, on = _mean_effect(feature, label, base)
    assert low < on / off < high


@pytest.mark.parametrize(
    ("label", "feature", "base", "low", "high"),
    [
        ("er", "gland_fraction", TRIPLE_NEGATIVE, 0.25, 0.35),  # +0.30
        ("er", "tumour_nucleus_major_um", TRIPLE_NEGATIVE, -1.3, -0.7),  # -1.0 µm
        ("pr", "tumour_nucleus_major_um", LUMINAL, -1.3, -0.7),  # -1.0 µm
        ("pr", "solid_fraction", LUMINAL, -0.16, -0.08),  # 0.25 -> 0.13
        ("basal", "tumour_nucleus_major_um", TRIPLE_NEGATIVE, 1.7, 2.3),  # +2.0 µm
        ("basal", "necrosis_fraction", TRIPLE_NEGATIVE, 0.07, 0.11),  # 0.03 -> 0.12
        ("basal", "solid_fraction", TRIPLE_NEGATIVE, 0.25, 0.35),  # 0.25 -> 0.55
        ("basal", "gland_fraction", LUMINAL, -0.50, -0.40),  # 0.50 -> 0.04
    ],
)
def test_additive_rules(
    label: str, feature: str, base: SlideLabels, low: float, high: float
) -> None:
    off, on = _mean_effect(feature, label, base)
    assert low < on - off < high


def test_morphology_values_are_physical(cancer: dict[str, np.ndarray]) -> None:
    for name in (
        "tumour_fraction",
        "gland_fraction",
        "solid_fraction",
        "necrosis_fraction",
        "stroma_fraction",
        "fat_fraction",
        "normal_epithelium_fraction",
    ):
        assert ((cancer[name] >= 0) & (cancer[name] <= 1)).all(), name
    assert (cancer["gland_fraction"] + cancer["necrosis_fraction"] <= 0.95 + 1e-9).all()
    composition = (
        cancer["stroma_fraction"] + cancer["fat_fraction"] + cancer["normal_epithelium_fraction"]
    )
    np.testing.assert_allclose(composition, 1.0, atol=1e-9)
    assert (cancer["tumour_fraction"] >= 0.10).all()
    assert 9.0 < np.median(cancer["tumour_nucleus_major_um"]) < 14.0
    assert (cancer["tumour_nucleus_axis_ratio"] >= 1.05).all()
    for name in ("tumour_density_per_mm2", "lymphocyte_density_per_mm2", "karyorrhexis_rate"):
        assert (cancer[name] > 0).all(), name


def test_normal_morphology_has_no_tumour() -> None:
    rng = np.random.default_rng(0)
    morphology = morphology_for("normal", None, rng)
    for name in MORPHOLOGY_FIELDS:
        if name.startswith("tumour_") or name in (
            "gland_fraction",
            "solid_fraction",
            "necrosis_fraction",
            "karyorrhexis_rate",
        ):
            assert getattr(morphology, name) == 0.0, name
    assert morphology.lymphocyte_density_per_mm2 > 0
    assert 6.5 <= morphology.normal_nucleus_major_um <= 8.5
    assert all(isinstance(getattr(morphology, name), float) for name in MORPHOLOGY_FIELDS)


def test_immune_score_for_tracks_density() -> None:
    rng = np.random.default_rng(1)
    base = morphology_for("cancer", LUMINAL, rng)
    low = dataclasses.replace(base, lymphocyte_density_per_mm2=100.0)
    high = dataclasses.replace(base, lymphocyte_density_per_mm2=1600.0)
    low_scores = [immune_score_for(low, rng) for _ in range(200)]
    high_scores = [immune_score_for(high, rng) for _ in range(200)]
    # Four doublings apart: 4 x 1.386 = 5.5 units.
    assert np.mean(high_scores) - np.mean(low_scores) == pytest.approx(5.545, abs=0.25)


@pytest.mark.parametrize(
    ("kind", "labels"),
    [("normal", LUMINAL), ("cancer", None), ("tumor", LUMINAL), ("", None)],
)
def test_morphology_for_rejects_bad_input(kind: str, labels: SlideLabels | None) -> None:
    with pytest.raises(InvalidInput):
        morphology_for(kind, labels, np.random.default_rng(0))


def test_sample_labels_consumes_a_generator() -> None:
    rng = np.random.default_rng(3)
    drawn = [sample_labels(rng) for _ in range(50)]
    assert all(isinstance(lab, SlideLabels) for lab in drawn)
    assert all(set(lab.as_dict().values()) <= {0, 1} for lab in drawn)
    assert len(set(drawn)) > 5


# --- sites ---------------------------------------------------------------------------


def _angle_deg(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    u, v = np.asarray(a), np.asarray(b)
    cos = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return math.degrees(math.acos(min(1.0, float(cos))))


def test_sites_have_plausible_stain_styles() -> None:
    assert [site.code for site in SITES] == ["SA", "SB", "SC", "SD", "SE", "SF"]
    for site in SITES:
        for od, reference in (
            (site.hematoxylin_od, STANDARD_HEMATOXYLIN_OD),
            (site.eosin_od, STANDARD_EOSIN_OD),
        ):
            assert np.linalg.norm(od) == pytest.approx(1.0, abs=1e-3)
            assert _angle_deg(od, reference) < 8.0
        assert 0.8 <= site.h_strength <= 1.2
        assert 0.8 <= site.e_strength <= 1.2
        r, g, b = site.background_rgb
        assert 235 <= r <= 245 and 232 <= g <= 242 and 238 <= b <= 248
    # Sites differ from one another.
    assert len({(s.hematoxylin_od, s.eosin_od) for s in SITES}) == len(SITES)
    assert _angle_deg(SITES[0].hematoxylin_od, SITES[4].hematoxylin_od) > 3.0


def test_every_site_is_used_and_has_both_kinds(manifests: list[list[SlideSpec]]) -> None:
    slides = [s for cohort in manifests for s in cohort]
    for site in SITES:
        kinds = [s.kind for s in slides if s.site == site]
        assert len(kinds) > len(slides) / len(SITES) * 0.8
        assert 0.15 < kinds.count("normal") / len(kinds) < 0.35


# --- cohort layout, determinism, IDs ------------------------------------------------


def test_same_seed_same_cohort_and_different_seed_differs() -> None:
    first = sample_cohort(30, seed=11)
    assert first == sample_cohort(30, seed=11)
    other = sample_cohort(30, seed=12)
    assert first != other
    assert [s.seed for s in first] != [s.seed for s in other]


def test_slide_i_does_not_change_when_the_cohort_grows() -> None:
    assert sample_cohort(60, seed=5)[:25] == sample_cohort(25, seed=5)


@pytest.mark.parametrize(
    ("n", "fraction", "normals"),
    [
        (1, 0.25, 0),
        (2, 0.25, 1),
        (2, 0.9, 1),
        (3, 0.05, 1),
        (4, 0.25, 1),
        (10, 0.25, 3),
        (53, 0.25, 13),
        (100, 0.25, 25),
        (100, 0.1, 10),
        (7, 0.99, 6),
        (1, 0.75, 1),
    ],
)
def test_normal_count(n: int, fraction: float, normals: int) -> None:
    cohort = sample_cohort(n, seed=0, normal_fraction=fraction)
    assert len(cohort) == n
    assert sum(s.kind == "normal" for s in cohort) == normals
    if n >= 2:
        assert any(s.kind == "cancer" for s in cohort)


def test_ids_labels_and_seeds() -> None:
    cohort = sample_cohort(40, seed=3)
    for index, spec in enumerate(cohort):
        assert re.fullmatch(r"SYN-S[A-F]-\d{4}", spec.patient_id)
        assert spec.patient_id == f"SYN-{spec.site.code}-{index:04d}"
        sample_type = "01Z" if spec.kind == "cancer" else "11A"
        assert spec.slide_id == f"{spec.patient_id}-{sample_type}-00-DX1"
        assert (spec.labels is None) == (spec.kind == "normal")
        assert 0 <= spec.seed < 2**63
    assert len({s.patient_id for s in cohort}) == len(cohort)
    assert len({s.seed for s in cohort}) == len(cohort)


def test_manifest_rows() -> None:
    cohort = sample_cohort(12, seed=2)
    rows = manifest_rows(cohort)
    assert len(rows) == len(cohort)
    for spec, row in zip(cohort, rows, strict=True):
        assert tuple(row) == MANIFEST_COLUMNS
        assert row["slide_id"] == spec.slide_id
        assert row["site"] == spec.site.code
        assert row["split"] == ""
        assert row["immune_score"] == round(spec.immune_score, 4)
        if spec.labels is None:
            assert all(row[name] == "" for name in BIOMARKERS)
        else:
            assert all(row[name] == getattr(spec.labels, name) for name in BIOMARKERS)
            assert all(type(row[name]) is int for name in BIOMARKERS)
    assert MANIFEST_COLUMNS == (
        "slide_id",
        "patient_id",
        "kind",
        "site",
        "split",
        "tp53",
        "pik3ca",
        "er",
        "pr",
        "her2",
        "basal",
        "immune_score",
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_slides": 0, "seed": 0},
        {"n_slides": -3, "seed": 0},
        {"n_slides": 10_001, "seed": 0},
        {"n_slides": 2.5, "seed": 0},
        {"n_slides": True, "seed": 0},
        {"n_slides": 10, "seed": -1},
        {"n_slides": 10, "seed": "7"},
        {"n_slides": 10, "seed": 0, "normal_fraction": 0.0},
        {"n_slides": 10, "seed": 0, "normal_fraction": 1.0},
        {"n_slides": 10, "seed": 0, "normal_fraction": -0.1},
        {"n_slides": 10, "seed": 0, "normal_fraction": float("nan")},
        {"n_slides": 10, "seed": 0, "normal_fraction": "0.25"},
    ],
)
def test_sample_cohort_rejects_bad_input(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        sample_cohort(**kwargs)  # type: ignore[arg-type]
