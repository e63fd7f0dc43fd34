"""Pyramidal TIFF writer: OpenSlide opens what it writes, pixels and metadata right."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from services.common.errors import InvalidInput
from services.synth import pyramid
from services.synth.pyramid import PyramidInfo, PyramidSpec, thumbnail, write_pyramid

RED = (220, 30, 40)
BLUE = (30, 60, 200)
RED_SQUARE = (640, 384, 128)  # level-0 x, y, side in px; a multiple of 4, so crisp at level 2
BLUE_SQUARE = (1536, 1024, 256)


def _image(width_px: int, height_px: int) -> np.ndarray:
    """Smooth RGB test pattern (gradients and a slow wave), JPEG-friendly."""
    yy, xx = np.mgrid[0:height_px, 0:width_px].astype(np.float64)
    red = 40 + 180 * xx / width_px
    green = 40 + 180 * yy / height_px
    blue = 128 + 90 * np.sin(xx / 97.0) * np.cos(yy / 71.0)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def _slide_image(width_px: int = 2048, height_px: int = 1536) -> np.ndarray:
    image = _image(width_px, height_px)
    for (x, y, side), colour in ((RED_SQUARE, RED), (BLUE_SQUARE, BLUE)):
        image[y : y + side, x : x + side] = colour
    return image


def _tiles(image: np.ndarray, tile_px: int, junk: int = 255) -> Iterator[np.ndarray]:
    """Cut ``image`` into full-size row-major tiles; edge padding filled with ``junk``."""
    height, width = image.shape[:2]
    for y in range(0, height, tile_px):
        for x in range(0, width, tile_px):
            tile = np.full((tile_px, tile_px, 3), junk, np.uint8)
            part = image[y : y + tile_px, x : x + tile_px]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile


def _halve(image: np.ndarray) -> np.ndarray:
    """Reference 2x box filter: odd sides repeat their last row/column, rounded mean."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    blocks = padded.astype(np.float64)
    mean = (blocks[0::2, 0::2] + blocks[1::2, 0::2] + blocks[0::2, 1::2] + blocks[1::2, 1::2]) / 4
    return np.floor(mean + 0.5).astype(np.uint8)


def _reference_levels(image: np.ndarray, count: int) -> list[np.ndarray]:
    levels = [image]
    while len(levels) < count:
        levels.append(_halve(levels[-1]))
    return levels


def _read_level(slide: openslide.OpenSlide, level: int) -> np.ndarray:
    width, height = slide.level_dimensions[level]
    rgba = np.asarray(slide.read_region((0, 0), level, (width, height)))
    return rgba[..., :3].astype(np.int16)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PyramidInfo, np.ndarray]:
    folder = tmp_path_factory.mktemp("slide")
    image = _slide_image()
    spec = PyramidSpec(width_px=2048, height_px=1536)
    info = write_pyramid(folder / "slide.tiff", spec, _tiles(image, 512), description="seed=7")
    return folder / "slide.tiff", info, image


def test_openslide_opens_it_as_generic_tiff_with_halving_levels(written) -> None:
    path, info, _ = written
    assert openslide.OpenSlide.detect_format(path) == "generic-tiff"
    with openslide.OpenSlide(path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert slide.level_count == info.level_count >= 4
        assert slide.level_dimensions == info.level_sizes_px
        for (width, height), (next_width, next_height) in zip(
            slide.level_dimensions, slide.level_dimensions[1:], strict=False
        ):
            assert (next_width, next_height) == (math.ceil(width / 2), math.ceil(height / 2))
        assert slide.level_downsamples == pytest.approx(info.level_downsamples)
        assert info.level_downsamples == pytest.approx([2**k for k in range(info.level_count)])
        for name in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
            assert float(slide.properties[name]) == pytest.approx(0.25)
        comment = slide.properties[openslide.PROPERTY_NAME_COMMENT]
        assert comment.startswith("histomarker slide; mpp=0.25;")
        assert comment.endswith("; seed=7")


def test_every_level_matches_the_box_filtered_image(written) -> None:
    path, info, image = written
    with openslide.OpenSlide(path) as slide:
        for level, expected in enumerate(_reference_levels(image, info.level_count)):
            error = np.abs(_read_level(slide, level) - expected)
            assert error.mean() < 2.5, f"level {level}: mean abs error {error.mean():.2f}"


@pytest.mark.parametrize("level", [0, 2])
def test_coloured_squares_are_where_they_belong(written, level: int) -> None:
    path, _, _ = written
    with openslide.OpenSlide(path) as slide:
        scale = 2**level
        for (x, y, side), colour in ((RED_SQUARE, RED), (BLUE_SQUARE, BLUE)):
            margin = 4 * scale  # keep clear of JPEG ringing at the square's border
            size = (side - 2 * margin) // scale
            inside = np.asarray(slide.read_region((x + margin, y + margin), level, (size, size)))
            assert np.abs(inside[..., :3].mean(axis=(0, 1)) - colour).max() < 4
            # just outside, left of the square: the smooth pattern, not the square's colour
            left = np.asarray(slide.read_region((x - 3 * margin, y + margin), level, (1, size)))
            assert np.abs(left[..., :3].mean(axis=(0, 1)) - colour).max() > 40


def test_file_is_byte_identical_on_a_second_write(written, tmp_path: Path) -> None:
    path, info, image = written
    again = write_pyramid(
        tmp_path / "again.tiff", PyramidSpec(2048, 1536), _tiles(image, 512), description="seed=7"
    )
    data = path.read_bytes()
    assert (tmp_path / "again.tiff").read_bytes() == data
    assert again.sha256 == info.sha256 == hashlib.sha256(data).hexdigest()
    assert again.file_size_bytes == info.file_size_bytes == len(data)
    assert b"tifffile" not in data  # no shape JSON in the description
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            assert "DateTime" not in page.tags
            assert "Software" not in page.tags


def test_producer_may_reuse_its_tile_buffer(written, tmp_path: Path) -> None:
    path, _, image = written
    buffer = np.empty((512, 512, 3), np.uint8)

    def reusing() -> Iterator[np.ndarray]:
        for tile in _tiles(image, 512):
            buffer[:] = tile
            yield buffer

    write_pyramid(tmp_path / "s.tiff", PyramidSpec(2048, 1536), reusing(), description="seed=7")
    assert (tmp_path / "s.tiff").read_bytes() == path.read_bytes()


def test_size_not_a_multiple_of_the_tile_keeps_edge_pixels(tmp_path: Path) -> None:
    image = _image(999, 701)
    spec = PyramidSpec(width_px=999, height_px=701, tile_px=256)
    info = write_pyramid(tmp_path / "odd.tiff", spec, _tiles(image, 256, junk=0))
    assert info.level_sizes_px == ((999, 701), (500, 351), (250, 176), (125, 88))
    with openslide.OpenSlide(tmp_path / "odd.tiff") as slide:
        assert slide.level_dimensions == info.level_sizes_px
        for level, expected in enumerate(_reference_levels(image, info.level_count)):
            got = _read_level(slide, level)
            # the last column and row, next to where the junk padding was
            assert np.abs(got[:, -1] - expected[:, -1]).mean() < 3, f"level {level} right edge"
            assert np.abs(got[-1] - expected[-1]).mean() < 3, f"level {level} bottom edge"
            assert np.abs(got - expected).mean() < 2.5, f"level {level}"


def test_full_chroma_and_bigtiff_open_too(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pyramid, "_BIGTIFF_RAW_BYTES", 0)
    image = _image(512, 384)
    spec = PyramidSpec(width_px=512, height_px=384, tile_px=128, chroma_subsampling=False)
    write_pyramid(tmp_path / "big.tiff", spec, _tiles(image, 128))
    assert (tmp_path / "big.tiff").read_bytes()[:4] == b"II+\x00"  # BigTIFF header
    with openslide.OpenSlide(tmp_path / "big.tiff") as slide:
        assert slide.level_count == 4
        assert np.abs(_read_level(slide, 0) - image).mean() < 1.5


def test_failing_tile_iterator_leaves_nothing_behind(tmp_path: Path) -> None:
    def failing() -> Iterator[np.ndarray]:
        tiles = _tiles(_slide_image(), 512)
        for _ in range(7):
            yield next(tiles)
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_pyramid(tmp_path / "slide.tiff", PyramidSpec(2048, 1536), failing())
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_an_existing_file_untouched(tmp_path: Path) -> None:
    (tmp_path / "slide.tiff").write_bytes(b"old")
    with pytest.raises(InvalidInput):
        write_pyramid(tmp_path / "slide.tiff", PyramidSpec(2048, 1536), iter([]))
    assert [p.name for p in tmp_path.iterdir()] == ["slide.tiff"]
    assert (tmp_path / "slide.tiff").read_bytes() == b"old"


@pytest.mark.parametrize(
    ("bad_tile", "message"),
    [
        (np.zeros((256, 256, 3), np.uint8), r"row 0, column 2 has shape \(256, 256, 3\)"),
        (np.zeros((512, 512, 3), np.float32), "dtype float32"),
        (np.zeros((512, 512), np.uint8), r"shape \(512, 512\)"),
        ([[0]], "is a list"),
    ],
)
def test_malformed_tile_is_invalid_input(tmp_path: Path, bad_tile, message: str) -> None:
    tiles = list(_tiles(_slide_image(), 512))
    tiles[2] = bad_tile
    with pytest.raises(InvalidInput, match=message):
        write_pyramid(tmp_path / "slide.tiff", PyramidSpec(2048, 1536), iter(tiles))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("count", "message"), [(11, "got 11 tiles, expected 12"), (13, "more")])
def test_wrong_number_of_tiles_is_invalid_input(tmp_path: Path, count: int, message: str) -> None:
    tiles = list(_tiles(_slide_image(), 512))
    tiles = (tiles + tiles)[:count]
    with pytest.raises(InvalidInput, match=message):
        write_pyramid(tmp_path / "slide.tiff", PyramidSpec(2048, 1536), iter(tiles))
    assert list(tmp_path.iterdir()) == []


def test_scratch_files_are_removed_and_progress_reaches_the_total(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    calls: list[tuple[int, int]] = []
    spec = PyramidSpec(width_px=1000, height_px=700, tile_px=256)
    write_pyramid(
        out / "s.tiff",
        spec,
        _tiles(_image(1000, 700), 256),
        workdir=work,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert list(work.iterdir()) == []
    assert [p.name for p in out.iterdir()] == ["s.tiff"]
    total = 12 + 4 + 1 + 1  # tiles per level: 4x3, 2x2, 1x1, 1x1
    assert calls == [(done, total) for done in range(1, total + 1)]


def test_scratch_files_are_removed_on_error(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()

    def stop(done: int, total: int) -> None:
        if done == 14:  # inside level 1, after level 2 scratch rows were written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_pyramid(
            tmp_path / "s.tiff",
            PyramidSpec(width_px=1000, height_px=700, tile_px=256),
            _tiles(_image(1000, 700), 256),
            workdir=work,
            progress=stop,
        )
    assert list(work.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["work"]


def test_thumbnail_reads_a_small_level(written) -> None:
    path, _, image = written
    thumb = thumbnail(path, 300)
    assert thumb.shape == (225, 300, 3)
    assert thumb.dtype == np.uint8
    x, y, side = BLUE_SQUARE
    scale = 300 / 2048
    centre = thumb[round((y + side / 2) * scale), round((x + side / 2) * scale)]
    assert np.abs(centre.astype(int) - BLUE).max() < 6
    assert thumbnail(path, 5000).shape == image.shape  # never upscaled


def test_level_count_rule() -> None:
    assert len(PyramidSpec(2048, 1536).level_sizes_px()) == 4  # min_levels
    sizes = PyramidSpec(40_000, 30_000).level_sizes_px()
    assert sizes[-1] == (625, 469)  # next would be 313 px < tile_px
    assert len(sizes) == 7
    assert len(PyramidSpec(100, 80, min_levels=2, tile_px=16).level_sizes_px()) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_px": 500}, "multiple of 16"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"mpp": 0.0}, "mpp"),
        ({"mpp": float("nan")}, "mpp"),
        ({"width_px": 4}, "at least 8 px"),
    ],
)
def test_bad_spec_is_invalid_input(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        PyramidSpec(**{"width_px": 1024, "height_px": 768, **kwargs})


def test_non_ascii_description_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="ASCII"):
        write_pyramid(tmp_path / "s.tiff", PyramidSpec(2048, 1536), iter([]), description="µm grid")
    assert list(tmp_path.iterdir()) == []
