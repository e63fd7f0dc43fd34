"""A generated tiny cohort, read back the way users read slides: through OpenSlide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile

from services.cli import main
from services.cohort.manifest import Manifest
from services.synth.cohort import generate_cohort
from services.synth.layout import PEN_BLACK, PEN_BLUE, PEN_GREEN

SEED = 5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "c"
    generate_cohort(out, n_slides=3, seed=SEED, preset="tiny", truth_crops=3)
    return out


def _rows(cohort: Path) -> list[dict[str, str]]:
    with (cohort / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def _read_mask(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def _slide_at_mask_resolution(
    slide: openslide.OpenSlide, mask_shape: tuple[int, ...]
) -> np.ndarray:
    level = slide.get_best_level_for_downsample(8)
    image = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))[..., :3]
    return cv2.resize(image, (mask_shape[1], mask_shape[0]), interpolation=cv2.INTER_AREA)


def test_manifest_lists_every_slide_with_labels_and_truth(cohort: Path) -> None:
    manifest = Manifest.read(cohort / "manifest.csv")
    table = manifest.table
    assert len(table) == 3
    assert set(table["kind"]) == {"cancer", "normal"}
    for _, row in table.iterrows():
        assert manifest.slide_file(row["slide_path"]).is_file()
        labels = [row[name] for name in ("tp53", "pik3ca", "er", "pr", "her2", "basal")]
        if row["kind"] == "cancer":
            assert all(value in (0, 1) for value in labels)
        else:
            assert all(pd.isna(value) for value in labels)
        for column in ("truth_masks", "tissue_mask", "tumour_mask", "nuclei_truth"):
            assert (cohort / row[column]).exists(), column


def test_openslide_reads_every_level(cohort: Path) -> None:
    for row in _rows(cohort):
        path = cohort / row["slide_path"]
        assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
        slide = openslide.OpenSlide(str(path))
        assert slide.level_count >= 4
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.25)
        width, height = slide.dimensions
        for level, downsample in enumerate(slide.level_downsamples):
            assert downsample == pytest.approx(2**level)
            w, h = slide.level_dimensions[level]
            assert (w, h) == (-(-width // 2**level), -(-height // 2**level))
            region = np.asarray(slide.read_region((0, 0), level, (min(w, 256), min(h, 256))))
            assert region.shape[2] == 4 and region[..., 3].min() == 255
        slide.close()


def test_tissue_is_darker_than_glass_where_the_mask_says(cohort: Path) -> None:
    for row in _rows(cohort):
        slide = openslide.OpenSlide(str(cohort / row["slide_path"]))
        tissue = _read_mask(cohort / row["tissue_mask"]) > 0
        meta = json.loads((cohort / row["truth_masks"]).read_text())
        assert meta["downsample"] == 32 and list(tissue.shape[::-1]) == meta["mask_size_px"]
        image = _slide_at_mask_resolution(slide, tissue.shape).astype(np.float32)
        brightness = image.mean(axis=2)
        # Compare away from the mask's edge, where the resampled image is mixed.
        inner = cv2.erode(tissue.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        outer = cv2.dilate(tissue.astype(np.uint8), np.ones((3, 3), np.uint8)) == 0
        pen = _read_mask(cohort / "truth" / row["slide_id"] / "pen.png") > 0
        dust = _read_mask(cohort / "truth" / row["slide_id"] / "dust.png") > 0
        glass = outer & ~pen & ~dust
        assert np.median(brightness[glass]) > 225
        assert np.median(brightness[inner & ~pen]) < np.median(brightness[glass]) - 30
        # Tissue is pink-purple: green absorbed most (eosin and hematoxylin both do).
        tissue_rgb = image[inner & ~pen].mean(axis=0)
        assert tissue_rgb[1] < tissue_rgb[0] and tissue_rgb[1] < tissue_rgb[2]
        slide.close()


def test_tumour_mask_marks_the_cancer(cohort: Path) -> None:
    for row in _rows(cohort):
        tumour = _read_mask(cohort / row["tumour_mask"]) > 0
        if row["kind"] == "normal":
            assert not tumour.any()
            continue
        tissue = _read_mask(cohort / row["tissue_mask"]) > 0
        assert tumour.any() and not (tumour & ~tissue).any()
        # Tumour is crowded with large nuclei: more hematoxylin-dark pixels than the rest.
        slide = openslide.OpenSlide(str(cohort / row["slide_path"]))
        image = _slide_at_mask_resolution(slide, tumour.shape).astype(np.float32)
        red = image[..., 0]
        inner = cv2.erode(tumour.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        rest = tissue & ~cv2.dilate(tumour.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        pen = _read_mask(cohort / "truth" / row["slide_id"] / "pen.png") > 0
        assert np.median(red[inner & ~pen]) < np.median(red[rest & ~pen]) - 10
        slide.close()


def test_pen_ink_has_its_colour(cohort: Path) -> None:
    seen = set()
    for row in _rows(cohort):
        pen = _read_mask(cohort / "truth" / row["slide_id"] / "pen.png")
        if not pen.any():
            continue
        slide = openslide.OpenSlide(str(cohort / row["slide_path"]))
        image = _slide_at_mask_resolution(slide, pen.shape).astype(np.float32)
        for code in (PEN_GREEN, PEN_BLUE, PEN_BLACK):
            core = cv2.erode((pen == code).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            if core.sum() < 5:
                continue
            seen.add(code)
            r, g, b = image[core].mean(axis=0)
            if code == PEN_GREEN:
                assert g > r + 20
            elif code == PEN_BLUE:
                assert b > r + 20
            else:
                assert max(r, g, b) < 110
        slide.close()
    assert seen, "the fixture's seed was chosen so that at least one slide has pen marks"


def test_nuclei_truth_lines_up_with_the_slide(cohort: Path) -> None:
    checked = 0
    for row in _rows(cohort):
        slide = openslide.OpenSlide(str(cohort / row["slide_path"]))
        meta = json.loads((cohort / row["truth_masks"]).read_text())
        for crop in meta["nuclei_crops"]:
            folder = cohort / row["nuclei_truth"]
            labels = tifffile.imread(folder / f"{crop['name']}_labels.tif")
            rgb = cv2.cvtColor(cv2.imread(str(folder / f"{crop['name']}.png")), cv2.COLOR_BGR2RGB)
            with (folder / f"{crop['name']}.csv").open() as handle:
                nuclei = list(csv.DictReader(handle))
            size = crop["size_px"]
            assert labels.shape == (size, size) and labels.dtype == np.uint32
            assert int(labels.max()) == len(nuclei) == crop["nuclei"]
            assert set(np.unique(labels)) == set(range(len(nuclei) + 1)) or len(nuclei) == 0
            # The crop is the slide's pixels at that place (up to JPEG loss).
            read = np.asarray(slide.read_region((crop["x"], crop["y"]), 0, (size, size)))[..., :3]
            assert np.abs(read.astype(int) - rgb.astype(int)).mean() < 6
            if not nuclei:
                continue
            inside = labels > 0
            # Nuclei are where the labels say: dark (hematoxylin absorbs red most).
            assert rgb[inside][:, 0].mean() < rgb[~inside][:, 0].mean() - 40
            types = {n["type"] for n in nuclei}
            assert types <= {"tumour", "lymphocyte", "stromal", "epithelial", "karyorrhexis"}
            areas = np.bincount(labels.ravel(), minlength=len(nuclei) + 1)
            for n in nuclei:
                label = int(n["label"])
                assert int(n["area_px"]) == areas[label]
                if n["type"] != "karyorrhexis" and areas[label] > 200:
                    ys, xs = np.nonzero(labels == label)
                    # Overlaps hide parts of some nuclei; the centroid stays close.
                    assert abs(xs.mean() - float(n["x_px"])) < 0.6 * float(n["major_um"]) / 0.25
                    assert abs(ys.mean() - float(n["y_px"])) < 0.6 * float(n["major_um"]) / 0.25
            checked += 1
        slide.close()
    assert checked >= 3


def test_same_seed_gives_identical_files(cohort: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_cohort(again, n_slides=3, seed=SEED, preset="tiny", truth_crops=3)
    files = sorted(p.relative_to(cohort) for p in cohort.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for relative in files:
        assert (cohort / relative).read_bytes() == (again / relative).read_bytes(), relative
    other = tmp_path / "other"
    generate_cohort(other, n_slides=1, seed=SEED + 1, preset="tiny", truth_crops=0)
    first = _rows(cohort)[0]["slide_path"]
    other_slide = next((other / "slides").iterdir())
    assert other_slide.read_bytes() != (cohort / first).read_bytes()


def test_cli_refuses_bad_input_in_one_line(
    cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["synth", str(tmp_path / "x"), "--preset", "huge"]) == 2
    assert main(["synth", str(cohort), "--slides", "1"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "y"), "--slides", "0", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "histomarker synth" in err[0]
    assert not (tmp_path / "y" / "manifest.csv").exists()
