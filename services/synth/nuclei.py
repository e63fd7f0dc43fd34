"""Where the nuclei of a synthetic slide are, and what they look like.

Nuclei are generated per square *cell* of ``CELL_PX`` level-0 pixels from a random
generator seeded by (slide seed, cell column, cell row), so any tile can be rendered
on its own and neighbouring tiles agree on the nuclei that straddle their edge.
Points are a jittered grid at the slide's highest nucleus density, thinned per point
by the density of each nucleus type in the region under it. Ducts and tubules get
their own ring of nuclei around the lumen.

Types (the ground-truth codes):

====  ============  ======================================================
code  type          look at 40x
====  ============  ======================================================
1     tumour        large, pleomorphic, vesicular (pale centre, dark rim,
                    nucleolus)
2     lymphocyte    small (~7 µm), round, dark, uniform
3     stromal       elongated spindle (~12 x 3 µm) along the fibres
4     epithelial    normal duct cell, ~8 x 6 µm, fine chromatin
5     karyorrhexis  a cluster of small very dark fragments (one instance)
====  ============  ======================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from services.synth.layout import FAT, LOBULE, NECROSIS, STROMA, TUMOUR, Gland, SlideLayout

TUMOUR_NUCLEUS, LYMPHOCYTE, STROMAL, EPITHELIAL, KARYORRHEXIS = 1, 2, 3, 4, 5
NUCLEUS_TYPE_NAMES = {
    TUMOUR_NUCLEUS: "tumour",
    LYMPHOCYTE: "lymphocyte",
    STROMAL: "stromal",
    EPITHELIAL: "epithelial",
    KARYORRHEXIS: "karyorrhexis",
}
#: Side of a nucleus cell, level-0 px.
CELL_PX = 256
_TYPES = (TUMOUR_NUCLEUS, LYMPHOCYTE, STROMAL, EPITHELIAL, KARYORRHEXIS)


@dataclass(frozen=True)
class NucleusParams:
    """The slide-level numbers that decide the nuclei (from the label model).

    Attributes:
        mpp: Level-0 microns per pixel.
        tumour_major_um: Mean major axis of tumour nuclei, µm.
        tumour_cv: Coefficient of variation of tumour nuclear size (pleomorphism).
        tumour_nucleolus: Radius of a tumour nucleolus as a share of its nucleus's
            semi-axes.
        tumour_density_per_mm2: Tumour nuclei per mm² of tumour.
        lymphocyte_density_per_mm2: Lymphocytes per mm² of stroma near tumour.
        tumour_lymphocyte_share: Lymphocyte density inside tumour as a share of the
            stromal one (tumour-infiltrating lymphocytes).
        karyorrhexis_rate: Fragment clusters per tumour nucleus.
        tumour_axis_ratio: Mean major/minor axis ratio of tumour nuclei.
        epithelial_major_um: Mean major axis of normal duct nuclei, µm.
        stromal_density_per_mm2: Stromal nuclei per mm² of stroma.
    """

    mpp: float
    tumour_major_um: float
    tumour_cv: float
    tumour_density_per_mm2: float
    lymphocyte_density_per_mm2: float
    karyorrhexis_rate: float
    tumour_axis_ratio: float = 1.3
    epithelial_major_um: float = 8.0
    stromal_density_per_mm2: float = 900.0
    tumour_lymphocyte_share: float = 0.35
    tumour_nucleolus: float = 0.17


@dataclass
class Nuclei:
    """A set of nuclei as parallel arrays (level-0 px and degrees).

    ``x``, ``y`` centre; ``major``, ``minor`` full axis lengths; ``angle`` of the major
    axis in degrees; ``kind`` the type code; ``h_od`` the hematoxylin optical density;
    ``seed`` a per-nucleus seed for its fine structure (fragments, nucleolus).
    """

    x: np.ndarray
    y: np.ndarray
    major: np.ndarray
    minor: np.ndarray
    angle: np.ndarray
    kind: np.ndarray
    h_od: np.ndarray
    seed: np.ndarray

    @classmethod
    def empty(cls) -> Nuclei:
        """No nuclei."""
        f = np.zeros(0, dtype=np.float32)
        return cls(f, f, f, f, f, np.zeros(0, np.uint8), f, np.zeros(0, np.uint32))

    @classmethod
    def concat(cls, parts: list[Nuclei]) -> Nuclei:
        """All nuclei of ``parts`` in order."""
        if not parts:
            return cls.empty()
        return cls(
            *[
                np.concatenate([getattr(p, name) for p in parts])
                for name in ("x", "y", "major", "minor", "angle", "kind", "h_od", "seed")
            ]
        )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def select(self, mask: np.ndarray) -> Nuclei:
        """The nuclei where ``mask`` is True."""
        return Nuclei(
            self.x[mask],
            self.y[mask],
            self.major[mask],
            self.minor[mask],
            self.angle[mask],
            self.kind[mask],
            self.h_od[mask],
            self.seed[mask],
        )


def gland_outline(gland: Gland, theta: np.ndarray) -> np.ndarray:
    """Outer radius factor of an irregular gland at angles ``theta`` (about 1)."""
    return 1.0 + 0.08 * np.sin(3 * theta + gland.phase) + 0.05 * np.sin(5 * theta + 2 * gland.phase)


class NucleusField:
    """All nuclei of one slide, generated lazily cell by cell.

    Args:
        layout: The slide's layout.
        params: Nucleus numbers from the label model.
        seed: The slide's seed.
        immune_patch: Per-layout-px multiplier of lymphocyte density (aggregates).
    """

    def __init__(
        self, layout: SlideLayout, params: NucleusParams, seed: int, immune_patch: np.ndarray
    ) -> None:
        self.layout = layout
        self.params = params
        self.seed = seed
        self.immune_patch = immune_patch
        per_px2 = (params.mpp / 1000.0) ** 2  # mm² per level-0 px
        self._per_px2 = per_px2
        lymph = params.lymphocyte_density_per_mm2
        tumour = params.tumour_density_per_mm2
        karyo = params.karyorrhexis_rate * tumour
        # Density (per mm²) of each type in each region, before local modulation.
        # Columns follow _TYPES; rows are region codes 0-5.
        table = np.zeros((6, len(_TYPES)), dtype=np.float64)
        table[STROMA] = (0, lymph, params.stromal_density_per_mm2, 0, 0)
        table[FAT] = (0, 0.15 * lymph, 120.0, 0, 0)
        table[LOBULE] = (0, 0.6 * lymph, 1.3 * params.stromal_density_per_mm2, 0, 0)
        til = params.tumour_lymphocyte_share * lymph
        table[TUMOUR] = (tumour, til, 150.0, 0, karyo)
        table[NECROSIS] = (0.12 * tumour, 0.1 * lymph, 0, 0, max(karyo, 0.04 * tumour) * 2.5)
        self._table = table
        # The grid must be at least as dense as the densest spot, lymphoid aggregates
        # included, or dense spots would saturate and densities stop being proportional.
        peak = table.copy()
        peak[:, 1] *= max(1.0, float(immune_patch.max()))
        self._max_density = float(max(peak.sum(axis=1).max(), 500.0))
        self._spacing_px = 1.0 / np.sqrt(self._max_density * per_px2)
        self._gland_index = self._index_glands()

    def _index_glands(self) -> dict[tuple[int, int], list[int]]:
        index: dict[tuple[int, int], list[int]] = {}
        for i, gland in enumerate(self.layout.glands):
            r = gland.radius_px * 1.15
            for cx in range(int((gland.x_px - r) // CELL_PX), int((gland.x_px + r) // CELL_PX) + 1):
                for cy in range(
                    int((gland.y_px - r) // CELL_PX), int((gland.y_px + r) // CELL_PX) + 1
                ):
                    index.setdefault((cx, cy), []).append(i)
        return index

    def glands_near(self, x0: int, y0: int, x1: int, y1: int) -> list[int]:
        """Indices of glands whose cells touch the level-0 box [x0, x1) x [y0, y1)."""
        found: set[int] = set()
        for cx in range(x0 // CELL_PX, (x1 - 1) // CELL_PX + 1):
            for cy in range(y0 // CELL_PX, (y1 - 1) // CELL_PX + 1):
                found.update(self._gland_index.get((cx, cy), ()))
        return sorted(found)

    def in_nuclei(self, x0: int, y0: int, x1: int, y1: int, margin: int) -> Nuclei:
        """Every nucleus that may cover a pixel of the box, grown by ``margin`` px."""
        parts = []
        for cy in range((y0 - margin) // CELL_PX, (y1 + margin - 1) // CELL_PX + 1):
            for cx in range((x0 - margin) // CELL_PX, (x1 + margin - 1) // CELL_PX + 1):
                parts.append(self.cell(cx, cy))
        for i in self.glands_near(x0 - margin, y0 - margin, x1 + margin, y1 + margin):
            parts.append(self.gland_nuclei(i))
        return Nuclei.concat(parts)

    @lru_cache(maxsize=4096)  # noqa: B019 - one field per slide, freed with it
    def cell(self, cx: int, cy: int) -> Nuclei:
        """The nuclei whose centres fall in cell (cx, cy)."""
        layout = self.layout
        if cx < 0 or cy < 0 or cx * CELL_PX >= layout.width_px or cy * CELL_PX >= layout.height_px:
            return Nuclei.empty()
        rng = np.random.default_rng([self.seed, 11, cx, cy])
        s = self._spacing_px
        steps = np.arange(0.0, CELL_PX, s)
        gx, gy = np.meshgrid(steps, steps)
        x = cx * CELL_PX + gx.ravel() + rng.uniform(-0.4, 0.4, gx.size) * s + s / 2
        y = cy * CELL_PX + gy.ravel() + rng.uniform(-0.4, 0.4, gy.size) * s + s / 2
        inside = (x >= 0) & (y >= 0) & (x < layout.width_px) & (y < layout.height_px)
        x, y = x[inside], y[inside]
        ds = layout.downsample
        lx = np.clip((x // ds).astype(int), 0, layout.region.shape[1] - 1)
        ly = np.clip((y // ds).astype(int), 0, layout.region.shape[0] - 1)
        region = layout.region[ly, lx]
        density = self._table[region].copy()
        # Lymphocytes gather near tumour and in patchy aggregates.
        density[:, 1] *= (0.25 + 0.75 * layout.tumour_proximity[ly, lx]) * self.immune_patch[ly, lx]
        cumulative = np.cumsum(density, axis=1)
        u = rng.uniform(0, self._max_density, x.size)
        chosen = (u[:, None] < cumulative).argmax(axis=1)
        alive = u < cumulative[:, -1]
        if layout.glands:
            alive &= ~self._inside_glands(x, y, cx, cy)
        x, y, kinds = x[alive], y[alive], np.asarray(_TYPES, np.uint8)[chosen[alive]]
        return self._shapes(rng, x, y, kinds, layout.fiber_angle[ly[alive], lx[alive]])

    def _inside_glands(self, x: np.ndarray, y: np.ndarray, cx: int, cy: int) -> np.ndarray:
        inside = np.zeros(x.shape, dtype=bool)
        for i in self._gland_index.get((cx, cy), ()):
            g = self.layout.glands[i]
            dx, dy = x - g.x_px, y - g.y_px
            rho = np.hypot(dx, dy) / (g.radius_px * gland_outline(g, np.arctan2(dy, dx)))
            inside |= rho < 1.08
        return inside

    def _shapes(
        self,
        rng: np.random.Generator,
        x: np.ndarray,
        y: np.ndarray,
        kinds: np.ndarray,
        fiber_angle: np.ndarray,
    ) -> Nuclei:
        """Sizes, orientations and stain of nuclei of the given types."""
        n = x.size
        px = 1.0 / self.params.mpp  # px per µm
        major = np.empty(n, np.float32)
        minor = np.empty(n, np.float32)
        angle = rng.uniform(0, 180, n).astype(np.float32)
        h_od = np.empty(n, np.float32)
        p = self.params
        for code in _TYPES:
            sel = kinds == code
            k = int(sel.sum())
            if not k:
                continue
            if code == TUMOUR_NUCLEUS:
                sigma = np.sqrt(np.log1p(p.tumour_cv**2))
                size = p.tumour_major_um * rng.lognormal(-(sigma**2) / 2, sigma, k)
                major[sel] = size * px
                ratio = np.maximum(1.0, p.tumour_axis_ratio * rng.lognormal(0, 0.1, k))
                minor[sel] = size / ratio * px
                h_od[sel] = rng.normal(0.78, 0.08, k)
            elif code == LYMPHOCYTE:
                d = rng.normal(6.8, 0.5, k)
                major[sel] = d * px
                minor[sel] = d * rng.uniform(0.88, 1.0, k) * px
                h_od[sel] = rng.normal(1.3, 0.08, k)
            elif code == STROMAL:
                major[sel] = rng.normal(12.5, 1.8, k) * px
                minor[sel] = rng.normal(3.0, 0.4, k) * px
                angle[sel] = np.degrees(fiber_angle[sel]) + rng.normal(0, 12, k)
                h_od[sel] = rng.normal(0.95, 0.08, k)
            elif code == EPITHELIAL:
                major[sel] = rng.normal(p.epithelial_major_um, 0.6, k) * px
                minor[sel] = major[sel] * rng.uniform(0.68, 0.85, k)
                h_od[sel] = rng.normal(0.85, 0.07, k)
            else:  # karyorrhexis: the cluster's extent
                d = rng.uniform(6.0, 10.0, k)
                major[sel] = d * px
                minor[sel] = d * px
                h_od[sel] = rng.normal(1.5, 0.08, k)
        minor = np.minimum(minor, major)
        seeds = rng.integers(0, 2**32 - 1, n, dtype=np.uint32)
        return Nuclei(
            x.astype(np.float32),
            y.astype(np.float32),
            np.maximum(major, 2.0),
            np.maximum(minor, 2.0),
            angle,
            kinds,
            np.clip(h_od, 0.3, 2.0),
            seeds,
        )

    @lru_cache(maxsize=2048)  # noqa: B019 - one field per slide, freed with it
    def gland_nuclei(self, index: int) -> Nuclei:
        """The ring of epithelial (duct) or tumour (tubule) nuclei around a lumen."""
        g = self.layout.glands[index]
        rng = np.random.default_rng([self.seed, 13, index])
        px = 1.0 / self.params.mpp
        kind = TUMOUR_NUCLEUS if g.tumour else EPITHELIAL
        mid = g.radius_px * (1.0 + g.lumen_ratio) / 2
        width_px = (6.5 if not g.tumour else 0.7 * self.params.tumour_major_um) * px
        count = max(6, int(2 * np.pi * mid / (1.05 * width_px)))
        theta = np.linspace(0, 2 * np.pi, count, endpoint=False) + rng.uniform(0, 0.3)
        theta += rng.normal(0, 0.04, count)
        radius = mid * gland_outline(g, theta) + rng.normal(0, 0.05 * mid, count)
        x = g.x_px + radius * np.cos(theta)
        y = g.y_px + radius * np.sin(theta)
        kinds = np.full(count, kind, np.uint8)
        nuclei = self._shapes(rng, x, y, kinds, np.zeros(count, np.float32))
        # Columnar cells: the long axis points at the lumen.
        nuclei.angle = (np.degrees(theta) + rng.normal(0, 8, count)).astype(np.float32)
        return nuclei
