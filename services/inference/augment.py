"""Training augmentations of uint8 RGB patches: one drawn per sampled patch.

The method draws, for every patch of an epoch, one augmentation at random with a
random strength: light HSV jitter, HED (stain) jitter, additive Gaussian noise,
flips or rotations. Each is a pure function of an (H, W, 3) ``uint8`` RGB patch, a
``strength`` in [0, 1] and a ``numpy.random.Generator`` (which draws the direction
of the change: the sign of a shift, which axis to flip); it returns a new patch of
the same shape and dtype and never changes its input.

Ranges at strength ``s`` (ours; the paper names the operations only):

==============  =========================================================================
hsv_jitter      hue shift within +-0.03 s of the colour circle (+-10.8 degrees at s = 1);
                saturation and value each multiplied by a factor within [1 - 0.1 s,
                1 + 0.1 s]. Light, as the method says.
hed_jitter      Ruifrok-Johnston colour deconvolution into hematoxylin, eosin and a
                residual (DAB) channel in optical density (natural-log units); the
                hematoxylin and eosin concentrations c become ``alpha c + beta`` with
                alpha within [1 - 0.1 s, 1 + 0.1 s] and beta within +-0.02 s OD, each
                stain drawn on its own; the residual is kept (H&E has no DAB).
gaussian_noise  additive zero-mean Gaussian noise, sigma = 10 s intensity levels (of 255).
flip            left-right or top-bottom mirror, chosen at random; exact; ``strength``
                is unused (a mirror has no magnitude).
rot90           1, 2 or 3 quarter turns, chosen at random; exact; ``strength`` unused.
==============  =========================================================================

A colour operation at strength 0 returns an identical copy of the patch. All are
vectorized over the pixels (OpenCV and numpy); each takes a few milliseconds for a
512 px patch.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from services.common.errors import InvalidInput

#: Largest hue shift at strength 1, as a fraction of the colour circle.
HSV_HUE_SHIFT = 0.03
#: Largest relative change of saturation and value at strength 1.
HSV_SCALE = 0.1
#: Largest relative change of a stain concentration at strength 1.
HED_ALPHA = 0.1
#: Largest additive change of a stain concentration at strength 1, optical density.
HED_BETA_OD = 0.02
#: Noise standard deviation at strength 1, intensity levels (of 255).
NOISE_SIGMA_LEVELS = 10.0

#: Ruifrok & Johnston (2001) stain optical-density vectors (rows: hematoxylin, eosin,
#: DAB), as in ``skimage.color``, each normalized to unit length.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
#: Optical density of each intensity level: -ln((I + 1) / 256), finite at I = 0.
_OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)

#: cv2.rotate codes for 1, 2 and 3 quarter turns counter-clockwise.
_QUARTER_TURNS_CCW = {
    1: cv2.ROTATE_90_COUNTERCLOCKWISE,
    2: cv2.ROTATE_180,
    3: cv2.ROTATE_90_CLOCKWISE,
}

Augmentation = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _check(patch: np.ndarray, strength: float) -> np.ndarray:
    """The patch as a C-contiguous array (what OpenCV needs), after checks."""
    if not isinstance(patch, np.ndarray) or patch.dtype != np.uint8:
        raise InvalidInput("a patch must be a uint8 numpy array")
    if patch.ndim != 3 or patch.shape[2] != 3:
        raise InvalidInput(f"a patch must be (H, W, 3) RGB, got shape {patch.shape}")
    if not 0.0 <= strength <= 1.0:
        raise InvalidInput(f"strength must be within 0-1, got {strength}")
    return np.ascontiguousarray(patch)


def _to_uint8(values: np.ndarray, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """``scale * values + offset`` rounded half to even and saturated to 0-255."""
    zeros = np.zeros_like(values)
    return cv2.addWeighted(values, scale, zeros, 0.0, offset, dtype=cv2.CV_8U)


def hsv_jitter(patch: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Shift the hue and scale saturation and value a little (ranges in the module doc).

    Args:
        patch: (H, W, 3) uint8 RGB.
        strength: 0 (identity) to 1 (largest change).
        rng: Draws the shift and the two factors.

    Returns:
        A new (H, W, 3) uint8 RGB patch.
    """
    patch = _check(patch, strength)
    hue_deg = 360.0 * HSV_HUE_SHIFT * strength * rng.uniform(-1.0, 1.0)
    saturation, value = 1.0 + HSV_SCALE * strength * rng.uniform(-1.0, 1.0, 2)
    if strength == 0.0:
        return patch.copy()
    # float32 HSV (H in degrees, S and V in 0-1) round-trips without the losses of
    # OpenCV's 8-bit HSV. OpenCV wraps hues >= 360 but not negative ones, so the
    # shift is made positive.
    rgb = patch.astype(np.float32)
    rgb *= np.float32(1 / 255)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    shift = np.diag([1.0, saturation, value])
    affine = np.hstack([shift, [[hue_deg % 360.0], [0.0], [0.0]]]).astype(np.float32)
    # Saturation and value capped at 1; the hue (below 720) is left to wrap.
    cap = (720.0, 1.0, 1.0, 0.0)
    hsv = cv2.min(cv2.transform(hsv, affine), cap)  # type: ignore[call-overload]
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return _to_uint8(rgb, 255.0)


def hed_stain_matrices(alpha: np.ndarray, beta_od: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The optical-density map of a HED jitter: ``od' = od @ matrix + offset``.

    Deconvolve (``od @ inv(M)`` = concentrations), scale and shift each stain, and
    convolve back (``@ M``); the three steps fold into one 3 x 3 matrix and an offset.

    Args:
        alpha: Factors of the (H, E, D) concentrations, shape (3,).
        beta_od: Additive changes of the (H, E, D) concentrations, OD, shape (3,).

    Returns:
        ``(matrix, offset)``: (3, 3) and (3,), acting on row vectors of OD.
    """
    matrix = _HED_FROM_RGB @ np.diag(alpha) @ _RGB_FROM_HED
    offset = np.asarray(beta_od, np.float64) @ _RGB_FROM_HED
    return matrix, offset


def hed_jitter(patch: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Change the amounts of hematoxylin and eosin (ranges in the module doc).

    The patch is deconvolved into stain concentrations with the fixed Ruifrok matrix;
    each stain's concentration is scaled and shifted, so every pixel keeps its place
    and the tissue's structure is untouched while the staining gets heavier or
    lighter.

    Args:
        patch: (H, W, 3) uint8 RGB.
        strength: 0 (identity) to 1 (largest change).
        rng: Draws alpha and beta per stain.

    Returns:
        A new (H, W, 3) uint8 RGB patch.
    """
    patch = _check(patch, strength)
    alpha = np.ones(3)
    beta = np.zeros(3)
    alpha[:2] += HED_ALPHA * strength * rng.uniform(-1.0, 1.0, 2)
    beta[:2] += HED_BETA_OD * strength * rng.uniform(-1.0, 1.0, 2)
    if strength == 0.0:
        return patch.copy()
    matrix, offset = hed_stain_matrices(alpha, beta)
    od = cv2.LUT(patch, _OD_LUT)
    # cv2.transform: dst = A [od, 1]^T per pixel, A is (3, 4) acting on column vectors.
    affine = np.hstack([matrix.T, offset[:, None]]).astype(np.float32)
    od = cv2.transform(od, affine)
    # I = 256 exp(-od) - 1, the inverse of the lookup table.
    np.negative(od, out=od)
    intensity = cv2.exp(od.reshape(-1, 3)).reshape(patch.shape)
    return _to_uint8(intensity, 256.0, -1.0)


def gaussian_noise(patch: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Add zero-mean Gaussian noise of sigma = 10 x ``strength`` levels, clipped to 0-255.

    Args:
        patch: (H, W, 3) uint8 RGB.
        strength: 0 (identity) to 1 (sigma 10 levels).
        rng: Draws the noise.

    Returns:
        A new (H, W, 3) uint8 RGB patch.
    """
    patch = _check(patch, strength)
    if strength == 0.0:
        return patch.copy()
    noise = _standard_normal(patch.shape, rng)
    return cv2.addWeighted(patch, 1.0, noise, NOISE_SIGMA_LEVELS * strength, 0.0, dtype=cv2.CV_8U)


def _standard_normal(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """float32 standard normal samples by Box-Muller: ~3x faster than
    ``rng.standard_normal`` for a 512 px patch, the same distribution."""
    size = int(np.prod(shape))
    half = (size + 1) // 2
    uniform = rng.random(2 * half, dtype=np.float32).reshape(2, half)
    # 1 - u lies in (0, 1]: the logarithm stays finite.
    log_u = cv2.log(np.float32(1) - uniform[0])
    log_u *= np.float32(-2)
    x, y = cv2.polarToCart(cv2.sqrt(log_u), uniform[1] * np.float32(2 * np.pi))
    return np.concatenate([x.ravel(), y.ravel()])[:size].reshape(shape)


def flip(patch: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Mirror left-right or top-bottom (chosen by ``rng``); ``strength`` is unused.

    Returns:
        A new (H, W, 3) uint8 RGB patch, the same pixels mirrored.
    """
    patch = _check(patch, strength)
    # cv2.flip codes: 1 mirrors left-right, 0 top-bottom.
    return cv2.flip(patch, int(rng.integers(0, 2)))


def rot90(patch: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate by 1, 2 or 3 quarter turns counter-clockwise (chosen by ``rng``);
    ``strength`` is unused. A non-square patch comes back (W, H, 3) after an odd
    number of turns.

    Returns:
        A new uint8 RGB patch, the same pixels rotated.
    """
    patch = _check(patch, strength)
    turns = int(rng.integers(1, 4))
    return cv2.rotate(patch, _QUARTER_TURNS_CCW[turns])


#: The method's five augmentations by name, in a fixed order.
AUGMENTATIONS: dict[str, Augmentation] = {
    "hsv_jitter": hsv_jitter,
    "hed_jitter": hed_jitter,
    "gaussian_noise": gaussian_noise,
    "flip": flip,
    "rot90": rot90,
}
AUGMENTATION_NAMES = tuple(AUGMENTATIONS)


def augment(patch: np.ndarray, name: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Apply the augmentation ``name`` at ``strength``.

    Raises:
        InvalidInput: Unknown name, bad patch or strength.
    """
    if name not in AUGMENTATIONS:
        raise InvalidInput(
            f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATION_NAMES)}"
        )
    return AUGMENTATIONS[name](patch, strength, rng)


def draw_augmentation(rng: np.random.Generator) -> tuple[str, float]:
    """One augmentation name (uniform over the five) and a strength (uniform in [0, 1])."""
    name = AUGMENTATION_NAMES[int(rng.integers(0, len(AUGMENTATION_NAMES)))]
    return name, float(rng.uniform(0.0, 1.0))


def random_augment(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One augmentation drawn at random with a random strength, applied to ``patch``.

    Equivalent to ``augment(patch, *draw_augmentation(rng), rng)`` with the same
    generator, so a seeded generator gives a repeatable result.

    Args:
        patch: (H, W, 3) uint8 RGB.
        rng: The only source of randomness.

    Returns:
        A new uint8 RGB patch.
    """
    name, strength = draw_augmentation(rng)
    return augment(patch, name, strength, rng)
