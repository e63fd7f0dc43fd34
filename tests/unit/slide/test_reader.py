"""Tests of services.slide.reader: both slide backends, plain images, bad input."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from services.common.errors import InvalidInput, NotFound
from services.slide.reader import SlideReader, open_slide, to_rgb8
from services.synth.cohort import generate_cohort


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic slide: 4096x3072 px at 0.25 µm/px, 4 levels, 512 px JPEG tiles."""
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, 1, 0, "tiny")
    (path,) = sorted((out / "slides").glob("*.tiff"))
    return path


@pytest.fixture(scope="module")
def fast(slide_path: Path) -> Iterator[SlideReader]:
    with open_slide(slide_path) as reader:
        yield reader


@pytest.fixture(scope="module")
def reference(slide_path: Path) -> Iterator[SlideReader]:
    with open_slide(slide_path, backend="openslide") as reader:
        yield reader


def _assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert ours.dtype == theirs.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert diff.max() <= 2
    assert diff.mean() <= 0.1


# -- the two slide backends ----------------------------------------------------------


def test_auto_picks_the_fast_path_with_openslide_geometry(
    fast: SlideReader, reference: SlideReader
) -> None:
    import openslide

    assert fast.backend == "tifffile"
    assert reference.backend == "openslide"
    assert fast.vendor == reference.vendor == fast.format == "generic-tiff"
    assert fast.dimensions == reference.dimensions == (4096, 3072)
    assert fast.level_count == reference.level_count == 4
    assert fast.level_dimensions == reference.level_dimensions
    assert fast.level_downsamples == reference.level_downsamples == (1.0, 2.0, 4.0, 8.0)
    assert fast.mpp == reference.mpp == (0.25, 0.25)
    assert fast.objective_power is None and reference.objective_power is None
    assert fast.level_mpp(1) == (0.5, 0.5)
    with openslide.OpenSlide(str(fast.path)) as slide:
        for downsample in (0.5, 1.0, 1.9, 2.0, 3.0, 4.0, 7.99, 8.0, 100.0):
            expected = slide.get_best_level_for_downsample(downsample)
            assert fast.best_level_for_downsample(downsample) == expected


REGIONS = [
    (0, 0, 512, 512),  # exactly one tile
    (400, 300, 700, 650),  # crosses tile boundaries both ways
    (-300, -200, 600, 500),  # hangs over the top-left corner
    (3900, 2900, 600, 500),  # hangs over the bottom-right corner
    (-50, 1000, 5000, 40),  # wider than the slide
    (5000, 5000, 64, 64),  # wholly outside
    (1023, 513, 1, 1),  # a single pixel
]


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("region", REGIONS)
def test_backends_give_the_same_pixels(
    fast: SlideReader, reference: SlideReader, level: int, region: tuple[int, int, int, int]
) -> None:
    x, y, width, height = region
    downsample = int(fast.level_downsamples[level])
    # Level-aligned coordinates: what OpenSlide itself reads without interpolating.
    x, y = x // downsample * downsample, y // downsample * downsample
    ours = fast.read_region(x, y, level, width, height)
    _assert_close(ours, reference.read_region(x, y, level, width, height))
    assert ours.shape == (height, width, 3)


def test_whole_levels_are_identical(fast: SlideReader, reference: SlideReader) -> None:
    for level in range(1, 4):
        ours = fast.read_level(level)
        assert ours.shape == (*fast.level_dimensions[level][::-1], 3)
        assert np.array_equal(ours, reference.read_level(level))


def test_outside_is_white_and_snapping_is_shared(fast: SlideReader, reference: SlideReader) -> None:
    region = fast.read_region(4000, 3000, 0, 200, 100)
    assert (region[:, 96:] == 255).all() and (region[72:] == 255).all()
    # x / downsample = 501.5 snaps to level pixel 501 in both backends.
    assert np.array_equal(
        fast.read_region(1003, 999, 1, 50, 40), fast.read_region(1002, 998, 1, 50, 40)
    )
    assert np.array_equal(
        fast.read_region(1003, -7, 1, 50, 40), reference.read_region(1003, -7, 1, 50, 40)
    )


def test_region_limits(slide_path: Path, fast: SlideReader) -> None:
    with pytest.raises(InvalidInput, match="level 4 out of range"):
        fast.read_region(0, 0, 4, 10, 10)
    with pytest.raises(InvalidInput, match="must be positive"):
        fast.read_region(0, 0, 0, 0, 10)
    with open_slide(slide_path, max_read_px=1_000_000) as small:
        with pytest.raises(InvalidInput, match="read limit"):
            small.read_level(0)
        with pytest.raises(InvalidInput, match="read limit"):
            small.read_region(0, 0, 0, 1001, 1000)
        assert small.read_level(2).shape == (768, 1024, 3)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    x=st.integers(-6000, 6000),
    y=st.integers(-6000, 6000),
    level=st.integers(0, 3),
    width=st.integers(1, 300),
    height=st.integers(1, 300),
)
def test_random_regions_never_crash(
    fast: SlideReader, reference: SlideReader, x: int, y: int, level: int, width: int, height: int
) -> None:
    ours = fast.read_region(x, y, level, width, height)
    assert ours.shape == (height, width, 3) and ours.dtype == np.uint8
    _assert_close(ours, reference.read_region(x, y, level, width, height))


# -- patches at a target resolution ----------------------------------------------------


def test_read_patch_at_20x_is_level_1_as_is(fast: SlideReader, reference: SlideReader) -> None:
    # 512 px at 0.5 µm/px from a 0.25 µm/px slide: level 1 (downsample exactly 2)
    # covers the footprint with 512 px, so its pixels come back unresized.
    patch = fast.read_patch(1024, 512, 512, 0.5)
    assert np.array_equal(patch, fast.read_region(1024, 512, 1, 512, 512))
    assert np.array_equal(patch, reference.read_patch(1024, 512, 512, 0.5))


def test_read_patch_resizes_down_with_inter_area(fast: SlideReader) -> None:
    # 0.6 µm/px: level 1 (0.5) is the coarsest fine enough; 512 * 0.6 / 0.5 = 614 px.
    patch = fast.read_patch(800, 400, 512, 0.6)
    expected = cv2.resize(
        fast.read_region(800, 400, 1, 614, 614), (512, 512), interpolation=cv2.INTER_AREA
    )
    assert np.array_equal(patch, expected)
    # 10x (1.0 µm/px) is read from level 2 directly.
    assert np.array_equal(fast.read_patch(0, 0, 256, 1.0), fast.read_region(0, 0, 2, 256, 256))


def test_read_patch_refuses_to_upsample_unless_allowed(fast: SlideReader) -> None:
    with pytest.raises(InvalidInput, match=r"0\.25 µm/px.*0\.125"):
        fast.read_patch(0, 0, 256, 0.125)
    patch = fast.read_patch(1000, 1000, 256, 0.125, allow_upsample=True)
    assert patch.shape == (256, 256, 3)
    with pytest.raises(InvalidInput, match="target_mpp"):
        fast.read_patch(0, 0, 256, -1.0)


# -- resolution ------------------------------------------------------------------------


def _tiled_tiff(path: Path, pixels: np.ndarray, **kwargs: object) -> Path:
    tifffile.imwrite(path, pixels, tile=(64, 64), photometric="rgb", **kwargs)
    return path


@pytest.mark.parametrize("backend", ["auto", "openslide", "tifffile"])
def test_missing_resolution_needs_mpp(tmp_path: Path, backend: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    path = _tiled_tiff(tmp_path / "nores.tif", pixels)
    with pytest.raises(InvalidInput, match=r"nores\.tif has no resolution metadata; pass mpp="):
        open_slide(path, backend=backend)
    with open_slide(path, mpp=0.5, backend=backend) as reader:
        assert reader.mpp == (0.5, 0.5)
        assert reader.dimensions == (300, 200)
        assert np.array_equal(reader.read_level(0), pixels)


def test_resolution_tags_and_caller_override(tmp_path: Path) -> None:
    pixels = np.full((128, 128, 3), 200, dtype=np.uint8)
    inch = _tiled_tiff(tmp_path / "inch.tif", pixels, resolution=(25400 / 0.5, 25400 / 0.5))
    with open_slide(inch) as reader, open_slide(inch, backend="openslide") as other:
        assert reader.mpp == pytest.approx((0.5, 0.5))
        assert other.mpp == pytest.approx((0.5, 0.5))
    with open_slide(inch, mpp=0.25) as reader:
        assert reader.mpp == (0.25, 0.25)
    dpi72 = _tiled_tiff(tmp_path / "dpi72.tif", pixels, resolution=(72, 72))
    with pytest.raises(InvalidInput, match="no resolution metadata"):
        open_slide(dpi72)


# -- plain images ----------------------------------------------------------------------


def test_plain_png_jpeg_tiff_are_one_level_slides(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "a.bmp")
    tifffile.imwrite(
        tmp_path / "a.tif", pixels, resolution=(40000, 40000), resolutionunit="CENTIMETER"
    )
    for name in ("a.png", "a.bmp"):
        with open_slide(tmp_path / name, mpp=0.5) as reader:
            assert reader.backend == "image"
            assert reader.level_count == 1 and reader.dimensions == (120, 90)
            assert np.array_equal(reader.read_level(0), pixels)
            edge = reader.read_region(100, -10, 0, 40, 20)
            assert np.array_equal(edge[10:, :20], pixels[:10, 100:])
            assert (edge[:10] == 255).all() and (edge[:, 20:] == 255).all()
    with open_slide(tmp_path / "a.jpg", mpp=0.5) as reader:
        assert reader.vendor == "image/jpeg"
        with Image.open(tmp_path / "a.jpg") as decoded:
            assert np.array_equal(reader.read_level(0), np.asarray(decoded.convert("RGB")))
    with open_slide(tmp_path / "a.tif") as reader:  # untiled TIFF: resolution tags used
        assert reader.backend == "image" and reader.mpp == pytest.approx((0.25, 0.25))
        assert np.array_equal(reader.read_level(0), pixels)
        assert reader.read_patch(0, 0, 45, 0.5).shape == (45, 45, 3)
    with pytest.raises(InvalidInput, match=r"a\.png has no resolution metadata; pass mpp="):
        open_slide(tmp_path / "a.png")


def test_non_rgb_images_are_converted(tmp_path: Path) -> None:
    gray = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    Image.fromarray(gray).save(tmp_path / "gray16.png")
    tifffile.imwrite(tmp_path / "gray16.tif", gray)
    for name in ("gray16.png", "gray16.tif"):
        with open_slide(tmp_path / name, mpp=1.0) as reader:
            rgb = reader.read_level(0)
            expected = ((gray.astype(np.uint32) + 128) // 257).astype(np.uint8)
            assert np.array_equal(rgb, np.repeat(expected[:, :, None], 3, axis=2))
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    with open_slide(tmp_path / "rgba.png", mpp=1.0) as reader:
        rgb = reader.read_level(0)
        assert (rgb[:4] == (200, 0, 0)).all() and (rgb[4:] == 255).all()
    half = to_rgb8(np.array([[[0, 0, 0, 128]]], dtype=np.uint8))
    assert half.tolist() == [[[127, 127, 127]]]


# -- bad input -------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but holds almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"nope\.svs"):
        open_slide(tmp_path / "nope.svs")


@pytest.mark.parametrize("backend", ["auto", "openslide", "tifffile", "image"])
def test_bad_files_are_invalid_input(tmp_path: Path, slide_path: Path, backend: str) -> None:
    bad = {
        "empty.svs": b"",
        "truncated.tiff": slide_path.read_bytes()[:1000],
        "garbage.svs": np.random.default_rng(3).bytes(5000),
        "notes.ndpi": b"this is not a slide\n" * 50,
        "absurd.png": _png_declaring(2_000_000, 2_000_000),
        "zero.png": _png_declaring(0, 10),
    }
    for name, content in bad.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InvalidInput, match=name.replace(".", r"\.")) as error:
            open_slide(path, mpp=0.25, backend=backend).close()
        assert "\n" not in str(error.value)
        if backend == "tifffile" and name == "truncated.tiff":
            assert "truncated" in str(error.value)
        if backend in ("auto", "image") and name == "absurd.png":
            assert "exceeds" in str(error.value)


def test_declared_size_and_pixel_limits(tmp_path: Path) -> None:
    path = _tiled_tiff(tmp_path / "huge.tif", np.zeros((64, 64, 3), dtype=np.uint8))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages.first.tags["ImageWidth"].overwrite(2_000_000)
    with pytest.raises(InvalidInput, match=r"huge\.tif"):
        open_slide(path, mpp=0.25)
    Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8)).save(tmp_path / "bomb.png")
    with pytest.raises(InvalidInput, match="exceeds the limit of 1000 px"):
        open_slide(tmp_path / "bomb.png", mpp=1.0, max_image_px=1000)


def test_bad_arguments(tmp_path: Path, slide_path: Path) -> None:
    with pytest.raises(InvalidInput, match="unknown slide backend 'bioformats'"):
        open_slide(slide_path, backend="bioformats")
    with pytest.raises(InvalidInput, match="mpp must be a positive"):
        open_slide(slide_path, mpp=0.0)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    with pytest.raises(InvalidInput, match="not a TIFF"):
        open_slide(tmp_path / "p.png", backend="tifffile", mpp=1.0)
    with pytest.raises(InvalidInput, match="not a format OpenSlide reads"):
        open_slide(tmp_path / "p.png", backend="openslide", mpp=1.0)


def test_tile_cache_is_bounded_and_changes_no_pixel(slide_path: Path) -> None:
    regions = [(x, y) for y in (0, 700, 1500) for x in (0, 900, 2100)] * 2
    with (
        open_slide(slide_path, backend="tifffile", tile_cache_bytes=0) as plain,
        open_slide(slide_path, backend="tifffile", tile_cache_bytes=2**20) as cached,
    ):
        for x, y in regions:
            np.testing.assert_array_equal(
                plain.read_region(x, y, 0, 600, 500), cached.read_region(x, y, 0, 600, 500)
            )
        assert 0 < cached._cache_bytes <= 2**20  # type: ignore[attr-defined]
        assert not plain._cache  # type: ignore[attr-defined]
        with pytest.raises(ValueError):
            next(iter(cached._cache.values())).fill(0)  # type: ignore[attr-defined,union-attr]
