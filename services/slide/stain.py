"""Stain normalization of H&E patches: Vahadane (the paper's), Macenko and Reinhard.

Light through a stained slide follows Beer-Lambert: a pixel's optical density (OD)
``od_c = -ln(I_c / I0_c)`` (natural log, per channel c, ``I0`` the colour of empty
glass) is a non-negative mix of the stains' OD vectors, ``od = C @ M`` with ``M`` the
2x3 *stain matrix* (row 0 hematoxylin, row 1 eosin, unit rows) and ``C`` the two
concentrations. Normalizing a patch means: find its concentrations against the
*source* matrix (its slide's), rescale them so that the source's 99th-percentile
concentrations become the reference's, and re-render them with the *target* matrix
and the reference's glass colour.

How it is used on a slide (sklearn-style, as TIAToolbox):

1. ``normalizer = get_normalizer("vahadane"); normalizer.fit(reference_rgb)`` once;
   the target (``normalizer.target``, a :class:`StainMatrix`) can be stored under a
   name with :meth:`StainMatrix.to_json` and restored with :meth:`load_target`.
2. ``source = normalizer.stain_matrix_of(tissue_sample_rgb)`` once per slide, from a
   sample of its tissue pixels (an ``(N, 3)`` array or an image); it is stored with
   the slide (``stain.json``).
3. ``normalizer.transform(patch_rgb, source)`` per patch: concentrations by the 2x3
   matrix pseudo-inverse applied to OD, clipped at 0. That is one 3x2 matrix product
   per pixel, where staintools 2.1.2 re-estimates the stain matrix by dictionary
   learning *and* solves a lasso per pixel (``spams.lasso``) for every patch; hence
   the >= 100x speed-up per patch (``benchmarks/speed/stain_speed.py``).

Choices (ours):

- Glass colour ``I0`` is estimated from the image (the median of its brightest,
  near-neutral pixels) instead of assuming 255, and the output is rendered with the
  reference's glass, so background stays background (white stays white) and faint
  tissue is not tinted by the glass colour of another lab.
- Tissue pixels (used to estimate matrices and percentiles) are those whose OD norm
  exceeds :data:`TISSUE_OD` and whose OD is not saturated (:data:`MAX_OD`).
- Hematoxylin is the row with the larger red-to-green OD ratio: hematoxylin absorbs
  red and green alike (ratio ~0.9), eosin absorbs mostly green (ratio ~0.1), so the
  rule holds with a wide margin under the usual stain variation, unlike comparing the
  red component alone, which two purple-ish estimates can swap.
- Vahadane's sparse non-negative factorization is solved here by alternating an exact,
  closed-form two-atom non-negative lasso (the objective of spams ``trainDL`` mode 2,
  as in staintools) with a projected least-squares dictionary update, started from the
  standard Ruifrok-Johnston H&E vectors on a seeded pixel subsample: deterministic and
  free of spams' threads. Its sparsity weight is :data:`VAHADANE_LAMBDA` = 0.01, not
  staintools' 0.1: the L1 term shrinks each code by ``lambda`` OD and the dictionary
  absorbs the shrinkage, which at 0.1 (a large fraction of eosin's concentrations)
  tilts the eosin vector 10-20 degrees towards hematoxylin. With the unbiased vectors,
  the plain pseudo-inverse concentrations (clipped at 0) recover a known stain better
  than staintools' per-pixel lasso (``tests/unit/slide/test_stain.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cv2
import numpy as np

from services.common.errors import InvalidInput

#: Least OD norm (natural log units) of a pixel counted as tissue.
TISSUE_OD = 0.15
#: Most OD (natural log units) in any channel of a pixel used for estimates; darker
#: pixels (ink, folds, sensor clipping) are not Beer-Lambert mixtures of two stains.
MAX_OD = 3.0
#: Fewest tissue pixels needed to estimate a stain matrix.
MIN_TISSUE_PX = 64
#: Percentile of tissue concentrations used as each stain's "max" (the paper's 99th).
MAX_PERCENTILE = 99.0
#: Sparsity weight of Vahadane's factorization, natural-log OD units. The L1 term
#: shrinks every code by ``lambda`` OD, and the dictionary update absorbs what was
#: shrunk: staintools' 0.1 is 10-20% of eosin's 99th-percentile concentration on H&E
#: (0.5-1 OD), which tilts the eosin vector 10-20 degrees towards hematoxylin (13-18
#: in staintools' own estimates on the stain-recovery test pairs). 0.01 (staintools'
#: own weight for concentrations) keeps the sparse, one-stain-per-pixel preference at
#: ~1% shrinkage.
VAHADANE_LAMBDA = 0.01
#: Least angle between the estimated hematoxylin and eosin vectors, degrees; H&E's
#: are about 40° apart, an image with one stain gives two vectors on top of it.
MIN_STAIN_ANGLE_DEG = 12.0
#: Pixels sampled for Vahadane's factorization and Macenko's angles.
SAMPLE_PX = 40_000

#: Standard H&E OD directions (Ruifrok & Johnston 2001), the factorization's start.
_RUIFROK = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]], np.float64)


def _check_rgb(rgb: Any, what: str = "image") -> np.ndarray:
    """Return ``rgb`` as ``(N, 3)`` or ``(H, W, 3)`` uint8, or raise InvalidInput."""
    if not isinstance(rgb, np.ndarray):
        raise InvalidInput(f"{what} must be a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise InvalidInput(f"{what} must be uint8 RGB, got dtype {rgb.dtype}")
    if rgb.ndim not in (2, 3) or rgb.shape[-1] != 3:
        raise InvalidInput(f"{what} must be (height, width, 3) RGB, got shape {rgb.shape}")
    if rgb.size == 0:
        raise InvalidInput(f"{what} is empty")
    return rgb


def _as_image(rgb: np.ndarray) -> np.ndarray:
    """View an ``(N, 3)`` pixel sample as a one-row image (cv2 wants 3 dims)."""
    return rgb[None] if rgb.ndim == 2 else rgb


def glass_rgb_of(rgb: np.ndarray) -> np.ndarray:
    """Estimate the colour of empty glass, 0-255 per channel.

    The median of the 1% of pixels with the brightest darkest channel, if they are
    bright (every channel >= 190) and near-neutral (min/max channel >= 0.95).
    Otherwise (an image that is all tissue) a neutral gray at the brightest channel's
    99.9th percentile, or white 255 (staintools' assumption) if even that is dark.

    Args:
        rgb: uint8 RGB image or ``(N, 3)`` pixel sample.

    Returns:
        float32 (3,) glass colour.
    """
    pixels = _check_rgb(rgb).reshape(-1, 3)
    # Rank by the darkest channel: pale eosin is bright in red and blue, not in green.
    darkest = pixels.min(axis=1)
    k = max(1, len(pixels) // 100)
    brightest = pixels[np.argpartition(darkest, len(pixels) - k)[-k:]]
    glass = np.median(brightest, axis=0).astype(np.float32)
    if glass.min() >= 190 and glass.min() / max(float(glass.max()), 1.0) >= 0.95:
        return glass
    # No glass in view (all tissue): assume neutral glass as bright as the brightest
    # channel gets; red and blue pass pale eosin almost unabsorbed, so this is close.
    gray = float(np.percentile(pixels, 99.9, axis=0).max())
    return np.full(3, gray if gray >= 190 else 255.0, np.float32)


def _od_lut(glass_rgb: np.ndarray) -> np.ndarray:
    """Lookup table uint8 value -> OD per channel, float32 ``(256, 1, 3)`` for cv2.LUT."""
    values = np.maximum(np.arange(256, dtype=np.float64), 1.0)[:, None]
    od = np.maximum(-np.log(values / np.asarray(glass_rgb, np.float64)[None, :]), 0.0)
    return od.astype(np.float32).reshape(256, 1, 3)


def optical_density(rgb: np.ndarray, glass_rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-ln(I / I0)`` clipped at 0, float32, same shape as ``rgb``.

    Args:
        rgb: uint8 RGB image ``(H, W, 3)`` or pixel sample ``(N, 3)``.
        glass_rgb: Glass colour ``I0``, 0-255 per channel.
    """
    image = _as_image(_check_rgb(rgb))
    od = cv2.LUT(np.ascontiguousarray(image), _od_lut(glass_rgb))
    return od.reshape(rgb.shape)


def _tissue_od(rgb: np.ndarray, glass_rgb: np.ndarray) -> np.ndarray:
    """OD ``(N, 3)`` float32 of the tissue pixels of ``rgb`` (see module docstring)."""
    od = optical_density(rgb, glass_rgb).reshape(-1, 3)
    keep = (np.einsum("ij,ij->i", od, od) > TISSUE_OD**2) & (od.max(axis=1) < MAX_OD)
    return od[keep]


def _subsample(od: np.ndarray, count: int, seed: int) -> np.ndarray:
    if len(od) <= count:
        return od
    rng = np.random.default_rng(seed)
    return od[np.sort(rng.choice(len(od), count, replace=False))]


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def _h_first(matrix: np.ndarray) -> np.ndarray:
    """Order the two stain rows hematoxylin first (larger red/green OD ratio)."""
    ratio = matrix[:, 0] / np.maximum(matrix[:, 1], 1e-6)
    return matrix if ratio[0] >= ratio[1] else matrix[::-1].copy()


@dataclass(frozen=True)
class StainMatrix:
    """The stains of one slide or reference image.

    Attributes:
        matrix: 2x3 float32, unit-norm OD vectors (R, G, B) of hematoxylin (row 0)
            and eosin (row 1), natural-log OD.
        max_concentrations: float32 (2,), 99th-percentile H and E concentrations of
            the tissue pixels (OD units along each unit vector).
        glass_rgb: float32 (3,), colour of empty glass, 0-255.
        method: Estimator that produced it ("vahadane" or "macenko").
        name: Optional name, e.g. of a stored reference.
    """

    matrix: np.ndarray
    max_concentrations: np.ndarray
    glass_rgb: np.ndarray = field(default_factory=lambda: np.full(3, 255.0, np.float32))
    method: str = "vahadane"
    name: str = ""

    def __post_init__(self) -> None:
        matrix = np.asarray(self.matrix, np.float32)
        max_c = np.asarray(self.max_concentrations, np.float32)
        glass = np.asarray(self.glass_rgb, np.float32)
        if matrix.shape != (2, 3) or not np.isfinite(matrix).all() or (matrix < 0).any():
            raise InvalidInput(f"stain matrix must be 2x3, finite, >= 0; got {matrix!r}")
        if abs(float(np.linalg.det(matrix @ matrix.T))) < 1e-6:
            raise InvalidInput("stain matrix rows are parallel: not two distinct stains")
        if max_c.shape != (2,) or not np.isfinite(max_c).all() or (max_c <= 0).any():
            raise InvalidInput(f"max concentrations must be 2 positive numbers; got {max_c}")
        if glass.shape != (3,) or (glass <= 0).any() or (glass > 255).any():
            raise InvalidInput(f"glass colour must be 3 values in (0, 255]; got {glass}")
        for name, value in (("matrix", matrix), ("max_concentrations", max_c)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        glass.setflags(write=False)
        object.__setattr__(self, "glass_rgb", glass)

    def to_json(self) -> str:
        """Serialize (e.g. to a slide's or a named reference's ``stain.json``)."""
        return json.dumps(
            {
                "matrix": self.matrix.round(6).tolist(),
                "max_concentrations": self.max_concentrations.round(6).tolist(),
                "glass_rgb": self.glass_rgb.round(3).tolist(),
                "method": self.method,
                "name": self.name,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> StainMatrix:
        """Parse :meth:`to_json` output; raises InvalidInput if malformed."""
        try:
            data = json.loads(text)
            return cls(
                matrix=np.asarray(data["matrix"], np.float32),
                max_concentrations=np.asarray(data["max_concentrations"], np.float32),
                glass_rgb=np.asarray(data.get("glass_rgb", [255.0] * 3), np.float32),
                method=str(data.get("method", "vahadane")),
                name=str(data.get("name", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"not a stain matrix JSON: {exc}") from exc


def concentrations(od: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Fast concentrations: the stain matrix pseudo-inverse applied to OD, clipped at 0.

    Args:
        od: float32 OD, ``(..., 3)``.
        matrix: 2x3 stain matrix.

    Returns:
        float32 ``(..., 2)`` H and E concentrations.
    """
    pinv = np.linalg.pinv(np.asarray(matrix, np.float64)).astype(np.float32)  # (3, 2)
    return np.maximum(od @ pinv, 0.0)


def _nonneg_lasso_2(od: np.ndarray, atoms: np.ndarray, lam: float) -> np.ndarray:
    """Exact ``argmin_{a >= 0} 0.5 |x - a @ D|^2 + lam * sum(a)`` for two atoms, per row.

    Closed form, vectorised over pixels. Let ``a*`` be the unconstrained solution,
    ``G a* = D x - lam`` with ``G = D D^T``. The problem is convex, so ``a*`` is optimal
    when it is non-negative. If one coefficient is negative, the KKT conditions put the
    optimum on the face where that coefficient is 0, and there the other one is
    ``a*_j + (G_jk / G_jj) a*_k``, clamped at 0. Both formulas are one expression:
    ``max(a* + K min(a*, 0), 0)`` with ``K = [[0, G01/G00], [G01/G11, 0]]``.
    """
    gram = atoms @ atoms.T + 1e-9 * np.eye(2)  # (2, 2); the ridge guards parallel atoms
    both = (od @ atoms.T - lam) @ np.linalg.inv(gram).T  # (N, 2), unconstrained
    k = np.array([[0.0, gram[0, 1] / gram[0, 0]], [gram[0, 1] / gram[1, 1], 0.0]])
    return np.maximum(both + np.minimum(both, 0.0) @ k.T, 0.0)


def vahadane_matrix(od: np.ndarray, lam: float = VAHADANE_LAMBDA, iters: int = 200) -> np.ndarray:
    """Sparse non-negative factorization ``od ~ C @ M`` (Vahadane et al. 2016).

    Args:
        od: Tissue OD, ``(N, 3)``.
        lam: L1 weight on the concentrations.
        iters: Most alternating steps (stops earlier when the atoms settle).

    Returns:
        2x3 float64 unit-row stain matrix, hematoxylin first.
    """
    x = np.asarray(od, np.float64)
    atoms = _RUIFROK / np.linalg.norm(_RUIFROK, axis=1, keepdims=True)
    for _ in range(iters):
        conc = _nonneg_lasso_2(x, atoms, lam)
        # Block-coordinate dictionary update (Mairal et al. 2010), atoms kept >= 0 and
        # in the unit ball: one pass per atom on the sufficient statistics.
        gram = conc.T @ conc  # (2, 2)
        cross = conc.T @ x  # (2, 3)
        updated = atoms.copy()
        for j in range(2):
            if gram[j, j] < 1e-12:
                continue  # an unused atom keeps its direction
            step = updated[j] + (cross[j] - gram[j] @ updated) / gram[j, j]
            step = np.maximum(step, 0.0)
            updated[j] = step / max(float(np.linalg.norm(step)), 1.0)
        moved = float(np.abs(updated - atoms).max())
        atoms = updated
        if moved < 1e-6:
            break
    atoms = _unit_rows(atoms)
    return _h_first(atoms)


def macenko_matrix(od: np.ndarray, angle_percentile: float = 99.0) -> np.ndarray:
    """Stain matrix by Macenko et al. 2009: extreme angles in the OD plane of most variance.

    Args:
        od: Tissue OD, ``(N, 3)``.
        angle_percentile: Percentile of the angle taken as each stain's direction.

    Returns:
        2x3 float64 unit-row stain matrix, hematoxylin first.
    """
    x = np.asarray(od, np.float64)
    _, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    plane = vectors[:, [2, 1]]
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive OD
    projected = x @ plane
    phi = np.arctan2(projected[:, 1], projected[:, 0])
    lo, hi = np.percentile(phi, [100.0 - angle_percentile, angle_percentile])
    rows = np.stack([plane @ [np.cos(a), np.sin(a)] for a in (lo, hi)])
    return _h_first(_unit_rows(np.maximum(rows, 0.0)))


class StainNormalizer:
    """Base of the stain-matrix normalizers (Vahadane, Macenko).

    Args:
        seed: Seed of the pixel subsample used by the estimators.
    """

    method: ClassVar[str] = ""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.target: StainMatrix | None = None

    def _matrix(self, od: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def stain_matrix_of(self, rgb: np.ndarray, name: str = "") -> StainMatrix:
        """Estimate the stains of a slide (once) from an image or a sample of its pixels.

        Background is excluded by glass colour and an OD threshold, so the sample may
        include glass.

        Args:
            rgb: uint8 RGB image ``(H, W, 3)`` or pixel sample ``(N, 3)``.
            name: Name to record (e.g. of a reference).

        Returns:
            The stain matrix, 99th-percentile concentrations and glass colour.

        Raises:
            InvalidInput: Not uint8 RGB, or fewer than :data:`MIN_TISSUE_PX` tissue pixels.
        """
        glass = glass_rgb_of(rgb)
        od = _tissue_od(rgb, glass)
        if len(od) < MIN_TISSUE_PX:
            raise InvalidInput(
                f"only {len(od)} tissue pixels (need {MIN_TISSUE_PX}) to estimate stains"
            )
        matrix = self._matrix(_subsample(od, SAMPLE_PX, self.seed))
        angle = float(np.degrees(np.arccos(np.clip(np.dot(matrix[0], matrix[1]), -1.0, 1.0))))
        if angle < MIN_STAIN_ANGLE_DEG:
            # One stain only (stroma without nuclei, a nuclei cluster): both vectors
            # fall on it and the other stain cannot be told apart.
            raise InvalidInput(
                f"the two stain vectors are {angle:.1f}° apart (need {MIN_STAIN_ANGLE_DEG}°): "
                "the image holds one stain only"
            )
        conc = concentrations(od, matrix)
        max_c = np.maximum(np.percentile(conc, MAX_PERCENTILE, axis=0), 1e-3)
        return StainMatrix(matrix, max_c, glass, self.method, name)

    def fit(self, reference_rgb: np.ndarray, name: str = "reference") -> StainNormalizer:
        """Take the target stains from a reference image.

        Args:
            reference_rgb: uint8 RGB reference image.
            name: Name under which the reference is stored.

        Returns:
            self.
        """
        self.target = self.stain_matrix_of(reference_rgb, name)
        return self

    def load_target(self, target: StainMatrix) -> StainNormalizer:
        """Use a stored reference (:meth:`StainMatrix.from_json`) as the target; returns self."""
        self.target = target
        return self

    def transform(self, patch_rgb: np.ndarray, source: StainMatrix | None = None) -> np.ndarray:
        """Normalize a patch to the target stains.

        Args:
            patch_rgb: uint8 RGB ``(H, W, 3)``.
            source: The patch's slide stains from :meth:`stain_matrix_of`; when None
                they are estimated from the patch itself (slow path), and a patch with
                too little tissue only has its glass colour mapped.

        Returns:
            uint8 RGB ``(H, W, 3)`` normalized patch.

        Raises:
            InvalidInput: Not fitted, or the patch is not uint8 RGB.
        """
        target = self.target
        if target is None:
            raise InvalidInput(f"{type(self).__name__} is not fitted: call fit(reference)")
        patch = _check_rgb(patch_rgb, "patch")
        if patch.ndim != 3:
            raise InvalidInput(f"patch must be (height, width, 3), got {patch.shape}")
        if source is None:
            try:
                source = self.stain_matrix_of(patch)
            except InvalidInput:
                source = self.fallback_source(patch)
        return render_normalized(patch, source, target)

    def fallback_source(self, rgb: np.ndarray) -> StainMatrix:
        """Source stains for an image whose own cannot be estimated (too little tissue,
        one stain only): the target's stains with the image's glass colour, so that
        normalizing keeps the tissue's colours and maps only the glass."""
        target = self.target
        if target is None:
            raise InvalidInput(f"{type(self).__name__} is not fitted: call fit(reference)")
        return StainMatrix(target.matrix, target.max_concentrations, glass_rgb_of(rgb), self.method)


def render_normalized(patch: np.ndarray, source: StainMatrix, target: StainMatrix) -> np.ndarray:
    """Concentrations against ``source``, rescaled to ``target``'s maxima, rendered in its stains.

    Args:
        patch: uint8 RGB ``(H, W, 3)``.
        source: Stains of the patch's slide.
        target: Reference stains.

    Returns:
        uint8 RGB ``(H, W, 3)``.
    """
    od = cv2.LUT(np.ascontiguousarray(patch), _od_lut(source.glass_rgb))
    scale = target.max_concentrations / source.max_concentrations
    unmix = np.linalg.pinv(source.matrix.astype(np.float64)) * scale  # (3, 2)
    conc = cv2.transform(od, unmix.T.astype(np.float32))  # (H, W, 2)
    np.maximum(conc, 0.0, out=conc)
    # log(I) = log(I0_target) - C @ M_target, as one affine map per pixel.
    mix = np.concatenate(
        [-target.matrix.T.astype(np.float64), np.log(target.glass_rgb.astype(np.float64))[:, None]],
        axis=1,
    )  # (3, 3)
    log_rgb = cv2.transform(conc, mix.astype(np.float32))
    rgb = cv2.exp(log_rgb)
    return cv2.convertScaleAbs(rgb)  # rounds and saturates to 0-255


class VahadaneNormalizer(StainNormalizer):
    """Structure-preserving normalization (Vahadane et al. 2016; the paper's)."""

    method = "vahadane"

    def _matrix(self, od: np.ndarray) -> np.ndarray:
        return vahadane_matrix(od)


class MacenkoNormalizer(StainNormalizer):
    """Normalization with Macenko et al. 2009's stain estimate."""

    method = "macenko"

    def _matrix(self, od: np.ndarray) -> np.ndarray:
        return macenko_matrix(od)


@dataclass(frozen=True)
class LabStats:
    """Per-channel mean and standard deviation of an image in CIELAB (Reinhard).

    Attributes:
        mean: float32 (3,), L (0-100), a, b means.
        std: float32 (3,), their standard deviations.
        name: Optional name, e.g. of a stored reference.
    """

    mean: np.ndarray
    std: np.ndarray
    name: str = ""

    def to_json(self) -> str:
        """Serialize to JSON."""
        return json.dumps(
            {"mean": np.asarray(self.mean).tolist(), "std": np.asarray(self.std).tolist(),
             "name": self.name}
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> LabStats:
        """Parse :meth:`to_json` output; raises InvalidInput if malformed."""
        try:
            data = json.loads(text)
            mean = np.asarray(data["mean"], np.float32)
            std = np.asarray(data["std"], np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"not a LAB statistics JSON: {exc}") from exc
        if mean.shape != (3,) or std.shape != (3,) or (std <= 0).any():
            raise InvalidInput("LAB statistics need 3 means and 3 positive deviations")
        return cls(mean, std, str(data.get("name", "")))


def _lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(_as_image(rgb).astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


class ReinhardNormalizer:
    """Colour transfer by Reinhard et al. 2001: match CIELAB channel means and deviations.

    Args:
        seed: Unused; accepted so every normalizer is built alike.
    """

    method: ClassVar[str] = "reinhard"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.target: LabStats | None = None

    def stain_matrix_of(self, rgb: np.ndarray, name: str = "") -> LabStats:
        """LAB statistics of an image or pixel sample (all pixels, as Reinhard)."""
        lab = _lab(_check_rgb(rgb)).reshape(-1, 3)
        std = np.maximum(lab.std(axis=0), 1e-3).astype(np.float32)
        return LabStats(lab.mean(axis=0).astype(np.float32), std, name)

    def fit(self, reference_rgb: np.ndarray, name: str = "reference") -> ReinhardNormalizer:
        """Take the target LAB statistics from a reference image; returns self."""
        self.target = self.stain_matrix_of(reference_rgb, name)
        return self

    def load_target(self, target: LabStats) -> ReinhardNormalizer:
        """Use stored statistics as the target; returns self."""
        self.target = target
        return self

    def fallback_source(self, rgb: np.ndarray) -> LabStats:
        """The image's own statistics: Reinhard can always estimate them."""
        return self.stain_matrix_of(rgb)

    def transform(self, patch_rgb: np.ndarray, source: LabStats | None = None) -> np.ndarray:
        """Match the patch's (or its slide's, ``source``) LAB statistics to the target's.

        Args:
            patch_rgb: uint8 RGB ``(H, W, 3)``.
            source: The slide's statistics; None = the patch's own.

        Returns:
            uint8 RGB ``(H, W, 3)``.
        """
        target = self.target
        if target is None:
            raise InvalidInput("ReinhardNormalizer is not fitted: call fit(reference)")
        patch = _check_rgb(patch_rgb, "patch")
        if patch.ndim != 3:
            raise InvalidInput(f"patch must be (height, width, 3), got {patch.shape}")
        src = source if source is not None else self.stain_matrix_of(patch)
        lab = _lab(patch)
        lab = (lab - src.mean) * (target.std / src.std) + target.mean
        rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB)
        return cv2.convertScaleAbs(rgb, alpha=255.0)


Normalizer = VahadaneNormalizer | MacenkoNormalizer | ReinhardNormalizer

_NORMALIZERS: dict[str, type[Normalizer]] = {
    "vahadane": VahadaneNormalizer,
    "macenko": MacenkoNormalizer,
    "reinhard": ReinhardNormalizer,
}

#: Names accepted by :func:`get_normalizer`.
METHODS = tuple(_NORMALIZERS)


def builtin_reference(method: str = "vahadane") -> StainMatrix:
    """The target stains used when no reference is given: the widely used standard
    H&E reference of Macenko et al. (2009) — hematoxylin and eosin OD vectors and
    their 99th-percentile concentrations (natural-log OD) — on white glass."""
    return StainMatrix(
        np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]], np.float32),
        np.array([1.9705, 1.0308], np.float32),
        method=method if method in ("vahadane", "macenko") else "vahadane",
        name="builtin",
    )


def get_normalizer(name: str, seed: int = 0) -> Normalizer:
    """Build an unfitted normalizer by name ("vahadane", "macenko", "reinhard").

    Raises:
        InvalidInput: Unknown name.
    """
    try:
        return _NORMALIZERS[name.lower()](seed=seed)
    except (KeyError, AttributeError):
        raise InvalidInput(
            f"unknown stain normalization method {name!r}; choose one of {', '.join(METHODS)}"
        ) from None


def normalize_image(
    image_rgb: np.ndarray, reference_rgb: np.ndarray, method: str = "vahadane"
) -> np.ndarray:
    """Normalize one image to a reference image (used by ``histomarker normalize``).

    The image's own stains are estimated from the whole image, then it is transformed.

    Args:
        image_rgb: uint8 RGB ``(H, W, 3)`` to normalize.
        reference_rgb: uint8 RGB reference.
        method: "vahadane" (default), "macenko" or "reinhard".

    Returns:
        uint8 RGB ``(H, W, 3)``.
    """
    normalizer = get_normalizer(method)
    normalizer.fit(_check_rgb(reference_rgb, "reference"))
    image = _check_rgb(image_rgb, "image")
    if isinstance(normalizer, ReinhardNormalizer):
        return normalizer.transform(image)
    try:
        source: StainMatrix | None = normalizer.stain_matrix_of(image)
    except InvalidInput:
        source = None  # too little tissue: transform maps the glass colour only
    return normalizer.transform(image, source)


@dataclass
class SlideStains:
    """A slide's stains and the normalizer that maps them onto the reference.

    Attributes:
        method: Normalization method (``vahadane``, ``macenko``, ``reinhard``).
        normalizer: Loaded with the reference as its target.
        source: The slide's own stains (or the fallback; see ``estimate``).
        reference: The target stains.
        estimate: ``ok``, or ``fallback: <why>`` when the slide's stains could not
            be estimated and the reference's own were used (colours kept, glass mapped).
    """

    method: str
    normalizer: Normalizer
    source: StainMatrix | LabStats
    reference: StainMatrix | LabStats
    estimate: str

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """A patch of this slide in the reference's colours."""
        return self.normalizer.transform(rgb, self.source)  # type: ignore[arg-type]
