"""The five training augmentations on uint8 RGB patches."""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest
from skimage.color import hsv2rgb, rgb2hsv

from services.common.errors import InvalidInput
from services.inference import augment as aug
from services.inference.augment import (
    AUGMENTATION_NAMES,
    AUGMENTATIONS,
    augment,
    draw_augmentation,
    random_augment,
)

COLOUR_OPS = ("hsv_jitter", "hed_jitter", "gaussian_noise")


def _tissue(side: int = 96, seed: int = 0) -> np.ndarray:
    """Pink stroma with purple nuclei and a white gap: the colours H&E patches have."""
    rng = np.random.default_rng(seed)
    patch = np.empty((side, side, 3), np.uint8)
    patch[:] = (230, 160, 200)
    for _ in range(12):
        centre = (int(rng.integers(0, side)), int(rng.integers(0, side)))
        cv2.circle(patch, centre, int(rng.integers(3, 8)), (90, 40, 140), -1)
    patch[: side // 6, : side // 3] = 245
    noise = rng.integers(-6, 7, patch.shape)
    return np.clip(patch.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", AUGMENTATION_NAMES)
@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_every_op_keeps_shape_and_dtype_and_leaves_its_input_alone(
    name: str, strength: float
) -> None:
    patch = _tissue()
    before = patch.copy()
    out = augment(patch, name, strength, np.random.default_rng(1))
    assert out.shape == patch.shape and out.dtype == np.uint8
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(patch, before)


@pytest.mark.parametrize("name", COLOUR_OPS)
def test_colour_ops_at_strength_zero_are_the_identity(name: str) -> None:
    patch = _tissue()
    np.testing.assert_array_equal(augment(patch, name, 0.0, np.random.default_rng(2)), patch)
    # Just above zero the float round trip still returns the same pixels.
    np.testing.assert_array_equal(augment(patch, name, 1e-9, np.random.default_rng(2)), patch)


@pytest.mark.parametrize("name", COLOUR_OPS)
def test_colour_ops_change_more_with_strength(name: str) -> None:
    patch = _tissue().astype(float)
    change = []
    for strength in (0.2, 1.0):
        outs = [augment(_tissue(), name, strength, np.random.default_rng(s)) for s in range(8)]
        change.append(np.mean([np.abs(o - patch).mean() for o in outs]))
    assert 0 < change[0] < change[1]


def test_hsv_jitter_matches_a_reference_hsv_computation() -> None:
    patch = _tissue()
    out = aug.hsv_jitter(patch, 1.0, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    hue = aug.HSV_HUE_SHIFT * rng.uniform(-1, 1)
    saturation, value = 1 + aug.HSV_SCALE * rng.uniform(-1, 1, 2)
    hsv = rgb2hsv(patch)
    hsv[..., 0] = (hsv[..., 0] + hue) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 1)
    hsv[..., 2] = np.clip(hsv[..., 2] * value, 0, 1)
    expected = np.clip(np.rint(hsv2rgb(hsv) * 255), 0, 255)
    assert np.abs(out.astype(float) - expected).max() <= 1
    # "Light": no pixel moves by more than a fifth of the range.
    assert np.abs(out.astype(int) - patch).max() < 255 / 5


def _concentrations(patch: np.ndarray) -> np.ndarray:
    od = -np.log((patch.astype(float) + 1) / 256).reshape(-1, 3)
    return od @ aug._HED_FROM_RGB


def test_hed_jitter_changes_stain_amounts_not_structure() -> None:
    patch = _tissue()
    out = aug.hed_jitter(patch, 1.0, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    alpha = 1 + aug.HED_ALPHA * rng.uniform(-1, 1, 2)
    beta = aug.HED_BETA_OD * rng.uniform(-1, 1, 2)
    before, after = _concentrations(patch), _concentrations(out)
    # Each of hematoxylin and eosin is the same map, scaled and shifted (up to the
    # 8-bit rounding of the result).
    for stain in range(2):
        slope, intercept = np.polyfit(before[:, stain], after[:, stain], 1)
        assert slope == pytest.approx(alpha[stain], abs=0.01)
        assert intercept == pytest.approx(beta[stain], abs=0.01)
        assert np.corrcoef(before[:, stain], after[:, stain])[0, 1] > 0.999
    # The residual (DAB) channel is untouched; the pixels did change.
    np.testing.assert_allclose(after[:, 2], before[:, 2], atol=0.02)
    assert np.abs(out.astype(int) - patch).mean() > 1.0
    # Nuclei stay where they were: the darkest pixels are the same ones.
    dark_before = patch.sum(axis=2) < 400
    dark_after = out.sum(axis=2) < 400
    assert (dark_before == dark_after).mean() > 0.99


def test_hed_matrices_fold_deconvolution_scaling_and_reconvolution() -> None:
    matrix, offset = aug.hed_stain_matrices(np.ones(3), np.zeros(3))
    np.testing.assert_allclose(matrix, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(offset, 0)


def test_gaussian_noise_has_the_documented_sigma_and_no_bias() -> None:
    patch = np.full((256, 256, 3), 128, np.uint8)
    out = aug.gaussian_noise(patch, 0.5, np.random.default_rng(4))
    noise = out.astype(float) - 128
    assert noise.std() == pytest.approx(0.5 * aug.NOISE_SIGMA_LEVELS, rel=0.03)
    assert abs(noise.mean()) < 0.1
    # Box-Muller samples: Gaussian tails (kurtosis 3).
    assert ((noise / noise.std()) ** 4).mean() == pytest.approx(3.0, abs=0.15)


def test_flips_and_rotations_are_exact() -> None:
    patch = _tissue(side=32)
    flips = {aug.flip(patch, 0.3, np.random.default_rng(s)).tobytes() for s in range(20)}
    assert flips == {patch[:, ::-1].tobytes(), patch[::-1].tobytes()}
    turns = {aug.rot90(patch, 0.3, np.random.default_rng(s)).tobytes() for s in range(30)}
    assert turns == {np.rot90(patch, k).tobytes() for k in (1, 2, 3)}
    # A non-square patch turns on its side after an odd number of quarter turns.
    turns = int(np.random.default_rng(1).integers(1, 4))
    out = aug.rot90(np.zeros((4, 6, 3), np.uint8), 0.0, np.random.default_rng(1))
    assert out.shape == ((6, 4, 3) if turns % 2 else (4, 6, 3))


def test_random_augment_covers_all_five_with_uniform_strengths_and_repeats() -> None:
    rng = np.random.default_rng(0)
    draws = [draw_augmentation(rng) for _ in range(2000)]
    counts = Counter(name for name, _ in draws)
    assert set(counts) == set(AUGMENTATION_NAMES)
    assert min(counts.values()) > 2000 / 5 * 0.8
    strengths = np.array([s for _, s in draws])
    assert strengths.min() >= 0 and strengths.max() <= 1
    assert strengths.mean() == pytest.approx(0.5, abs=0.03)

    patch = _tissue()
    a = random_augment(patch, np.random.default_rng(9))
    b = random_augment(patch, np.random.default_rng(9))
    np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(9)
    name, strength = draw_augmentation(rng)
    np.testing.assert_array_equal(a, augment(patch, name, strength, rng))


def test_bad_arguments_are_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidInput, match="unknown augmentation 'blur'"):
        augment(_tissue(), "blur", 0.5, rng)
    with pytest.raises(InvalidInput, match="strength"):
        aug.hsv_jitter(_tissue(), 1.5, rng)
    with pytest.raises(InvalidInput, match="uint8"):
        aug.flip(_tissue().astype(np.float32), 0.5, rng)
    with pytest.raises(InvalidInput, match=r"\(H, W, 3\)"):
        aug.rot90(np.zeros((8, 8), np.uint8), 0.5, rng)


def test_each_op_is_fast_on_a_512_px_patch() -> None:
    import time

    patch = _tissue(side=512)
    rng = np.random.default_rng(0)
    for name, op in AUGMENTATIONS.items():
        op(patch, 0.7, rng)
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            op(patch, 0.7, rng)
            best = min(best, time.perf_counter() - started)
        # The target is < 5 ms; the bound leaves room for a busy shared machine.
        assert best < 0.03, f"{name}: {best * 1000:.1f} ms"
