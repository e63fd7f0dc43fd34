"""Open any slide and read regions of it fast.

:func:`open_slide` returns a :class:`SlideReader` over one of three backends:

``tifffile``
    The fast path for TIFF-family pyramids (generic tiled TIFF, Aperio SVS): the
    tiles a region needs are read with ``os.pread`` and decoded one by one with
    imagecodecs (libjpeg-turbo for JPEG), then assembled. Nothing but a region is
    held in memory. It gives the same pixels as OpenSlide for these files.
``openslide``
    Every format OpenSlide reads: SVS, NDPI, MRXS, SCN, BIF, Philips TIFF, generic
    tiled TIFF, DICOM (a folder or one of its ``.dcm`` files).
``image``
    Plain images (PNG, JPEG, BMP, untiled or single-page TIFF) as one-level slides,
    decoded whole when opened, refused above ``max_image_px`` pixels.

``auto`` (the default) takes ``tifffile`` when OpenSlide's format detection says
``generic-tiff`` or ``aperio`` and the file's tiled pages form a pyramid,
``openslide`` for any other format OpenSlide knows, else ``image``.

Conventions (as everywhere in histomarker):

- (x, y) are level-0 pixel coordinates of a region's top-left corner; sizes are
  (width, height) in pixels *of the level read*; resolution is in µm/px (mpp), and
  magnification M means mpp = 10 / M.
- A region at level L starts at level pixel ``(int(x / ds), int(y / ds))`` (``ds``
  the level's downsample, truncated toward zero like OpenSlide does for negative
  coordinates). Reads snap to the level's pixel grid: no resampling ever. OpenSlide
  itself interpolates bilinearly when x / ds is fractional; its backend here passes
  it the snapped coordinate instead, so both backends give the same pixels. (With
  a non-integer downsample, e.g. 2.0001 for odd level sizes, the snapped level-0
  coordinate is rounded and OpenSlide may still blend neighbours slightly.)
- Output is always ``uint8`` RGB of shape (height, width, 3). Areas outside the
  level and transparent areas are composited on white, so outside is 255.
- Other sample types are converted: grayscale is repeated to RGB, an alpha channel
  is composited on white, 16-bit samples are scaled to 8 bits (v / 257, rounded),
  floating-point samples are taken as 0..1, palette images are looked up.

Resolution (first that applies): the caller's ``mpp``; the format's own metadata
(OpenSlide's ``openslide.mpp-x``/``-y``, Aperio's ``MPP``); TIFF resolution tags
with unit centimetre or inch; objective power (mpp = 10 / power). Metadata outside
0.01 to 100 µm/px (e.g. 72 dpi written by image editors) is ignored. PNG, JPEG and
BMP density fields are ignored likewise (they are screen dpi, not microscope
resolution). With none of these, opening fails with :class:`InvalidInput` asking
for ``mpp=...``.

Every problem with the input raises :class:`InvalidInput` (or :class:`NotFound` for
a missing file) with one readable line that names the file; OpenSlide, tifffile
and Pillow exceptions never escape.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from services.common.errors import InvalidInput, NotFound

#: Backend names accepted by :func:`open_slide`.
BACKENDS = ("auto", "openslide", "tifffile", "image")

#: Default largest plain image decoded whole, in pixels (about 4.5 GB as RGB).
DEFAULT_MAX_IMAGE_PX = 1_500_000_000

#: Default largest region one read may return, in pixels (about 300 MB as RGB).
DEFAULT_MAX_READ_PX = 100_000_000
#: Decoded tiles the tifffile reader keeps (least recently used dropped first),
#: bytes: neighbouring patches share tiles, and a grid reads neighbours in turn.
DEFAULT_TILE_CACHE_BYTES = 256 * 2**20

#: Largest declared level-0 side accepted, pixels.
MAX_SIDE_PX = 1_000_000

#: Plausible range of metadata resolution, µm/px; values outside are ignored.
_PLAUSIBLE_MPP = (0.01, 100.0)

#: OpenSlide vendors whose files the tifffile fast path reads.
_FAST_VENDORS = frozenset({"generic-tiff", "aperio"})

#: A patch's level-mpp may exceed the target by this factor and still count as
#: "at least as fine" (metadata rounding, e.g. 0.2520 vs 0.25).
_MPP_TOLERANCE = 1.01

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

#: Pillow's decompression-bomb limit is process-global; we lift it briefly, under
#: this lock, because we check our own (configurable) limit right after opening.
_PIL_LIMIT_LOCK = threading.Lock()


class _Unsuitable(Exception):
    """The tifffile fast path cannot read this file; another backend may."""


class SlideReader:
    """A slide opened for reading; use :func:`open_slide` to make one.

    Attributes:
        path: The slide file (or DICOM folder).
        backend: Name of the backend reading pixels: ``openslide``, ``tifffile``
            or ``image``.
        vendor: Format name as OpenSlide spells it (``generic-tiff``, ``aperio``,
            ``hamamatsu``, ...) or ``image/png``-style for plain images.
        dimensions: Level-0 (width, height) in pixels.
        level_dimensions: (width, height) in pixels of every level, level 0 first.
        level_downsamples: Downsample of each level relative to level 0 (mean of the
            width and height ratios, as OpenSlide computes it).
        mpp: Level-0 resolution (x, y) in µm/px.
        objective_power: Scanner objective magnification, or None when unknown.
        max_read_px: Largest region one read may return, pixels.
    """

    path: Path
    backend: str
    vendor: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: tuple[float, float]
    objective_power: float | None
    max_read_px: int

    # -- geometry -------------------------------------------------------------------

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    def format(self) -> str:
        """Alias of :attr:`vendor`."""
        return self.vendor

    @property
    def name(self) -> str:
        """The file's name, used in error messages."""
        return self.path.name

    def level_mpp(self, level: int) -> tuple[float, float]:
        """Return the (x, y) resolution of a level in µm/px."""
        self._check_level(level)
        width0, height0 = self.dimensions
        width, height = self.level_dimensions[level]
        return self.mpp[0] * width0 / width, self.mpp[1] * height0 / height

    def best_level_for_downsample(self, downsample: float) -> int:
        """Return the coarsest level whose downsample is at most ``downsample``.

        Same rule as OpenSlide's ``get_best_level_for_downsample``.

        Args:
            downsample: Wanted downsample relative to level 0 (1.0 = level 0).

        Returns:
            A level index; 0 when ``downsample`` is below every level's.
        """
        if not math.isfinite(downsample):
            raise InvalidInput(f"{self.name}: downsample must be a finite number")
        best = 0
        for level, level_downsample in enumerate(self.level_downsamples):
            if downsample < level_downsample:
                break
            best = level
        return best

    # -- reading --------------------------------------------------------------------

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Read a region as RGB.

        Args:
            x: Left edge, level-0 pixels (may be negative or beyond the slide).
            y: Top edge, level-0 pixels (may be negative or beyond the slide).
            level: Pyramid level to read.
            width: Width in pixels of ``level``.
            height: Height in pixels of ``level``.

        Returns:
            ``uint8`` array (height, width, 3); outside the slide is white (255).

        Raises:
            InvalidInput: Bad level or size, or a region larger than
                ``max_read_px``, or undecodable slide data.
        """
        self._check_level(level)
        for label, value in (("x", x), ("y", y), ("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise InvalidInput(f"{self.name}: {label} must be an integer, got {value!r}")
        if width <= 0 or height <= 0:
            raise InvalidInput(f"{self.name}: region size must be positive, got {width}x{height}")
        if width * height > self.max_read_px:
            raise InvalidInput(
                f"{self.name}: region {width}x{height} px exceeds the read limit of "
                f"{self.max_read_px} px"
            )
        downsample = self.level_downsamples[level]
        # int() truncates toward zero, as OpenSlide does for negative coordinates.
        left_px = int(int(x) / downsample)
        top_px = int(int(y) / downsample)
        return self._read_level_px(level, left_px, top_px, int(width), int(height))

    def read_level(self, level: int) -> np.ndarray:
        """Read a whole level as RGB; refused above ``max_read_px`` pixels.

        Args:
            level: Pyramid level (usually a small one, for thumbnails and masks).

        Returns:
            ``uint8`` array (height, width, 3) of the level.
        """
        self._check_level(level)
        width, height = self.level_dimensions[level]
        if width * height > self.max_read_px:
            raise InvalidInput(
                f"{self.name}: level {level} is {width}x{height} px, above the read limit "
                f"of {self.max_read_px} px; read a coarser level or a region"
            )
        return self._read_level_px(level, 0, 0, width, height)

    def read_patch(
        self,
        x: int,
        y: int,
        size_px: int,
        target_mpp: float,
        *,
        allow_upsample: bool = False,
    ) -> np.ndarray:
        """Read a square patch at a target resolution, resizing down only.

        The patch covers ``size_px * target_mpp / mpp`` level-0 pixels from (x, y).
        It is read from the coarsest level whose resolution is at least as fine as
        the target (level mpp <= 1.01 * target_mpp) and, unless that level's
        footprint is already ``size_px`` wide (e.g. 20x from a 40x slide's exact 2x
        level: the level's pixels as they are), resized to ``size_px`` with
        ``cv2.INTER_AREA``.

        Args:
            x: Left edge, level-0 pixels.
            y: Top edge, level-0 pixels.
            size_px: Side of the returned patch, pixels.
            target_mpp: Wanted resolution, µm/px (0.5 = 20x).
            allow_upsample: When even level 0 is coarser than the target, read it
                and enlarge with Lanczos instead of refusing.

        Returns:
            ``uint8`` array (size_px, size_px, 3).

        Raises:
            InvalidInput: Bad arguments, or the slide is coarser than the target and
                ``allow_upsample`` is False.
        """
        import cv2

        if isinstance(size_px, bool) or not isinstance(size_px, int | np.integer) or size_px <= 0:
            raise InvalidInput(f"{self.name}: size_px must be a positive integer, got {size_px!r}")
        if not (isinstance(target_mpp, int | float) and math.isfinite(target_mpp)) or (
            target_mpp <= 0
        ):
            raise InvalidInput(f"{self.name}: target_mpp must be positive, got {target_mpp!r}")
        level = self._level_for_mpp(target_mpp)
        if level is None:
            if not allow_upsample:
                raise InvalidInput(
                    f"{self.name}: slide resolution {self.mpp[0]:.4g} µm/px is coarser than "
                    f"the target {target_mpp:.4g} µm/px; pass allow_upsample=True to enlarge"
                )
            level = 0
        level_mpp_x, level_mpp_y = self.level_mpp(level)
        width = max(1, round(size_px * target_mpp / level_mpp_x))
        height = max(1, round(size_px * target_mpp / level_mpp_y))
        region = self.read_region(x, y, level, width, height)
        if (width, height) == (size_px, size_px):
            return region
        if width >= size_px and height >= size_px:
            interpolation = cv2.INTER_AREA
        else:
            interpolation = cv2.INTER_LANCZOS4
        return np.ascontiguousarray(
            cv2.resize(region, (int(size_px), int(size_px)), interpolation=interpolation)
        )

    def _level_for_mpp(self, target_mpp: float) -> int | None:
        """Coarsest level at least as fine as ``target_mpp``, or None if none is."""
        best = None
        for level in range(self.level_count):
            if max(self.level_mpp(level)) <= target_mpp * _MPP_TOLERANCE:
                best = level
        return best

    def _check_level(self, level: int) -> None:
        if isinstance(level, bool) or not isinstance(level, int | np.integer):
            raise InvalidInput(f"{self.name}: level must be an integer, got {level!r}")
        if not 0 <= level < self.level_count:
            raise InvalidInput(
                f"{self.name}: level {level} out of range; the slide has {self.level_count}"
            )

    def _read_level_px(
        self, level: int, left_px: int, top_px: int, width: int, height: int
    ) -> np.ndarray:
        """Read a region given in pixels of ``level``; white outside the level."""
        raise NotImplementedError

    # -- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Release the file; further reads are undefined."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        width, height = self.dimensions
        return (
            f"{type(self).__name__}({self.name!r}, backend={self.backend!r}, "
            f"vendor={self.vendor!r}, {width}x{height} px, {self.level_count} levels, "
            f"mpp={self.mpp[0]:.4g})"
        )

    # -- shared set-up --------------------------------------------------------------

    def _set_geometry(self, level_dimensions: Sequence[tuple[int, int]]) -> None:
        """Validate level sizes and derive downsamples the way OpenSlide does."""
        if not level_dimensions:
            raise InvalidInput(f"{self.name}: no image levels")
        for width, height in level_dimensions:
            if width <= 0 or height <= 0:
                raise InvalidInput(f"{self.name}: zero image size {width}x{height} px")
        width0, height0 = level_dimensions[0]
        if width0 > MAX_SIDE_PX or height0 > MAX_SIDE_PX:
            raise InvalidInput(
                f"{self.name}: declared size {width0}x{height0} px exceeds {MAX_SIDE_PX} px a side"
            )
        self.level_dimensions = tuple((int(w), int(h)) for w, h in level_dimensions)
        self.dimensions = self.level_dimensions[0]
        self.level_downsamples = tuple(
            (width0 / w + height0 / h) / 2.0 for w, h in self.level_dimensions
        )


# -- resolution ------------------------------------------------------------------------


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    return mpp if _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1] else None


def _mpp_from_resolution(resolution: float | None, unit: str | None) -> float | None:
    """µm/px from a TIFF resolution (pixels per unit) and its unit name."""
    if resolution is None or not resolution > 0 or unit is None:
        return None
    microns = {"centimeter": 10_000.0, "inch": 25_400.0}.get(unit.lower())
    return None if microns is None else _plausible(microns / resolution)


def _resolve_mpp(
    name: str,
    caller_mpp: float | None,
    metadata_mpp: tuple[float | None, float | None],
    objective_power: float | None,
) -> tuple[float, float]:
    """Pick the level-0 resolution (x, y) in µm/px; see the module docstring."""
    if caller_mpp is not None:
        return float(caller_mpp), float(caller_mpp)
    mpp_x, mpp_y = (_plausible(v) for v in metadata_mpp)
    if mpp_x is not None or mpp_y is not None:
        return float(mpp_x or mpp_y or 0.0), float(mpp_y or mpp_x or 0.0)
    if objective_power is not None:
        power_mpp = _plausible(10.0 / objective_power)
        if power_mpp is not None:
            return power_mpp, power_mpp
    raise InvalidInput(f"{name} has no resolution metadata; pass mpp=... (µm/px, 0.25 = 40x)")


def _tiff_tag_mpp(page: Any) -> tuple[float | None, float | None]:
    """(x, y) µm/px from a TIFF page's resolution tags (unit cm or inch), else None."""
    unit_tag = page.tags.get("ResolutionUnit")
    unit = {2: "inch", 3: "centimeter"}.get(int(unit_tag.value)) if unit_tag else None
    mpps: list[float | None] = []
    for tag_name in ("XResolution", "YResolution"):
        tag = page.tags.get(tag_name)
        resolution = None
        if tag is not None and isinstance(tag.value, tuple) and tag.value[1]:
            resolution = tag.value[0] / tag.value[1]
        mpps.append(_mpp_from_resolution(resolution, unit))
    return mpps[0], mpps[1]


def _to_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


# -- pixel conversion ------------------------------------------------------------------


def to_rgb8(pixels: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Convert an image array to ``uint8`` RGB (height, width, 3).

    Grayscale is repeated to three channels; gray+alpha and RGBA are composited on
    white; 16-bit samples are scaled by 1/257 (rounded), floats are taken as 0..1,
    booleans as 0/255.

    Args:
        pixels: Array (height, width) or (height, width, channels), 1 to 4 channels.
        name: Name used in error messages.

    Returns:
        ``uint8`` array (height, width, 3); the input itself when already so.
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or not 1 <= pixels.shape[2] <= 4:
        raise InvalidInput(f"{name}: unsupported pixel layout {pixels.shape}")
    if pixels.dtype == np.uint8:
        samples = pixels
    elif pixels.dtype == np.uint16:
        samples = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif pixels.dtype == np.bool_:
        samples = pixels.astype(np.uint8) * 255
    elif np.issubdtype(pixels.dtype, np.floating):
        samples = np.round(np.clip(np.nan_to_num(pixels), 0.0, 1.0) * 255).astype(np.uint8)
    else:
        raise InvalidInput(f"{name}: unsupported sample type {pixels.dtype}")
    channels = samples.shape[2]
    if channels in (2, 4):
        colour = samples[:, :, : channels - 1].astype(np.uint32)
        alpha = samples[:, :, channels - 1 :].astype(np.uint32)
        # (c * a + 255 * (255 - a)) / 255, rounded: alpha compositing on white.
        samples = ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
        channels -= 1
    if channels == 1:
        samples = np.repeat(samples, 3, axis=2)
    return np.ascontiguousarray(samples)


def _white(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), 255, dtype=np.uint8)


# -- OpenSlide backend -----------------------------------------------------------------


class _OpenSlideReader(SlideReader):
    """Reads through OpenSlide; regions composited on white."""

    def __init__(
        self, path: Path, open_path: Path, mpp: float | None, max_read_px: int, vendor: str
    ) -> None:
        import openslide

        self.path = path
        self.backend = "openslide"
        self.max_read_px = max_read_px
        try:
            self._slide = openslide.OpenSlide(str(open_path))
        except openslide.OpenSlideError as exc:
            raise InvalidInput(f"{path.name}: OpenSlide cannot open it: {_one_line(exc)}") from None
        try:
            props = self._slide.properties
            self.vendor = props.get("openslide.vendor", vendor) or vendor
            self._set_geometry(self._slide.level_dimensions)
            # OpenSlide's own downsamples (identical formula, but keep theirs exact).
            self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
            self.objective_power = _to_float(props.get("openslide.objective-power"))
            metadata = (
                _to_float(props.get("openslide.mpp-x")),
                _to_float(props.get("openslide.mpp-y")),
            )
            if metadata == (None, None):
                unit = props.get("tiff.ResolutionUnit")
                metadata = (
                    _mpp_from_resolution(_to_float(props.get("tiff.XResolution")), unit),
                    _mpp_from_resolution(_to_float(props.get("tiff.YResolution")), unit),
                )
            self.mpp = _resolve_mpp(path.name, mpp, metadata, self.objective_power)
        except BaseException:
            self._slide.close()
            raise

    def _read_level_px(
        self, level: int, left_px: int, top_px: int, width: int, height: int
    ) -> np.ndarray:
        import openslide

        level_width, level_height = self.level_dimensions[level]
        if (
            left_px >= level_width
            or top_px >= level_height
            or left_px + width <= 0
            or top_px + height <= 0
        ):
            return _white(height, width)
        downsample = self.level_downsamples[level]
        try:
            image = self._slide.read_region(
                (round(left_px * downsample), round(top_px * downsample)), level, (width, height)
            )
        except openslide.OpenSlideError as exc:
            raise InvalidInput(f"{self.name}: cannot read region: {_one_line(exc)}") from None
        rgba = np.asarray(image)
        if rgba[:, :, 3].min() == 255:
            return np.ascontiguousarray(rgba[:, :, :3])
        return to_rgb8(rgba, name=self.name)

    def close(self) -> None:
        self._slide.close()


# -- tifffile fast path ----------------------------------------------------------------


@dataclass(frozen=True)
class _TiffLevel:
    """Everything needed to read one tiled page without touching tifffile's file."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    tiles_across: int
    offsets: np.ndarray
    byte_counts: np.ndarray
    decode: Any
    jpegtables: bytes | None


class _TiffReader(SlideReader):
    """Decodes only the tiles a region needs, straight from the file."""

    def __init__(
        self,
        path: Path,
        mpp: float | None,
        max_read_px: int,
        tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES,
    ) -> None:
        import tifffile

        self.path = path
        self.backend = "tifffile"
        self.max_read_px = max_read_px
        self._cache: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = max(0, tile_cache_bytes)
        self._cache_lock = threading.Lock()
        file_size = path.stat().st_size
        try:
            with tifffile.TiffFile(path) as tif:
                if tif.is_ndpi or tif.is_philips or tif.is_scn or tif.is_bif:
                    raise _Unsuitable("vendor layout not a plain pyramid")
                self.vendor = "aperio" if tif.is_svs else "generic-tiff"
                pages = [page for page in tif.pages if page.is_tiled]  # type: ignore[union-attr]
                if not pages:
                    raise _Unsuitable("no tiled pages")
                # OpenSlide orders levels by size; so do we.
                pages.sort(key=lambda page: -int(page.imagewidth))  # type: ignore[union-attr]
                levels = [self._level(page, file_size) for page in pages]
                first = pages[0]
                metadata, power = self._metadata(first)
        except (_Unsuitable, InvalidInput):
            raise
        except Exception as exc:
            raise InvalidInput(f"{path.name}: not a readable TIFF: {_one_line(exc)}") from None
        self._levels = levels
        self._set_geometry([(level.width, level.height) for level in levels])
        self.objective_power = power
        self.mpp = _resolve_mpp(path.name, mpp, metadata, power)
        self._fd = os.open(path, os.O_RDONLY)

    def _level(self, page: Any, file_size: int) -> _TiffLevel:
        if page.planarconfig != 1 or page.tiledepth != 1 or page.imagedepth != 1:
            raise _Unsuitable("planar or volumetric tiles")
        if page.dtype is None:
            raise InvalidInput(f"{self.name}: unsupported sample type in the TIFF")
        width, height = int(page.imagewidth), int(page.imagelength)
        if width <= 0 or height <= 0:
            raise InvalidInput(f"{self.name}: zero image size {width}x{height} px")
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        byte_counts = np.asarray(page.databytecounts, dtype=np.int64)
        tiles_across = -(-width // int(page.tilewidth))
        tiles_down = -(-height // int(page.tilelength))
        if offsets.size != tiles_across * tiles_down or byte_counts.size != offsets.size:
            raise InvalidInput(f"{self.name}: tile table does not match the image size")
        if offsets.size and int((offsets + byte_counts).max()) > file_size:
            raise InvalidInput(
                f"{self.name}: truncated file: tiles extend past its {file_size} bytes"
            )
        return _TiffLevel(
            width=width,
            height=height,
            tile_width=int(page.tilewidth),
            tile_height=int(page.tilelength),
            tiles_across=tiles_across,
            offsets=offsets,
            byte_counts=byte_counts,
            decode=page.decode,
            jpegtables=page.jpegtables,
        )

    def _metadata(self, page: Any) -> tuple[tuple[float | None, float | None], float | None]:
        """(mpp-x, mpp-y) and objective power from the first page's tags."""
        description = str(page.description or "")
        power = None
        if self.vendor == "aperio":
            mpp_match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
            power_match = re.search(r"\|\s*AppMag\s*=\s*([0-9.eE+-]+)", description)
            power = _to_float(power_match.group(1)) if power_match else None
            if mpp_match:
                aperio_mpp = _to_float(mpp_match.group(1))
                if _plausible(aperio_mpp) is not None:
                    return (aperio_mpp, aperio_mpp), power
        return _tiff_tag_mpp(page), power

    def _read_level_px(
        self, level: int, left_px: int, top_px: int, width: int, height: int
    ) -> np.ndarray:
        info = self._levels[level]
        out = _white(height, width)
        x0, y0 = max(left_px, 0), max(top_px, 0)
        x1, y1 = min(left_px + width, info.width), min(top_px + height, info.height)
        if x0 >= x1 or y0 >= y1:
            return out
        tw, th = info.tile_width, info.tile_height
        for row in range(y0 // th, (y1 - 1) // th + 1):
            for col in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._cached_tile(level, info, row * info.tiles_across + col)
                if tile is None:
                    continue  # an empty tile is transparent: stays white
                tile_x, tile_y = col * tw, row * th
                # Intersection of the tile (clipped to the level) with the region.
                ix0, iy0 = max(x0, tile_x), max(y0, tile_y)
                ix1, iy1 = min(x1, tile_x + tw), min(y1, tile_y + th)
                out[iy0 - top_px : iy1 - top_px, ix0 - left_px : ix1 - left_px] = tile[
                    iy0 - tile_y : iy1 - tile_y, ix0 - tile_x : ix1 - tile_x
                ]
        return out

    def _cached_tile(self, level: int, info: _TiffLevel, index: int) -> np.ndarray | None:
        key = (level, index)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        tile = self._tile(info, index)
        if self._cache_limit:
            size = tile.nbytes if tile is not None else 0
            with self._cache_lock:
                if key not in self._cache:
                    if tile is not None:
                        tile.setflags(write=False)
                    self._cache[key] = tile
                    self._cache_bytes += size
                while self._cache_bytes > self._cache_limit and self._cache:
                    _, dropped = self._cache.popitem(last=False)
                    self._cache_bytes -= dropped.nbytes if dropped is not None else 0
        return tile

    def _tile(self, info: _TiffLevel, index: int) -> np.ndarray | None:
        byte_count = int(info.byte_counts[index])
        if byte_count == 0:
            return None
        data = os.pread(self._fd, byte_count, int(info.offsets[index]))
        try:
            tile, _, _ = info.decode(data, index, jpegtables=info.jpegtables)
        except Exception as exc:
            raise InvalidInput(
                f"{self.name}: cannot decode tile {index}: {_one_line(exc)}"
            ) from None
        if tile is None:
            return None
        return to_rgb8(tile[0], name=self.name)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        with self._cache_lock:
            self._cache.clear()
            self._cache_bytes = 0


# -- plain images ----------------------------------------------------------------------


class _ImageReader(SlideReader):
    """A plain image held whole in memory as a one-level slide."""

    def __init__(self, path: Path, mpp: float | None, max_read_px: int, max_image_px: int) -> None:
        self.path = path
        self.backend = "image"
        self.max_read_px = max_read_px
        self.objective_power = None
        if _is_tiff(path):
            pixels, metadata = self._load_tiff(max_image_px)
            self.vendor = "image/tiff"
        else:
            pixels, self.vendor = self._load_pillow(max_image_px)
            metadata = (None, None)
        self._pixels = pixels
        self._set_geometry([(pixels.shape[1], pixels.shape[0])])
        self.mpp = _resolve_mpp(path.name, mpp, metadata, None)

    def _check_size(self, width: int, height: int, max_image_px: int) -> None:
        if width <= 0 or height <= 0:
            raise InvalidInput(f"{self.name}: zero image size {width}x{height} px")
        if width > MAX_SIDE_PX or height > MAX_SIDE_PX or width * height > max_image_px:
            raise InvalidInput(
                f"{self.name}: image of {width}x{height} px exceeds the limit of "
                f"{max_image_px} px for plain images (decompression bomb?)"
            )

    def _load_tiff(self, max_image_px: int) -> tuple[np.ndarray, tuple[float | None, float | None]]:
        import tifffile

        try:
            with tifffile.TiffFile(self.path) as tif:
                page: Any = tif.pages.first
                if page.imagedepth != 1:
                    raise InvalidInput(f"{self.name}: volumetric TIFF is not supported")
                self._check_size(int(page.imagewidth), int(page.imagelength), max_image_px)
                pixels = page.asarray()
                if page.planarconfig == 2 and pixels.ndim == 3:
                    pixels = np.moveaxis(pixels, 0, -1)
                photometric = int(page.photometric)
                if photometric == 3 and page.colormap is not None:  # palette
                    lut = (np.asarray(page.colormap, dtype=np.uint32).T + 128) // 257
                    pixels = lut.astype(np.uint8)[pixels]
                elif photometric == 0:  # min-is-white
                    pixels = (
                        np.iinfo(pixels.dtype).max - pixels if pixels.dtype.kind == "u" else pixels
                    )
                elif photometric not in (1, 2, 6):
                    raise InvalidInput(
                        f"{self.name}: unsupported TIFF photometric interpretation {photometric}"
                    )
                metadata = _tiff_tag_mpp(page)
        except InvalidInput:
            raise
        except Exception as exc:
            raise InvalidInput(f"{self.name}: not a readable TIFF: {_one_line(exc)}") from None
        return to_rgb8(pixels, name=self.name), metadata

    def _load_pillow(self, max_image_px: int) -> tuple[np.ndarray, str]:
        from PIL import Image, UnidentifiedImageError

        try:
            with _PIL_LIMIT_LOCK:
                saved_limit = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None  # our own limit is checked just below
                try:
                    image = Image.open(self.path)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved_limit
            with image:
                self._check_size(image.width, image.height, max_image_px)
                vendor = f"image/{(image.format or 'unknown').lower()}"
                image.load()
                pixels = self._pillow_pixels(image)
        except InvalidInput:
            raise
        except UnidentifiedImageError:
            raise InvalidInput(
                f"{self.name}: unsupported or unrecognised format (not a slide or image "
                "OpenSlide, tifffile or Pillow can read)"
            ) from None
        except Exception as exc:
            raise InvalidInput(f"{self.name}: cannot decode image: {_one_line(exc)}") from None
        return to_rgb8(pixels, name=self.name), vendor

    @staticmethod
    def _pillow_pixels(image: Any) -> np.ndarray:
        mode = image.mode
        if mode in ("RGB", "RGBA", "L", "LA"):
            return np.asarray(image)
        if mode.startswith("I;16") or mode == "I":
            # 16-bit grayscale (Pillow opens 16-bit PNG as I;16 or I).
            return np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        if mode in ("P", "PA", "1") or "A" in mode or "transparency" in image.info:
            return np.asarray(image.convert("RGBA"))
        return np.asarray(image.convert("RGB"))

    def _read_level_px(
        self, level: int, left_px: int, top_px: int, width: int, height: int
    ) -> np.ndarray:
        out = _white(height, width)
        image_height, image_width = self._pixels.shape[:2]
        x0, y0 = max(left_px, 0), max(top_px, 0)
        x1, y1 = min(left_px + width, image_width), min(top_px + height, image_height)
        if x0 < x1 and y0 < y1:
            out[y0 - top_px : y1 - top_px, x0 - left_px : x1 - left_px] = self._pixels[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._pixels = np.empty((0, 0, 3), dtype=np.uint8)


# -- opening ---------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) in _TIFF_MAGICS


def _detect_vendor(path: Path) -> str | None:
    """OpenSlide's format name for the file, or None when it does not know it."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None


def _dicom_file(folder: Path) -> Path:
    """One ``.dcm`` file of a DICOM folder (OpenSlide finds the others)."""
    for candidate in sorted(folder.iterdir()):
        if candidate.is_file() and candidate.suffix.lower() == ".dcm":
            return candidate
    raise InvalidInput(f"{folder.name}: a folder, but no DICOM (.dcm) files in it")


def open_slide(
    path: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    backend: str = "auto",
    max_image_px: int = DEFAULT_MAX_IMAGE_PX,
    max_read_px: int = DEFAULT_MAX_READ_PX,
    tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES,
) -> SlideReader:
    """Open a whole-slide image or a plain image for reading.

    Args:
        path: Slide file, or a DICOM folder.
        mpp: Level-0 resolution in µm/px; overrides the file's metadata. Needed when
            the file has none.
        backend: ``auto``, ``openslide``, ``tifffile`` or ``image`` (see the module
            docstring).
        max_image_px: Largest plain image decoded whole, pixels.
        max_read_px: Largest region one read may return, pixels.
        tile_cache_bytes: Decoded tiles kept by the tifffile backend, bytes (0: none).

    Returns:
        An open :class:`SlideReader`; close it (or use it in a ``with`` block).

    Raises:
        NotFound: The file does not exist.
        InvalidInput: Unknown backend, bad ``mpp``, or a file that is empty,
            truncated, corrupt, of an unsupported format, of absurd size, or
            without resolution metadata when ``mpp`` is not given.
    """
    if backend not in BACKENDS:
        raise InvalidInput(f"unknown slide backend {backend!r}; use one of: {', '.join(BACKENDS)}")
    if mpp is not None and (
        isinstance(mpp, bool)
        or not isinstance(mpp, int | float)
        or not math.isfinite(mpp)
        or mpp <= 0
    ):
        raise InvalidInput(f"mpp must be a positive number of µm/px, got {mpp!r}")
    for label, limit in (("max_image_px", max_image_px), ("max_read_px", max_read_px)):
        if limit <= 0:
            raise InvalidInput(f"{label} must be positive, got {limit}")
    slide_path = Path(path)
    if not slide_path.exists():
        raise NotFound(f"slide {slide_path.name} not found")
    open_path = slide_path
    if slide_path.is_dir():
        if backend not in ("auto", "openslide"):
            raise InvalidInput(f"{slide_path.name}: a folder can only be read with OpenSlide")
        open_path = _dicom_file(slide_path)
    elif slide_path.stat().st_size == 0:
        raise InvalidInput(f"{slide_path.name}: empty file (0 bytes)")

    if backend == "image":
        return _ImageReader(slide_path, mpp, max_read_px, max_image_px)
    if backend == "tifffile":
        if not _is_tiff(open_path):
            raise InvalidInput(f"{slide_path.name}: not a TIFF file")
        try:
            return _TiffReader(slide_path, mpp, max_read_px, tile_cache_bytes)
        except _Unsuitable as exc:
            raise InvalidInput(f"{slide_path.name}: not a tiled TIFF pyramid ({exc})") from None

    vendor = _detect_vendor(open_path)
    if backend == "openslide":
        if vendor is None:
            raise InvalidInput(f"{slide_path.name}: not a format OpenSlide reads")
        if vendor in _FAST_VENDORS:
            # The fast path's checks catch truncated files before OpenSlide does.
            with contextlib.suppress(_Unsuitable):
                _TiffReader(slide_path, mpp, max_read_px).close()
        return _OpenSlideReader(slide_path, open_path, mpp, max_read_px, vendor)
    # auto
    if vendor in _FAST_VENDORS:
        try:
            return _TiffReader(slide_path, mpp, max_read_px, tile_cache_bytes)
        except _Unsuitable:
            return _OpenSlideReader(slide_path, open_path, mpp, max_read_px, vendor or "")
    if vendor is not None:
        return _OpenSlideReader(slide_path, open_path, mpp, max_read_px, vendor)
    if _is_tiff(open_path):
        # Tiled TIFFs OpenSlide refuses (16-bit, truncated, ...): the fast path reads
        # them or says precisely what is wrong; untiled ones are plain images.
        with contextlib.suppress(_Unsuitable):
            return _TiffReader(slide_path, mpp, max_read_px, tile_cache_bytes)
    return _ImageReader(slide_path, mpp, max_read_px, max_image_px)
