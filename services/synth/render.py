"""Rendering a synthetic H&E tile in optical-density (stain) space.

Each level-0 pixel gets a hematoxylin and an eosin concentration from its region
(stroma, fat, lobule, tumour, necrosis), the textures and the nuclei over it; pen
ink, dust and folds add their own optical density. Light through the slide then
follows Beer-Lambert: ``I = I0 * 10 ** -(c_H * h + c_E * e + ...)`` with the site's
stain vectors ``h``, ``e`` and glass colour ``I0``. Blurred regions are out of focus.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from services.synth.layout import (
    BACKGROUND,
    FAT,
    LOBULE,
    NECROSIS,
    PEN_BLACK,
    PEN_BLUE,
    PEN_GREEN,
    STROMA,
    SlideLayout,
)
from services.synth.nuclei import (
    KARYORRHEXIS,
    LYMPHOCYTE,
    TUMOUR_NUCLEUS,
    Nuclei,
    NucleusField,
    gland_outline,
)
from services.synth.textures import FIBER_ANGLES, TextureAtlas

# Unit optical-density colours of the pen inks (what each absorbs).
PEN_OD = {
    PEN_GREEN: np.array([0.95, 0.28, 0.80], np.float32),
    PEN_BLUE: np.array([0.95, 0.60, 0.12], np.float32),
    PEN_BLACK: np.array([0.85, 0.85, 0.80], np.float32),
}
DUST_OD = np.array([0.55, 0.58, 0.62], np.float32)
#: Width of the clear halo around an apoptotic cell, µm.
APOPTOTIC_HALO_UM = 2.5

# Base hematoxylin and eosin concentrations of each region, and how much each
# follows the mottling texture. Index = region code.
_H_BASE = np.array([0.0, 0.025, 0.01, 0.03, 0.10, 0.11], np.float32)
_E_BASE = np.array([0.0, 0.14, 0.02, 0.11, 0.17, 0.26], np.float32)
_H_MOTTLE = np.array([0.0, 0.006, 0.0, 0.01, 0.025, 0.03], np.float32)
_E_MOTTLE = np.array([0.0, 0.02, 0.005, 0.02, 0.03, 0.05], np.float32)


@dataclass(frozen=True)
class Stain:
    """How a site's slides take up stain and look on glass.

    Attributes:
        hematoxylin: Unit optical-density vector of hematoxylin (R, G, B).
        eosin: Unit optical-density vector of eosin (R, G, B).
        h_scale: Multiplier of hematoxylin concentrations (staining strength).
        e_scale: Multiplier of eosin concentrations.
        background_rgb: Colour of empty glass (0-255).
    """

    hematoxylin: tuple[float, float, float]
    eosin: tuple[float, float, float]
    h_scale: float
    e_scale: float
    background_rgb: tuple[int, int, int]


@dataclass
class RenderedTile:
    """One rendered tile.

    Attributes:
        rgb: ``uint8`` (height, width, 3) image.
        labels: ``int32`` instance labels (0 = no nucleus) when asked for, else None.
        nuclei: The nuclei drawn, in label order (label i+1 is ``nuclei`` row i).
    """

    rgb: np.ndarray
    labels: np.ndarray | None
    nuclei: Nuclei


def _upsample(field: np.ndarray, x0: int, y0: int, w: int, h: int, ds: int) -> np.ndarray:
    """Bilinear level-0 values of a layout map over the box (x0, y0, w, h).

    The box origin must be a multiple of ``ds``; values agree across tile edges
    because every tile samples the same continuous interpolation.
    """
    lx0, ly0 = x0 // ds - 1, y0 // ds - 1
    lw, lh = -(-w // ds) + 2, -(-h // ds) + 2
    rows = np.clip(np.arange(ly0, ly0 + lh), 0, field.shape[0] - 1)
    cols = np.clip(np.arange(lx0, lx0 + lw), 0, field.shape[1] - 1)
    crop = np.ascontiguousarray(field[np.ix_(rows, cols)], dtype=np.float32)
    big = cv2.resize(crop, (lw * ds, lh * ds), interpolation=cv2.INTER_LINEAR)
    return big[ds : ds + h, ds : ds + w]


class TileRenderer:
    """Renders any level-0 box of one synthetic slide.

    Args:
        layout: The slide's layout.
        atlas: The slide's textures.
        field: The slide's nuclei.
        stain: The site's stain.
        seed: The slide's seed (sensor noise per tile derives from it).
    """

    def __init__(
        self,
        layout: SlideLayout,
        atlas: TextureAtlas,
        field: NucleusField,
        stain: Stain,
        seed: int,
    ) -> None:
        self.layout = layout
        self.atlas = atlas
        self.field = field
        self.stain = stain
        self.seed = seed
        self._h_vec = np.asarray(stain.hematoxylin, np.float32) * stain.h_scale
        self._e_vec = np.asarray(stain.eosin, np.float32) * stain.e_scale
        self._glass = np.asarray(stain.background_rgb, np.float32)
        self._one_hot = [(layout.region == code).astype(np.float32) for code in range(6)]
        # Weight of each fibre direction per layout pixel, summing to 1.
        weights = [
            np.clip(np.cos(2 * (layout.fiber_angle - angle)), 0, None) ** 3
            for angle in FIBER_ANGLES
        ]
        total = np.maximum(sum(weights), 1e-3)
        self._fiber_weights = [(weight / total).astype(np.float32) for weight in weights]
        self._pen_maps = {
            code: np.where(layout.pen == code, layout.pen_strength, 0).astype(np.float32)
            for code in PEN_OD
            if (layout.pen == code).any()
        }
        self._max_nucleus_px = int(np.ceil(16.0 / field.params.mpp))

    # -- regions -------------------------------------------------------------------
    def _regions(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        ds = self.layout.downsample
        # The layout pixels this box can see (bilinear reach: one pixel around).
        rows = slice(max(0, y0 // ds - 1), max(0, (y0 + h - 1) // ds + 2))
        cols = slice(max(0, x0 // ds - 1), max(0, (x0 + w - 1) // ds + 2))
        present = np.unique(self.layout.region[rows, cols])
        if len(present) == 1:
            return np.full((h, w), int(present[0]), np.uint8)
        best = np.full((h, w), -np.inf, np.float32)
        region = np.zeros((h, w), np.uint8)
        for code in present.tolist():
            soft = _upsample(self._one_hot[code], x0, y0, w, h, ds)
            rough = self.atlas.window(self.atlas.coarse, x0 + 157 * code, y0 + 89 * code, w, h)
            score = soft + 0.22 * rough * (soft > 0.02)
            better = score > best
            region[better] = code
            np.maximum(best, score, out=best)
        return region

    # -- the tile --------------------------------------------------------------------
    def render(self, x0: int, y0: int, w: int, h: int, with_labels: bool = False) -> RenderedTile:
        """Render the level-0 box (x0, y0, w, h); x0 and y0 multiples of the layout's
        downsample.

        Args:
            x0: Left edge, level-0 px.
            y0: Top edge, level-0 px.
            w: Width, px.
            h: Height, px.
            with_labels: Also return nucleus instance labels.
        """
        ds = self.layout.downsample
        if x0 % ds or y0 % ds:
            raise ValueError(f"tile origin ({x0}, {y0}) must be a multiple of {ds}")
        blur = _upsample(self.layout.blur, x0, y0, w, h, ds)
        if blur.max() <= 0.05:
            return self._render_sharp(x0, y0, w, h, with_labels)
        # Out of focus: blur a larger render and crop it, so tiles meet without seams.
        m = ds
        big = self._render_sharp(x0 - m, y0 - m, w + 2 * m, h + 2 * m, with_labels)
        soft = cv2.GaussianBlur(big.rgb, (0, 0), 4.0)[m:-m, m:-m].astype(np.float32)
        weight = np.clip(blur * 1.5, 0, 1)[..., None]
        rgb = big.rgb[m:-m, m:-m] * (1 - weight) + soft * weight
        labels = big.labels[m:-m, m:-m] if big.labels is not None else None
        return RenderedTile(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), labels, big.nuclei)

    def _render_sharp(
        self, x0: int, y0: int, w: int, h: int, with_labels: bool = False
    ) -> RenderedTile:
        """Render the box in focus (see :meth:`render`)."""
        ds = self.layout.downsample
        region = self._regions(x0, y0, w, h)
        tissue = region != BACKGROUND
        if not tissue.any() and not self._has_artifacts(x0, y0, w, h):
            rgb = np.empty((h, w, 3), np.float32)
            rgb[:] = self._glass
            labels = np.zeros((h, w), np.int32) if with_labels else None
            return RenderedTile(self._to_rgb8(rgb, x0, y0), labels, Nuclei.empty())

        a = self.atlas
        mottle = a.window(a.mottle, x0, y0, w, h)
        grain = a.window(a.grain, x0, y0, w, h)
        hem = _H_BASE[region]
        hem += _H_MOTTLE[region] * mottle
        eos = _E_BASE[region]
        eos += _E_MOTTLE[region] * mottle
        eos += 0.01 * grain * tissue

        stroma = (region == STROMA) | (region == LOBULE)
        if stroma.any():
            eos += self._fibers(x0, y0, w, h) * stroma
        fat = region == FAT
        if fat.any():
            membranes = a.window(a.fat, x0, y0, w, h)
            eos = np.where(fat, 0.02 + 0.42 * membranes, eos)
            hem = np.where(fat, 0.01 + 0.03 * membranes, hem)
        necrosis = region == NECROSIS
        if necrosis.any():
            debris = np.clip(grain - 1.6, 0, None) * 0.5
            hem = np.where(necrosis, hem + debris, hem)
        self._draw_glands(x0, y0, w, h, region, hem, eos)

        nuclei = self.field.in_nuclei(x0, y0, x0 + w, y0 + h, self._max_nucleus_px)
        self._draw_apoptotic_cells(nuclei, x0, y0, hem, eos)
        labels, nucleus_h = self._draw_nuclei(nuclei, x0, y0, w, h, grain)
        np.maximum(hem, nucleus_h, out=hem)
        # Soft edges, as optics blur sharp boundaries a little.
        hem = cv2.GaussianBlur(hem, (0, 0), 0.7)
        eos = cv2.GaussianBlur(eos, (0, 0), 0.7)

        fold = _upsample(self.layout.fold, x0, y0, w, h, ds)
        if fold.any():
            folded = 1.0 + 0.9 * np.clip(fold, 0, 1) * tissue
            hem *= folded
            eos *= folded
        # Channel-first so that every per-channel operation runs on contiguous memory.
        od = np.empty((3, h, w), np.float32)
        for c in range(3):
            np.multiply(hem, self._h_vec[c], out=od[c])
            od[c] += eos * self._e_vec[c]
        for code, strength_map in self._pen_maps.items():
            strength = _upsample(strength_map, x0, y0, w, h, ds)
            if strength.any():
                ink = np.clip(strength * 1.4 + 0.15 * mottle * (strength > 0.05), 0, 1.3)
                for c in range(3):
                    od[c] += ink * PEN_OD[code][c]
        dust = _upsample(self.layout.dust, x0, y0, w, h, ds)
        if dust.max() > 0.05:
            coarse = self.atlas.window(self.atlas.coarse, x0 + 401, y0 + 233, w, h)
            specks = np.clip(dust * 3.0, 0, 1) * (coarse > 0.8) * 1.1
            for c in range(3):
                od[c] += specks * DUST_OD[c]
        # Beer-Lambert: transmitted light falls tenfold per unit of optical density.
        ln10 = np.float32(np.log(10.0))
        for c in range(3):
            od[c] *= -ln10
            od[c] += np.float32(np.log(self._glass[c]))
        rgb = np.exp(od, out=od).transpose(1, 2, 0)
        return RenderedTile(self._to_rgb8(rgb, x0, y0), labels if with_labels else None, nuclei)

    def _has_artifacts(self, x0: int, y0: int, w: int, h: int) -> bool:
        ds = self.layout.downsample
        ys = slice(max(0, y0 // ds - 1), (y0 + h) // ds + 2)
        xs = slice(max(0, x0 // ds - 1), (x0 + w) // ds + 2)
        return bool(self.layout.pen_strength[ys, xs].any() or self.layout.dust[ys, xs].any())

    def _to_rgb8(self, rgb: np.ndarray, x0: int, y0: int) -> np.ndarray:
        """Round to 8 bits with a little sensor noise (from the atlas, so it is cheap)."""
        noise = self.atlas.window(self.atlas.sensor, x0, y0, rgb.shape[1], rgb.shape[0])
        rgb = rgb + noise
        rgb += 0.5
        np.clip(rgb, 0, 255, out=rgb)
        return rgb.astype(np.uint8)

    def _fibers(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        ds = self.layout.downsample
        fibers = np.zeros((h, w), np.float32)
        for weight_map, texture in zip(self._fiber_weights, self.atlas.fibers, strict=True):
            weight = _upsample(weight_map, x0, y0, w, h, ds)
            if weight.max() > 0.01:
                fibers += weight * self.atlas.window(texture, x0, y0, w, h)
        mottle = self.atlas.window(self.atlas.mottle, x0 + 311, y0 + 173, w, h)
        fibers *= 0.7 + 0.3 * mottle
        return np.clip(0.05 * fibers, -0.06, 0.12)

    def _draw_glands(
        self,
        x0: int,
        y0: int,
        w: int,
        h: int,
        region: np.ndarray,
        hem: np.ndarray,
        eos: np.ndarray,
    ) -> None:
        """Lumens (empty) and the cell layer around them, in place."""
        for i in self.field.glands_near(x0, y0, x0 + w, y0 + h):
            g = self.layout.glands[i]
            r = g.radius_px * 1.15
            gx0, gx1 = max(x0, int(g.x_px - r)), min(x0 + w, int(g.x_px + r) + 1)
            gy0, gy1 = max(y0, int(g.y_px - r)), min(y0 + h, int(g.y_px + r) + 1)
            if gx0 >= gx1 or gy0 >= gy1:
                continue
            yy, xx = np.mgrid[gy0:gy1, gx0:gx1].astype(np.float32)
            dx, dy = xx - g.x_px, yy - g.y_px
            rho = np.hypot(dx, dy) / (g.radius_px * gland_outline(g, np.arctan2(dy, dx)))
            sub = (slice(gy0 - y0, gy1 - y0), slice(gx0 - x0, gx1 - x0))
            keep = region[sub] != BACKGROUND
            lumen = (rho < g.lumen_ratio) & keep
            layer = (rho >= g.lumen_ratio) & (rho < 1.0) & keep
            hem[sub] = np.where(
                lumen, 0.0, np.where(layer, 0.07 if not g.tumour else 0.1, hem[sub])
            )
            eos[sub] = np.where(
                lumen, 0.03, np.where(layer, 0.17 if not g.tumour else 0.2, eos[sub])
            )

    def _draw_apoptotic_cells(
        self, nuclei: Nuclei, x0: int, y0: int, hem: np.ndarray, eos: np.ndarray
    ) -> None:
        """The cell around each fragment cluster of viable tumour, in place: shrunken,
        deeply eosinophilic cytoplasm in a clear retraction halo. Clusters in necrosis
        are debris and get neither."""
        chosen = np.flatnonzero(nuclei.kind == KARYORRHEXIS)
        if not chosen.size:
            return
        layout = self.layout
        ds = layout.downsample
        ly = np.clip((nuclei.y[chosen] // ds).astype(int), 0, layout.region.shape[0] - 1)
        lx = np.clip((nuclei.x[chosen] // ds).astype(int), 0, layout.region.shape[1] - 1)
        viable = layout.region[ly, lx] != NECROSIS
        halo_px = APOPTOTIC_HALO_UM / self.field.params.mpp
        for i in chosen[viable]:
            centre = (round(float(nuclei.x[i]) - x0), round(float(nuclei.y[i]) - y0))
            body = 0.55 * float(nuclei.major[i])
            cv2.circle(hem, centre, round(body + halo_px), 0.0, -1)
            cv2.circle(eos, centre, round(body + halo_px), 0.02, -1)
            cv2.circle(hem, centre, round(body), 0.04, -1)
            cv2.circle(eos, centre, round(body), 0.45, -1)

    def _draw_nuclei(
        self, nuclei: Nuclei, x0: int, y0: int, w: int, h: int, grain: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Instance labels and hematoxylin of the nuclei over the box."""
        labels = np.zeros((h, w), np.int32)
        for i in range(len(nuclei)):
            centre = (float(nuclei.x[i] - x0), float(nuclei.y[i] - y0))
            if nuclei.kind[i] == KARYORRHEXIS:
                rng = np.random.default_rng(int(nuclei.seed[i]))
                radius = float(nuclei.major[i]) / 2
                for _ in range(int(rng.integers(4, 10))):
                    off = rng.normal(0, radius / 2.2, 2)
                    body = max(1.5, float(rng.uniform(0.8, 1.5)) / self.field.params.mpp)
                    cv2.circle(
                        labels,
                        (round(centre[0] + off[0]), round(centre[1] + off[1])),
                        round(body),
                        i + 1,
                        -1,
                    )
                continue
            cv2.ellipse(
                labels,
                (centre, (float(nuclei.major[i]), float(nuclei.minor[i])), float(nuclei.angle[i])),
                i + 1,
                -1,
            )
        nucleus_h = np.zeros((h, w), np.float32)
        inside = labels > 0
        if not inside.any():
            return labels, nucleus_h
        index = labels[inside] - 1
        ys, xs = np.nonzero(inside)
        kind = nuclei.kind[index]
        base = nuclei.h_od[index] * (1.0 + 0.12 * grain[inside])
        # Vesicular tumour nuclei: pale centre, chromatin along the membrane, a nucleolus.
        tumour = kind == TUMOUR_NUCLEUS
        if tumour.any():
            t = index[tumour]
            dx = xs[tumour] + x0 - nuclei.x[t]
            dy = ys[tumour] + y0 - nuclei.y[t]
            theta = np.radians(nuclei.angle[t])
            u = (dx * np.cos(theta) + dy * np.sin(theta)) / (nuclei.major[t] / 2)
            v = (-dx * np.sin(theta) + dy * np.cos(theta)) / (nuclei.minor[t] / 2)
            rho2 = u * u + v * v
            shade = 0.45 + 0.55 * np.clip(rho2, 0, 1) ** 1.5
            shade += 0.25 * np.clip(grain[inside][tumour] - 0.8, 0, None)
            nucleolus = ((u - 0.15) ** 2 + (v + 0.1) ** 2) < self.field.params.tumour_nucleolus**2
            shade = np.where(nucleolus, 1.25, shade)
            base[tumour] *= shade
        lymph = kind == LYMPHOCYTE
        base[lymph] = nuclei.h_od[index[lymph]] * (1.0 + 0.05 * grain[inside][lymph])
        nucleus_h[inside] = base
        return labels, nucleus_h
