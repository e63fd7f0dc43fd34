"""The label model's morphology reaches the rendered nuclei and pixels."""

from __future__ import annotations

import dataclasses

import numpy as np

from services.synth.labels import SlideSpec, sample_cohort
from services.synth.layout import STROMA, TUMOUR
from services.synth.nuclei import CELL_PX, KARYORRHEXIS, LYMPHOCYTE, TUMOUR_NUCLEUS
from services.synth.slide import SyntheticSlide

WIDTH, HEIGHT = 4096, 3072


def _cancer_spec(seed: int = 3) -> SlideSpec:
    return next(spec for spec in sample_cohort(8, seed) if spec.kind == "cancer")


def _with(spec: SlideSpec, **changes: float) -> SlideSpec:
    return dataclasses.replace(spec, morphology=dataclasses.replace(spec.morphology, **changes))


def _counts(slide: SyntheticSlide) -> dict[int, int]:
    counts: dict[int, int] = {}
    for cy in range(HEIGHT // CELL_PX):
        for cx in range(WIDTH // CELL_PX):
            kinds = slide.nuclei.cell(cx, cy).kind
            for kind, count in zip(*np.unique(kinds, return_counts=True), strict=True):
                counts[int(kind)] = counts.get(int(kind), 0) + int(count)
    return counts


def test_lymphocyte_density_drives_the_lymphocytes_drawn() -> None:
    spec = _cancer_spec()
    base = spec.morphology.lymphocyte_density_per_mm2
    few = _counts(SyntheticSlide(_with(spec, lymphocyte_density_per_mm2=base), WIDTH, HEIGHT))
    many = _counts(SyntheticSlide(_with(spec, lymphocyte_density_per_mm2=3 * base), WIDTH, HEIGHT))
    assert 2.3 < many[LYMPHOCYTE] / few[LYMPHOCYTE] < 3.7
    # Other types are untouched by the lymphocyte rule (same layout, same seeds).
    assert abs(many.get(TUMOUR_NUCLEUS, 0) - few.get(TUMOUR_NUCLEUS, 0)) < 0.1 * few[TUMOUR_NUCLEUS]


def test_karyorrhexis_rate_drives_the_fragment_clusters() -> None:
    spec = _with(_cancer_spec(), necrosis_fraction=0.0)
    low = _counts(SyntheticSlide(_with(spec, karyorrhexis_rate=0.005), WIDTH, HEIGHT))
    high = _counts(SyntheticSlide(_with(spec, karyorrhexis_rate=0.08), WIDTH, HEIGHT))
    assert high.get(KARYORRHEXIS, 0) > 5 * max(1, low.get(KARYORRHEXIS, 0))


def test_gland_fraction_drives_tubules_and_tumour_fraction_the_tumour_area() -> None:
    spec = _cancer_spec()
    solid = SyntheticSlide(_with(spec, gland_fraction=0.02), WIDTH, HEIGHT)
    glandular = SyntheticSlide(_with(spec, gland_fraction=0.6), WIDTH, HEIGHT)
    tubules = [sum(g.tumour for g in s.layout.glands) for s in (solid, glandular)]
    assert tubules[1] > 3 * max(1, tubules[0])
    small = SyntheticSlide(_with(spec, tumour_fraction=0.15), WIDTH, HEIGHT)
    large = SyntheticSlide(_with(spec, tumour_fraction=0.6), WIDTH, HEIGHT)
    share = [s.layout.tumour.sum() / s.layout.tissue.sum() for s in (small, large)]
    assert 0.1 < share[0] < 0.2 and 0.5 < share[1] < 0.7


def test_tumour_nuclei_size_follows_the_rule() -> None:
    spec = _cancer_spec()
    sizes = []
    for major_um in (9.0, 14.0):
        slide = SyntheticSlide(_with(spec, tumour_nucleus_major_um=major_um), WIDTH, HEIGHT)
        majors = []
        for cy in range(HEIGHT // CELL_PX):
            for cx in range(WIDTH // CELL_PX):
                cell = slide.nuclei.cell(cx, cy)
                majors.extend(cell.major[cell.kind == TUMOUR_NUCLEUS] * 0.25)
        sizes.append(float(np.mean(majors)))
    assert abs(sizes[0] - 9.0) < 0.8 and abs(sizes[1] - 14.0) < 1.2


def test_hematoxylin_scale_darkens_nuclei_in_pixels() -> None:
    spec = _cancer_spec()
    means = []
    for scale in (0.8, 1.3):
        slide = SyntheticSlide(_with(spec, hematoxylin_scale=scale), WIDTH, HEIGHT)
        ys, xs = np.nonzero(slide.layout.region == TUMOUR)
        i = len(xs) // 2
        x0, y0 = (int(xs[i]) * 32 // 512) * 512, (int(ys[i]) * 32 // 512) * 512
        tile = slide.renderer.render(x0, y0, 512, 512, with_labels=True)
        assert tile.labels is not None
        means.append(tile.rgb[tile.labels > 0][:, 0].mean())
    assert means[1] < means[0] - 10


def test_tiles_meet_without_seams() -> None:
    slide = SyntheticSlide(_cancer_spec(), WIDTH, HEIGHT)
    ys, xs = np.nonzero(slide.layout.region == STROMA)
    i = len(xs) // 2
    x0, y0 = (int(xs[i]) * 32 // 512) * 512, (int(ys[i]) * 32 // 512) * 512
    x0, y0 = min(x0, WIDTH - 1024), min(y0, HEIGHT - 1024)
    whole = slide.renderer.render(x0, y0, 1024, 1024).rgb.astype(int)
    quarters = np.zeros_like(whole)
    for dy in (0, 512):
        for dx in (0, 512):
            tile = slide.renderer.render(x0 + dx, y0 + dy, 512, 512).rgb
            quarters[dy : dy + 512, dx : dx + 512] = tile
    diff = np.abs(whole - quarters)
    assert diff.mean() < 0.5
    assert np.percentile(diff, 99.9) < 30


def _tumour_tile(slide: SyntheticSlide, side: int = 512) -> tuple[int, int]:
    """Origin of a tile whose centre is tumour."""
    ys, xs = np.nonzero(slide.layout.region == TUMOUR)
    i = len(xs) // 2
    ds = slide.layout.downsample
    x0 = min(max(0, int(xs[i]) * ds - side // 2) // ds * ds, WIDTH - side)
    y0 = min(max(0, int(ys[i]) * ds - side // 2) // ds * ds, HEIGHT - side)
    return x0, y0


def test_apoptotic_cells_in_viable_tumour_sit_in_a_clear_halo() -> None:
    spec = _with(_cancer_spec(), necrosis_fraction=0.0, karyorrhexis_rate=0.2)
    slide = SyntheticSlide(spec, WIDTH, HEIGHT)
    x0, y0 = _tumour_tile(slide, 1024)
    tile = slide.renderer.render(x0, y0, 1024, 1024, with_labels=True)
    assert tile.labels is not None
    nuclei = tile.nuclei
    ring, cytoplasm = [], []
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    for i in range(len(nuclei)):
        cx, cy = float(nuclei.x[i]) - x0, float(nuclei.y[i]) - y0
        if not (40 <= cx < 984 and 40 <= cy < 984):
            continue
        if nuclei.kind[i] == KARYORRHEXIS:
            # Halo middle: body radius (0.55 x cluster extent) + half of 2.5 µm.
            r = 0.55 * float(nuclei.major[i]) + 1.25 / 0.25
            xs = np.round(cx + r * np.cos(angles)).astype(int)
            ys = np.round(cy + r * np.sin(angles)).astype(int)
            ring.append(np.median(tile.rgb[ys, xs].astype(float).mean(axis=1)))
    tumour = slide.renderer._regions(x0, y0, 1024, 1024) == TUMOUR
    empty = tumour & (tile.labels == 0)
    cytoplasm = tile.rgb[empty].astype(float).mean(axis=1)
    assert len(ring) >= 10
    # The halo is nearly as bright as glass; tumour cytoplasm is not.
    assert np.median(ring) > np.percentile(cytoplasm, 90)


def test_nucleolus_fraction_enlarges_the_dark_nucleoli() -> None:
    spec = _cancer_spec()
    dark = []
    for fraction in (0.17, 0.34):
        slide = SyntheticSlide(_with(spec, tumour_nucleolus_fraction=fraction), WIDTH, HEIGHT)
        x0, y0 = _tumour_tile(slide)
        tile = slide.renderer.render(x0, y0, 512, 512, with_labels=True)
        assert tile.labels is not None
        ys, xs = np.nonzero(tile.labels)
        n = tile.nuclei
        i = tile.labels[ys, xs] - 1
        tumour = n.kind[i] == TUMOUR_NUCLEUS
        ys, xs, i = ys[tumour], xs[tumour], i[tumour]
        theta = np.radians(n.angle[i])
        dx, dy = xs + x0 - n.x[i], ys + y0 - n.y[i]
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / (n.major[i] / 2)
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / (n.minor[i] / 2)
        inner = u * u + v * v < 0.4
        red = tile.rgb[ys, xs, 0].astype(float)
        # In a vesicular nucleus the middle is pale; only the nucleolus there is dark.
        dark.append(float((red[inner] < np.median(red)).mean()))
    assert dark[1] > 1.6 * dark[0]
