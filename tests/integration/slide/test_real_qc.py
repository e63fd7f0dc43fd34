"""Slide QC on real H&E (``../shared/realdata/qc`` and the MoNuSeg tiles): ink of
every colour flagged and kept out of the usable tissue, a coverslip edge kept out of
the tissue, clean in-focus tissue neither inked nor blurred, crops with no glass all
tissue; and ``histomarker qc`` writing what it promises."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from realdata import realdata
from shapely.geometry import shape

from services.cli import main
from services.export.geojson import validate_geojson
from services.slide.qc import CLASS_COLOURS, QUPATH_NAMES
from services.slide.reader import open_slide
from services.slide.tissue import segment_tissue

#: The ink examples' scale is not recorded (about 10-20 µm/px).
PEN_MPP = 16.0
MASKS = (
    "tissue", "usable", "pen_green", "pen_blue", "pen_black", "pen_red", "pen_other",
    "blur", "fold", "edge",
)  # fmt: skip


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _mask(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 0


@pytest.mark.parametrize("colour", ["green", "red", "black"])
@pytest.mark.parametrize("mpp", [10.0, PEN_MPP, 20.0])
def test_hand_marked_ink_is_flagged_and_left_out_of_the_usable_tissue(
    colour: str, mpp: float
) -> None:
    pen = realdata("qc/pen")
    masks = segment_tissue(_rgb(pen / f"pen_{colour}.png"), 1.0, mpp)
    ink = _mask(pen / f"pen_{colour}_mask.png")

    flagged = (masks.pen_any() & ink).sum() / ink.sum()
    as_colour = (masks.pen[colour] & ink).sum() / ink.sum()
    usable = (masks.usable & ink).sum() / ink.sum()
    print(f"{colour} at {mpp} µm/px: flagged {flagged:.3f}, as {colour} {as_colour:.3f}")
    assert flagged >= 0.90 and as_colour >= 0.85
    assert usable <= 0.05


def test_a_coverslip_edge_stays_out_of_the_tissue() -> None:
    pen = realdata("qc/pen")
    masks = segment_tissue(_rgb(pen / "coverslip_edge.png"), 1.0, PEN_MPP)
    edge = _mask(pen / "coverslip_edge_mask.png")

    assert (masks.tissue & edge).sum() <= 0.10 * edge.sum()
    assert (masks.edge & edge).sum() >= 0.5 * edge.sum()  # found as an edge, not ink


def test_clean_in_focus_slide_has_no_ink_and_no_blur() -> None:
    slides = realdata("qc/slides")
    with open_slide(slides / "CMU-1-Small-Region.svs") as reader:
        full = reader.read_level(0)
        mpp0 = float(reader.mpp[0])
    for downsample in (4, 16):
        size = (full.shape[1] // downsample, full.shape[0] // downsample)
        thumb = cv2.resize(full, size, interpolation=cv2.INTER_AREA)
        masks = segment_tissue(thumb, downsample, mpp0)
        tissue = masks.tissue.sum()
        assert tissue > 0.2 * masks.tissue.size
        assert (masks.pen_any() & masks.tissue).sum() <= 0.005 * tissue
        assert masks.pen_any().sum() <= 0.005 * tissue  # nor beside it, on the glass
        assert masks.blur.sum() <= 0.02 * tissue, downsample


def test_crops_with_no_glass_in_view_are_all_tissue() -> None:
    tiles = sorted(realdata("qc/tiles").glob("template*.png"))
    tiles += sorted((realdata("monuseg-train") / "images").glob("*.png"))[::6]
    for path, mpp in [(p, 0.5 if p.stem.startswith("template") else 0.25) for p in tiles]:
        masks = segment_tissue(_rgb(path), 1.0, mpp)
        tissue = masks.tissue.sum()
        assert masks.tissue.mean() >= 0.90, path.name
        assert (masks.pen_any() & masks.tissue).sum() <= 0.005 * tissue, path.name
        assert masks.blur.sum() <= 0.02 * tissue, path.name


def _check_geojson(collection: dict, size: tuple[int, int], downsample: float) -> set[str]:
    """RFC 7946 and QuPath's shape (the export's validator: closed rings, exterior
    counter-clockwise and holes clockwise, classification with name and colour),
    annotations inside the slide, valid polygons."""
    validate_geojson(collection)
    names = set()
    for feature in collection["features"]:
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert set(props["classification"]) == {"name", "color"}
        names.add(props["classification"]["name"])
        geometry = feature["geometry"]
        assert geometry["type"] == "MultiPolygon"
        for polygon in geometry["coordinates"]:
            for ring in polygon:
                xs, ys = zip(*ring, strict=True)
                assert min(xs) >= 0 and max(xs) <= size[0] * downsample
                assert min(ys) >= 0 and max(ys) <= size[1] * downsample
        assert shape(geometry).is_valid or shape(geometry).buffer(0).area > 0
    return names


def test_qc_command_writes_masks_overlay_geojson_and_verdict(tmp_path: Path) -> None:
    pen = realdata("qc/pen")
    out = tmp_path / "red"

    status = main(["qc", str(pen / "pen_red.png"), str(out), "--mpp", str(PEN_MPP), "--json"])

    assert status == 0
    report = json.loads((out / "qc.json").read_text())
    thumbnail = cv2.imread(str(out / "thumbnail.png"))
    size = (thumbnail.shape[1], thumbnail.shape[0])
    assert size == (918, 1000)
    for name in MASKS:
        mask = cv2.imread(str(out / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        assert mask is not None and (mask.shape[1], mask.shape[0]) == size, name
        assert set(np.unique(mask)) <= {0, 255}
    red = cv2.imread(str(out / "masks" / "pen_red.png"), cv2.IMREAD_GRAYSCALE) > 0
    ink = _mask(pen / "pen_red_mask.png")
    assert (red & ink).sum() >= 0.85 * ink.sum()
    assert report["verdict"] in {"pass", "warn"}
    assert report["tissue_area_mm2"] > 50 and 0 < report["usable_fraction"] <= 1
    assert report["fraction_of_tissue"]["pen_red"] > 0.02
    assert "masks" in report["thresholds"] and "verdict" in report["thresholds"]
    overlay = cv2.imread(str(out / "overlay.png"))
    assert overlay.shape[0] >= size[1] and overlay.shape[1] > size[0]  # with a legend
    names = _check_geojson(json.loads((out / "qc.geojson").read_text()), size, 1.0)
    assert {"Tissue", "Pen red"} <= names
    assert names <= set(QUPATH_NAMES.values()) and set(QUPATH_NAMES) == set(CLASS_COLOURS)
    assert not list(out.rglob(".*.tmp"))


def test_qc_of_a_folder_writes_one_row_per_slide(tmp_path: Path) -> None:
    slides = realdata("qc/slides")
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slides / "CMU-1-Small-Region.svs", folder)
    (folder / "broken.svs").write_bytes(b"not a slide")

    status = main(["qc", str(folder), str(tmp_path / "out"), "--json"])

    assert status == 0
    with open(tmp_path / "out" / "qc.csv", newline="") as handle:
        rows = {row["slide"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"CMU-1-Small-Region.svs", "broken.svs"}
    assert rows["broken.svs"]["verdict"] == "error" and rows["broken.svs"]["reasons"]
    clean = rows["CMU-1-Small-Region.svs"]
    assert clean["verdict"] in {"pass", "warn", "fail"}
    assert float(clean["pen_red_over_tissue"]) == 0.0
    assert (tmp_path / "out" / "CMU-1-Small-Region" / "qc.json").is_file()


def test_an_image_without_resolution_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pen = realdata("qc/pen")

    status = main(["qc", str(pen / "pen_green.png"), str(tmp_path / "out")])

    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("histomarker qc:") and "\n" not in err and "mpp" in err
    assert not (tmp_path / "out" / "qc.json").exists()


def _pyramid(path: Path, rgb: np.ndarray, mpp: float) -> Path:
    """A tiled JPEG pyramid (levels 1, 2, 4, 8, 16) of a real image."""
    from services.synth.pyramid import write_image_pyramid

    return write_image_pyramid(path, rgb, mpp).path


@pytest.mark.parametrize("sigma_um", [1.0, 2.0])
def test_defocus_is_found_on_a_finer_level_and_in_focus_tissue_is_not(
    tmp_path: Path, sigma_um: float
) -> None:
    # Real in-focus tissue (CMU-1-Small-Region at 0.5 µm/px) as a pyramid, and the same
    # with a box defocused by a Gaussian of 1 or 2 µm: the masks (4-8 µm/px) cannot see
    # it; the blur judged at 1 µm/px must.
    from services.slide.tissue import TissueParams, compute_masks

    source = realdata("qc") / "slides" / "CMU-1-Small-Region.svs"
    with open_slide(source) as reader:
        rgb, mpp = reader.read_level(0), float(reader.mpp[0])
    h, w = rgb.shape[:2]
    y0, y1, x0, x1 = h // 4, h // 2, w // 4, 3 * w // 4
    defocused = rgb.copy()
    defocused[y0:y1, x0:x1] = cv2.GaussianBlur(rgb, (0, 0), sigma_um / mpp)[y0:y1, x0:x1]
    shares = {}
    for name, image in (("sharp", rgb), ("defocused", defocused)):
        with open_slide(_pyramid(tmp_path / f"{name}.tiff", image, mpp)) as reader:
            masks = compute_masks(reader, name, TissueParams(), 16.0)
        assert masks.thresholds["blur_level_um"] == pytest.approx(1.0, abs=0.01)
        ds = masks.downsample
        box = np.zeros_like(masks.tissue)
        box[round(y0 / ds) : round(y1 / ds), round(x0 / ds) : round(x1 / ds)] = True
        tissue = masks.tissue
        shares[name] = (
            float((masks.blur & tissue & box).sum() / (tissue & box).sum()),
            float((masks.blur & tissue & ~box).sum() / (tissue & ~box).sum()),
        )
    assert shares["sharp"][0] <= 0.02 and shares["sharp"][1] <= 0.02  # in focus: not blur
    assert shares["defocused"][0] >= 0.7  # the defocused box is found
    assert shares["defocused"][1] <= 0.02  # and nothing beside it
