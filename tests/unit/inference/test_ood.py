"""The OOD detector: descriptors on known images, slide summaries, fitting guards, JSON
round trip, and a planted distribution shift refused while its source is answered."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from services.common.errors import FailedPrecondition, InvalidInput
from services.inference.ood import (
    MIN_CALIBRATION_SLIDES,
    MIN_TRAIN_SLIDES,
    PATCH_FEATURES,
    SLIDE_FEATURES,
    OodDetector,
    patch_descriptors,
    robust_quantile,
    slide_descriptor,
)
from services.synth.labels import sample_cohort
from services.synth.slide import SyntheticSlide

F = len(PATCH_FEATURES)


def column(desc: np.ndarray, name: str) -> np.ndarray:
    return desc[:, PATCH_FEATURES.index(name)]


@pytest.fixture(scope="module")
def synthetic_tile() -> np.ndarray:
    """A 512 px 20x patch of a synthetic cancer slide (rendered at 40x, halved)."""
    spec = next(s for s in sample_cohort(8, 3) if s.kind == "cancer")
    rgb = SyntheticSlide(spec, 2048, 2048).renderer.render(512, 512, 1024, 1024).rgb
    return cv2.resize(rgb, (512, 512), interpolation=cv2.INTER_AREA)


def test_uniform_glass_is_all_glass_and_no_structure() -> None:
    desc = patch_descriptors(np.full((2, 512, 512, 3), 246, np.uint8))
    assert desc.shape == (2, F) and desc.dtype == np.float32
    assert np.isfinite(desc).all()
    assert column(desc, "glass_share").tolist() == [1.0, 1.0]
    for name in ("od_g_mean", "band_1um", "dark_share", "blob_log_density"):
        assert column(desc, name).tolist() == [0.0, 0.0]


def test_random_noise_has_its_energy_at_the_finest_scale() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)
    desc = patch_descriptors(noise)
    assert np.isfinite(desc).all()
    # The Laplacian energy of white noise is 20 times its variance: 1 by construction.
    assert column(desc, "band_0.5um")[0] == pytest.approx(1.0, abs=0.05)
    assert column(desc, "coherence_global")[0] < 0.1
    assert column(desc, "glass_share")[0] < 0.01


def test_a_synthetic_tile_has_tissue_glass_and_nuclei(synthetic_tile: np.ndarray) -> None:
    desc = patch_descriptors(synthetic_tile[None])
    assert desc.shape == (1, F) and np.isfinite(desc).all()
    assert 0.0 < column(desc, "glass_share")[0] < 0.5
    assert column(desc, "dark_share")[0] > 0.02
    # Nuclei of 20-150 µm²: thousands per mm² of tissue, a median of e^3-e^5 µm².
    assert column(desc, "blob_log_density")[0] > np.log(500)
    assert 3.0 < column(desc, "blob_log_area_median")[0] < 5.0
    assert 0.0 < column(desc, "eosin_mix_mean")[0] < 1.0


def test_patches_at_another_resolution_are_resampled_first(synthetic_tile: np.ndarray) -> None:
    at_40x = cv2.resize(synthetic_tile, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    direct = patch_descriptors(synthetic_tile[None])
    resampled = patch_descriptors(at_40x[None], mpp=0.25)
    # Colour survives the round trip almost exactly; texture and blobs closely.
    colour = [PATCH_FEATURES.index(n) for n in PATCH_FEATURES if n.startswith("od_")]
    assert np.allclose(direct[:, colour], resampled[:, colour], atol=0.02)
    assert np.allclose(direct, resampled, rtol=0.35, atol=0.05)


def test_no_patches_give_an_empty_table() -> None:
    assert patch_descriptors(np.zeros((0, 512, 512, 3), np.uint8)).shape == (0, F)


@pytest.mark.parametrize(
    ("patches", "mpp", "message"),
    [
        (np.zeros((1, 512, 512, 3), np.float32), 0.5, "uint8"),
        (np.zeros((512, 512, 3), np.uint8), 0.5, "uint8"),
        (np.zeros((1, 512, 512, 4), np.uint8), 0.5, "uint8"),
        (np.zeros((1, 512, 512, 3), np.uint8), 0.0, "mpp"),
        (np.zeros((1, 512, 512, 3), np.uint8), float("nan"), "mpp"),
        (np.zeros((1, 40, 512, 3), np.uint8), 0.5, "at least"),
        (np.zeros((1, 100, 100, 3), np.uint8), 0.25, "at least"),
    ],
)
def test_bad_patches_are_refused(patches: np.ndarray, mpp: float, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        patch_descriptors(patches, mpp=mpp)


def test_slide_descriptor_of_one_patch_and_of_thousands() -> None:
    row = np.arange(F, dtype=np.float32)[None]
    one = slide_descriptor(row)
    assert one.shape == (len(SLIDE_FEATURES),) == (5 * F,)
    assert np.array_equal(one[:F], row[0]) and not one[F : 2 * F].any()
    assert np.array_equal(one[2 * F :], np.tile(row[0], 3))
    many = slide_descriptor(np.random.default_rng(0).normal(size=(5000, F)))
    assert np.isfinite(many).all()
    assert np.allclose(many[F : 2 * F], 1.0, atol=0.05)  # the std
    assert np.allclose(many[2 * F : 3 * F], -1.28, atol=0.1)  # the 10th percentile


@pytest.mark.parametrize(
    "bad", [np.zeros((0, F)), np.zeros(F), np.full((3, F), np.nan), np.zeros((2, 2, F))]
)
def test_slide_descriptor_refuses_what_is_not_a_slide(bad: np.ndarray) -> None:
    with pytest.raises(InvalidInput):
        slide_descriptor(bad)


def gaussian_slides(
    rng: np.random.Generator, count: int, shift: float = 0.0, features: int = 6
) -> list[np.ndarray]:
    """Slides of 5-40 patches: a slide-level mean ~ N(shift, 1) plus patch noise."""
    slides = []
    for _ in range(count):
        centre = rng.normal(shift, 1.0, features)
        size = int(rng.integers(5, 41))
        slides.append(centre + rng.normal(0.0, 0.5, (size, features)))
    return slides


@pytest.fixture(scope="module")
def planted() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(7)
    return {
        "train": gaussian_slides(rng, 60),
        "calibration": gaussian_slides(rng, 60),
        "heldout": gaussian_slides(rng, 300),
        "shifted": gaussian_slides(rng, 100, shift=5.0),
    }


@pytest.mark.parametrize("method", ["knn", "mahalanobis"])
def test_a_planted_shift_is_refused_and_the_source_answered(
    planted: dict[str, list[np.ndarray]], method: str
) -> None:
    def answered(detector: OodDetector, slides: list[np.ndarray]) -> float:
        return float(np.mean([not detector.decide(s).ood for s in slides]))

    exact = OodDetector(method, margin=1.0).fit(planted["train"], planted["calibration"], 0.9)
    # Without a margin, held-out slides of the source are answered at about the rate
    # asked (the calibration sample is 60 slides: a few points either way).
    assert 0.8 <= answered(exact, planted["heldout"]) <= 0.98
    detector = OodDetector(method).fit(planted["train"], planted["calibration"])
    assert answered(detector, planted["heldout"]) >= 0.95
    assert answered(detector, planted["shifted"]) <= 0.02
    decision = detector.decide(planted["shifted"][0])
    assert decision.ood and decision.distance > decision.threshold == detector.threshold
    # The patch view sees the shift too.
    source = detector.patch_distances(planted["heldout"][0])
    shifted = detector.patch_distances(planted["shifted"][0])
    assert source.shape == (len(planted["heldout"][0]),)
    assert np.median(shifted) > detector.patch_threshold > np.median(source)


def test_one_patch_slides_of_the_source_are_answered(
    planted: dict[str, list[np.ndarray]],
) -> None:
    detector = OodDetector().fit(planted["train"], planted["calibration"])
    singles = [s[[0]] for s in planted["heldout"]]
    assert np.mean([not detector.decide(s).ood for s in singles]) >= 0.9


@pytest.mark.parametrize("method", ["knn", "mahalanobis"])
def test_the_json_round_trip_gives_identical_distances(
    planted: dict[str, list[np.ndarray]], method: str
) -> None:
    detector = OodDetector(method).fit(
        planted["train"], planted["calibration"], description="planted Gaussians"
    )
    text = detector.to_json()
    data = json.loads(text)
    assert data["method"] == method and data["training"]["description"] == "planted Gaussians"
    assert data["training"]["train_slides"] == 60
    again = OodDetector.from_json(text)
    assert again.threshold == detector.threshold
    assert again.patch_threshold == detector.patch_threshold
    for slide in planted["heldout"][:20] + planted["shifted"][:5]:
        assert again.decide(slide) == detector.decide(slide)
        assert np.array_equal(again.patch_distances(slide), detector.patch_distances(slide))
    assert again.to_json() == text


def test_a_slide_descriptor_or_its_patches_give_the_same_distance(
    planted: dict[str, list[np.ndarray]],
) -> None:
    detector = OodDetector().fit(planted["train"], planted["calibration"])
    slide = planted["heldout"][3]
    assert detector.distance(slide) == detector.distance(slide_descriptor(slide))


def test_too_few_slides_are_refused_with_the_reason(
    planted: dict[str, list[np.ndarray]],
) -> None:
    train, calibration = planted["train"], planted["calibration"]
    with pytest.raises(InvalidInput, match=f"at least {MIN_TRAIN_SLIDES}"):
        OodDetector().fit(train[: MIN_TRAIN_SLIDES - 1], calibration)
    with pytest.raises(InvalidInput, match=f"at least {MIN_CALIBRATION_SLIDES} held-out"):
        OodDetector().fit(train, calibration[: MIN_CALIBRATION_SLIDES - 1])
    OodDetector().fit(train[:MIN_TRAIN_SLIDES], calibration[:MIN_CALIBRATION_SLIDES])


def test_malformed_slides_and_arguments_are_refused(
    planted: dict[str, list[np.ndarray]],
) -> None:
    train, calibration = planted["train"], planted["calibration"]
    with pytest.raises(InvalidInput, match="features"):
        OodDetector().fit(train, [*calibration[:-1], np.zeros((4, 7))])
    with pytest.raises(InvalidInput, match="N >= 1"):
        OodDetector().fit([np.zeros((0, 6)), *train], calibration)
    with pytest.raises(InvalidInput, match="answer_rate"):
        OodDetector().fit(train, calibration, answer_rate=1.0)
    with pytest.raises(InvalidInput, match="unknown distance"):
        OodDetector("cosine")
    with pytest.raises(InvalidInput, match="margin"):
        OodDetector(margin=0.5)
    detector = OodDetector().fit(train, calibration)
    with pytest.raises(InvalidInput, match="slide descriptor"):
        detector.distance(np.zeros(7))
    with pytest.raises(InvalidInput, match="features"):
        detector.patch_distances(np.zeros((3, 5)))


def test_an_unfitted_detector_says_so() -> None:
    with pytest.raises(FailedPrecondition, match="not fitted"):
        OodDetector().distance(np.zeros((2, F)))
    with pytest.raises(FailedPrecondition, match="not fitted"):
        OodDetector().to_json()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not a valid"),
        ('{"kind": "something else"}', "not an OOD detector"),
        ('{"kind": "histomarker.ood_detector", "version": 99}', "version 99"),
        ('{"kind": "histomarker.ood_detector", "version": 1}', "not a valid"),
    ],
)
def test_from_json_refuses_what_is_not_a_detector(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        OodDetector.from_json(text)


def test_the_calibration_quantile_sets_a_lone_outlier_aside() -> None:
    values = np.concatenate([np.linspace(8.0, 12.0, 11), [60.0]])
    assert robust_quantile(values, 0.975) == pytest.approx(12.0)
    assert robust_quantile(np.linspace(8.0, 12.0, 12), 0.5) == pytest.approx(
        np.quantile(np.linspace(8.0, 12.0, 12), 0.5, method="higher")
    )
