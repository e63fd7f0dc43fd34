"""`histomarker normalize` on real image files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from services.cli import main
from services.synth.labels import SITES, sample_cohort
from services.synth.layout import TUMOUR
from services.synth.render import Stain, TileRenderer
from services.synth.slide import SyntheticSlide


def _write(path: Path, rgb: np.ndarray) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """A tumour patch in site A's stains, and a reference region in site B's."""
    folder = tmp_path_factory.mktemp("normalize")
    spec = next(s for s in sample_cohort(8, 3) if s.kind == "cancer")
    slide = SyntheticSlide(spec, 4096, 3072)
    layout = slide.layout
    clean = (layout.region == TUMOUR) & (layout.dust == 0) & (layout.pen == 0) & (layout.blur == 0)
    # 512 px tiles (16 x 16 layout px) that are almost all clean tumour.
    share = clean[:96, :128].reshape(6, 16, 8, 16).mean(axis=(1, 3))
    rows, cols = np.nonzero(share > 0.6)
    assert len(rows) >= 2, "the fixture slide needs two clean tumour tiles"
    (y0, x0), (y1, x1) = (rows[0] * 512, cols[0] * 512), (rows[-1] * 512, cols[-1] * 512)
    x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)

    def renderer(site_index: int, h_scale: float, e_scale: float) -> TileRenderer:
        site = SITES[site_index]
        stain = Stain(site.hematoxylin_od, site.eosin_od, h_scale, e_scale, site.background_rgb)
        return TileRenderer(slide.layout, slide.renderer.atlas, slide.nuclei, stain, spec.seed)

    # A lab that stains pale hematoxylin and strong eosin, normalized to a standard one.
    a, b = renderer(4, 0.7, 1.4), renderer(0, 1.0, 1.0)
    image = _write(folder / "a.png", a.render(x0, y0, 512, 512).rgb)
    reference = _write(folder / "ref.png", b.render(x1, y1, 512, 512).rgb)
    return image, reference, b.render(x0, y0, 512, 512).rgb


@pytest.mark.parametrize("method", ["vahadane", "macenko", "reinhard"])
def test_normalize_writes_a_png_closer_to_the_reference_stains(
    pair: tuple[Path, Path, np.ndarray], tmp_path: Path, method: str
) -> None:
    image, reference, truth = pair
    out = tmp_path / "out.png"
    argv = ["normalize", str(image), "--reference", str(reference), "--out", str(out)]
    assert main([*argv, "--method", method, "--json"]) == 0
    normalized = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    original = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    assert normalized.shape == original.shape

    def distance(x: np.ndarray) -> float:
        lab = cv2.cvtColor(x, cv2.COLOR_RGB2LAB).astype(float)
        return float(np.abs(lab - cv2.cvtColor(truth, cv2.COLOR_RGB2LAB)).mean())

    assert distance(normalized) < distance(original)


def test_bad_inputs_exit_2_and_write_nothing(
    pair: tuple[Path, Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, reference, _ = pair
    garbage = tmp_path / "garbage.png"
    garbage.write_text("not an image")
    cases = [
        [str(tmp_path / "missing.png"), "--reference", str(reference)],
        [str(garbage), "--reference", str(reference)],
        [str(image), "--reference", str(reference), "--method", "magic"],
    ]
    for case in cases:
        out = tmp_path / "out.png"
        assert main(["normalize", *case, "--out", str(out)]) == 2
        assert not out.exists()
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("histomarker")
    assert (
        main(
            [
                "normalize",
                str(image),
                "--reference",
                str(reference),
                "--out",
                str(tmp_path / "no-such-dir" / "o.png"),
            ]
        )
        == 2
    )
