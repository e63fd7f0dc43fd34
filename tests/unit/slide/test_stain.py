"""Stain normalization: API, edge cases, and recovery of a known stain vs staintools."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import structural_similarity

from services.common.errors import InvalidInput
from services.slide.stain import (
    MacenkoNormalizer,
    ReinhardNormalizer,
    StainMatrix,
    VahadaneNormalizer,
    get_normalizer,
    normalize_image,
)
from services.synth.labels import SITES, Site, sample_cohort
from services.synth.render import Stain, TileRenderer
from services.synth.slide import SyntheticSlide

PATCH_PX = 512
#: Tissue-only 512 px patches (level 0, x, y) of the test slide, and a disjoint
#: 1024 px reference region.
PATCH_XY = ((2304, 768), (2560, 1280))
REFERENCE_XY = (1024, 1024)
REFERENCE_PX = 1024


@pytest.fixture(scope="module")
def slide() -> SyntheticSlide:
    spec = next(s for s in sample_cohort(8, 3) if s.kind == "cancer")
    return SyntheticSlide(spec, 4096, 3072)


def render(slide: SyntheticSlide, site: Site, x: int, y: int, size: int) -> np.ndarray:
    """The same tissue of ``slide`` stained as at ``site``."""
    stain = Stain(
        hematoxylin=site.hematoxylin_od,
        eosin=site.eosin_od,
        h_scale=site.h_strength,
        e_scale=site.e_strength,
        background_rgb=site.background_rgb,
    )
    renderer = TileRenderer(
        slide.layout, slide.renderer.atlas, slide.nuclei, stain, slide.spec.seed
    )
    return renderer.render(x, y, size, size).rgb


def mean_ciede2000(a: np.ndarray, b: np.ndarray) -> float:
    return float(deltaE_ciede2000(rgb2lab(a), rgb2lab(b)).mean())


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(a, b, channel_axis=2))


def test_factory_and_validation() -> None:
    assert isinstance(get_normalizer("Vahadane"), VahadaneNormalizer)
    assert isinstance(get_normalizer("macenko"), MacenkoNormalizer)
    assert isinstance(get_normalizer("reinhard"), ReinhardNormalizer)
    with pytest.raises(InvalidInput, match="unknown stain normalization"):
        get_normalizer("ruifrok")
    normalizer = VahadaneNormalizer()
    patch = np.full((8, 8, 3), 200, np.uint8)
    with pytest.raises(InvalidInput, match="not fitted"):
        normalizer.transform(patch)
    with pytest.raises(InvalidInput, match="uint8"):
        normalizer.stain_matrix_of(patch.astype(np.float32))
    with pytest.raises(InvalidInput, match="shape"):
        normalizer.stain_matrix_of(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(InvalidInput, match="tissue pixels"):
        normalizer.stain_matrix_of(np.full((64, 64, 3), 240, np.uint8))


def test_stain_matrix_json_round_trip_and_checks() -> None:
    matrix = StainMatrix(
        np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]), np.array([1.2, 2.0]), name="ref-A"
    )
    back = StainMatrix.from_json(matrix.to_json())
    np.testing.assert_allclose(back.matrix, matrix.matrix, atol=1e-6)
    np.testing.assert_allclose(back.max_concentrations, matrix.max_concentrations, atol=1e-6)
    assert back.name == "ref-A" and back.method == "vahadane"
    with pytest.raises(InvalidInput, match="parallel"):
        StainMatrix(np.array([[0.6, 0.7, 0.3], [0.6, 0.7, 0.3]]), np.array([1.0, 1.0]))
    with pytest.raises(InvalidInput, match="not a stain matrix"):
        StainMatrix.from_json("{}")


def test_estimates_known_stains_hematoxylin_first(slide: SyntheticSlide) -> None:
    site = SITES[0]
    rgb = render(slide, site, *PATCH_XY[0], PATCH_PX)
    truth = np.array([site.hematoxylin_od, site.eosin_od])
    for normalizer in (VahadaneNormalizer(), MacenkoNormalizer()):
        first = normalizer.stain_matrix_of(rgb)
        again = normalizer.stain_matrix_of(rgb)
        np.testing.assert_array_equal(first.matrix, again.matrix)  # deterministic
        cosines = np.sum(first.matrix * truth, axis=1) / np.linalg.norm(truth, axis=1)
        assert (cosines > np.cos(np.radians(15))).all(), (normalizer.method, cosines)


def test_background_stays_background(slide: SyntheticSlide) -> None:
    reference = render(slide, SITES[1], *REFERENCE_XY, REFERENCE_PX)
    normalizer = VahadaneNormalizer().fit(reference)
    assert normalizer.target is not None
    glass = np.empty((64, 64, 3), np.uint8)
    glass[:] = SITES[0].background_rgb
    source = normalizer.stain_matrix_of(render(slide, SITES[0], 512, 256, PATCH_PX))
    out = normalizer.transform(glass, source)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), normalizer.target.glass_rgb, atol=3)
    # A tissue-free patch without a slide matrix is mapped too, not rejected.
    assert normalizer.transform(glass).shape == glass.shape


@pytest.mark.parametrize("method", ["vahadane", "macenko", "reinhard"])
def test_normalize_image_keeps_shape_and_type(slide: SyntheticSlide, method: str) -> None:
    image = render(slide, SITES[2], *PATCH_XY[0], 256)
    reference = render(slide, SITES[3], *REFERENCE_XY, 256)
    out = normalize_image(image, reference, method)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert ssim(out, image) > 0.8


def _pairs() -> list[tuple[Site, Site]]:
    """Stain pairs (A, B): site vectors, strengths pushed to 0.75-1.3."""
    sa, sb, sc, sd, se, sf = SITES
    return [
        (sa, dataclasses.replace(sb, h_strength=1.3, e_strength=0.75)),
        (dataclasses.replace(sc, h_strength=0.75, e_strength=1.3), sd),
        (dataclasses.replace(se, h_strength=0.75, e_strength=0.75), sa),
        (sf, dataclasses.replace(sc, h_strength=1.25, e_strength=0.8)),
        (sb, dataclasses.replace(se, h_strength=1.2, e_strength=1.0)),
        (dataclasses.replace(sd, h_strength=0.8, e_strength=1.2), sf),
    ]


def test_recovers_known_stain_as_well_as_staintools(slide: SyntheticSlide) -> None:
    """A (stains A) normalized to a reference in stains B comes as close to B as staintools.

    Like for like: staintools re-estimates the stains of every patch, so ours is given
    the patch's own matrix here; the slide-matrix column uses a matrix estimated once
    from a sample of the slide (several tiles, some glass), the production path.
    """
    staintools = pytest.importorskip("staintools")
    rows = []
    for index, (site_a, site_b) in enumerate(_pairs()):
        x, y = PATCH_XY[index % len(PATCH_XY)]
        patch_a = render(slide, site_a, x, y, PATCH_PX)
        patch_b = render(slide, site_b, x, y, PATCH_PX)
        reference = render(slide, site_b, *REFERENCE_XY, REFERENCE_PX)
        sample = np.concatenate(
            [render(slide, site_a, *xy, PATCH_PX).reshape(-1, 3) for xy in SLIDE_SAMPLE_XY]
        )
        ours = VahadaneNormalizer().fit(reference)
        out_patch = ours.transform(patch_a)
        out_slide = ours.transform(patch_a, ours.stain_matrix_of(sample))
        macenko = MacenkoNormalizer().fit(reference).transform(patch_a)
        # staintools' README standardizes brightness first ("optional"); that moves
        # the output away from B's brightness (mean dE 5-12 here), so the stronger,
        # unstandardized staintools is the baseline. Copies: staintools edits inputs.
        theirs = staintools.StainNormalizer(method="vahadane")
        theirs.fit(reference.copy())
        out_theirs = theirs.transform(patch_a.copy())
        rows.append(
            (
                f"{site_a.code}->{site_b.code}",
                mean_ciede2000(out_patch, patch_b),
                ssim(out_patch, patch_b),
                mean_ciede2000(out_slide, patch_b),
                mean_ciede2000(macenko, patch_b),
                mean_ciede2000(out_theirs, patch_b),
                ssim(out_theirs, patch_b),
                mean_ciede2000(patch_a, patch_b),
            )
        )
    print("\n| pair | ours dE | ours SSIM | ours slide-matrix dE | ours Macenko dE "
          "| staintools dE | staintools SSIM | unnormalized dE |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | " + " | ".join(f"{v:.3f}" for v in row[1:]) + " |")
    failures = [
        row[0]
        for row in rows
        if not (row[1] <= row[5] + 0.25 and row[2] >= 0.95 and row[1] < 0.75 * row[7])
    ]
    assert not failures, failures
    for name, ours_de, ours_ssim, _, _, theirs_de, _, raw_de in rows:
        assert ours_de <= theirs_de + 0.25, name
        assert ours_ssim >= 0.95, name
        assert ours_de < 0.75 * raw_de, name


SLIDE_SAMPLE_XY = ((512, 256), (1280, 768), (2048, 1024), (2560, 768), (1536, 1536), (2304, 1280))


@pytest.mark.parametrize("method", ["vahadane", "macenko"])
def test_a_one_stain_image_is_refused_for_estimates_but_still_normalized(
    slide: SyntheticSlide, method: str
) -> None:
    """Pure eosin (stroma without nuclei): no second stain to separate."""
    eosin_od = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
    rng = np.random.default_rng(0)
    amount = rng.uniform(0.2, 0.9, (128, 128, 1))
    rgb = np.clip(255 * np.exp(-amount * eosin_od), 0, 255).astype(np.uint8)
    normalizer = get_normalizer(method).fit(render(slide, SITES[1], *REFERENCE_XY, REFERENCE_PX))
    with pytest.raises(InvalidInput, match="one stain"):
        normalizer.stain_matrix_of(rgb)
    out = normalizer.transform(rgb)
    assert out.shape == rgb.shape and ssim(out, rgb) > 0.8
