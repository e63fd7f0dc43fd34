"""Streaming writer of pyramidal tiled TIFF whole-slide images that OpenSlide opens.

The synthetic slide generator renders level 0 tile by tile; :func:`write_pyramid`
JPEG-encodes those tiles into the first TIFF page while it box-filters them into
level 1, then writes each further level from the one before, each as its own page.

File layout (what OpenSlide's ``generic-tiff`` reader needs):

- one page (IFD) per level, level 0 first, never SubIFDs (OpenSlide ignores them);
  pages after the first carry NewSubfileType = reduced-resolution image;
- every page tiled, JPEG in YCbCr (4:2:0 by default, as scanners write it), RGB in;
- XResolution/YResolution in pixels per centimetre with ResolutionUnit CENTIMETER,
  from which OpenSlide derives ``openslide.mpp-x``/``openslide.mpp-y``;
- an ImageDescription that starts with ``histomarker`` (never ``Aperio``, which would
  route the file to the SVS reader); no DateTime or Software tag, so equal tiles give
  byte-identical files.

Memory stays bounded whatever the slide size: levels 1 and up are kept as raw RGB
rows in scratch files, appended and read back one band (``tile_px`` rows) at a time,
so the process holds about one band, never a whole level.

Coordinates are (x, y) at level 0 and sizes (width, height) in pixels.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
import tifffile

from services.common.errors import InvalidInput

#: A TIFF needs BigTIFF offsets past 4 GiB; raw pixels above this many bytes switch
#: to BigTIFF (JPEG output is far smaller than raw, so this leaves a wide margin).
_BIGTIFF_RAW_BYTES = 2**31

#: Tiles encoded per batch and worker by tifffile's thread pool; bounds the memory
#: of queued tiles (tifffile's default queues up to 512 MB).
_TILES_PER_WORKER = 4

_DESCRIPTION_PREFIX = "histomarker slide"

_END = object()


@dataclass(frozen=True)
class PyramidSpec:
    """Geometry and encoding of a pyramidal slide.

    Level k has size ``ceil(width_px / 2**k) x ceil(height_px / 2**k)``. Levels are
    added while the next level's longer side is at least ``tile_px``, and always
    until there are ``min_levels``.

    Attributes:
        width_px: Level-0 width in pixels.
        height_px: Level-0 height in pixels.
        mpp: Level-0 resolution in microns per pixel (0.25 = 40x).
        tile_px: TIFF tile side in pixels, a multiple of 16; also the side of the
            level-0 tiles the caller streams in.
        jpeg_quality: JPEG quality, 1 to 100.
        min_levels: Least number of pyramid levels.
        chroma_subsampling: Store chroma at half resolution (YCbCr 4:2:0, about half
            the file size, as scanners do); False keeps full chroma (4:4:4).
    """

    width_px: int
    height_px: int
    mpp: float = 0.25
    tile_px: int = 512
    jpeg_quality: int = 90
    min_levels: int = 4
    chroma_subsampling: bool = True

    def __post_init__(self) -> None:
        if self.tile_px < 16 or self.tile_px % 16:
            raise InvalidInput(f"tile_px must be a positive multiple of 16, got {self.tile_px}")
        if not 1 <= self.jpeg_quality <= 100:
            raise InvalidInput(f"jpeg_quality must be 1 to 100, got {self.jpeg_quality}")
        if not (np.isfinite(self.mpp) and self.mpp > 0):
            raise InvalidInput(f"mpp must be a positive number of microns, got {self.mpp}")
        if self.min_levels < 1:
            raise InvalidInput(f"min_levels must be at least 1, got {self.min_levels}")
        least_px = 2 ** (self.min_levels - 1)
        if min(self.width_px, self.height_px) < least_px:
            raise InvalidInput(
                f"a {self.min_levels}-level pyramid needs at least {least_px} px per side, "
                f"got {self.width_px}x{self.height_px}"
            )
        if max(self.width_px, self.height_px) >= 2**31:
            raise InvalidInput(f"slide too large: {self.width_px}x{self.height_px} px")

    @property
    def tiles_across(self) -> int:
        """Number of level-0 tile columns."""
        return -(-self.width_px // self.tile_px)

    @property
    def tiles_down(self) -> int:
        """Number of level-0 tile rows."""
        return -(-self.height_px // self.tile_px)

    @property
    def tile_count(self) -> int:
        """Number of level-0 tiles :func:`write_pyramid` expects."""
        return self.tiles_across * self.tiles_down

    def tile_origins_px(self) -> Iterator[tuple[int, int]]:
        """Yield the level-0 (x, y) of each tile, in the order tiles must be streamed."""
        for row in range(self.tiles_down):
            for col in range(self.tiles_across):
                yield col * self.tile_px, row * self.tile_px

    def level_sizes_px(self) -> tuple[tuple[int, int], ...]:
        """Return (width, height) in pixels of every level, level 0 first."""
        sizes = [(self.width_px, self.height_px)]
        while True:
            width, height = sizes[-1]
            half = (-(-width // 2), -(-height // 2))
            if len(sizes) >= self.min_levels and max(half) < self.tile_px:
                return tuple(sizes)
            sizes.append(half)


@dataclass(frozen=True)
class PyramidInfo:
    """What :func:`write_pyramid` wrote.

    Attributes:
        path: The slide file.
        level_sizes_px: (width, height) in pixels per level, level 0 first.
        level_downsamples: Downsample of each level relative to level 0, computed as
            OpenSlide does (mean of the width and height ratios; exactly 2**k when
            the level-0 sides are multiples of 2**k).
        mpp: Level-0 resolution in microns per pixel.
        tile_px: TIFF tile side in pixels.
        file_size_bytes: Size of the file in bytes.
        sha256: Hex SHA-256 of the file's bytes.
    """

    path: Path
    level_sizes_px: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float
    tile_px: int
    file_size_bytes: int
    sha256: str

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_sizes_px)


ProgressCallback = Callable[[int, int], None]


def write_pyramid(
    path: str | os.PathLike[str],
    spec: PyramidSpec,
    tiles: Iterable[np.ndarray],
    *,
    description: str = "",
    progress: ProgressCallback | None = None,
    workdir: str | os.PathLike[str] | None = None,
) -> PyramidInfo:
    """Write a pyramidal tiled JPEG TIFF from streamed level-0 tiles, atomically.

    The file appears at ``path`` whole or not at all: it is written to a hidden
    temporary file beside ``path`` and renamed over it at the end. On any error,
    including one raised by ``tiles`` or ``progress``, neither that file nor any
    scratch file remains.

    Args:
        path: Destination file (``.tiff``); its folder must exist. Replaced if present.
        spec: Size, resolution and encoding of the slide.
        tiles: Level-0 tiles in row-major order (rows top to bottom, columns left to
            right), ``spec.tile_count`` of them, each ``uint8`` of shape
            ``(spec.tile_px, spec.tile_px, 3)`` RGB. Edge tiles are full size; their
            pixels beyond the slide are ignored. Each tile is copied, so the
            producer may reuse its buffer.
        description: Free ASCII text appended to the ImageDescription (which
            OpenSlide reports as ``openslide.comment``).
        progress: Called as ``progress(done, total)`` with tiles taken over all
            levels, after each tile.
        workdir: Folder for scratch files of levels 1 and up (raw RGB, about a third
            of level 0's raw size in all); default: the folder of ``path``.

    Returns:
        Level sizes, downsamples, file size and SHA-256 of the written file.

    Raises:
        InvalidInput: A tile of the wrong shape or dtype, too few or too many tiles,
            a non-ASCII description, or a missing destination folder.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise InvalidInput(f"destination folder does not exist: {folder}")
    scratch_parent = Path(workdir) if workdir is not None else folder
    if not scratch_parent.is_dir():
        raise InvalidInput(f"workdir does not exist: {scratch_parent}")
    image_description = _image_description(spec, description)

    sizes = spec.level_sizes_px()
    total_tiles = sum(int(np.prod(_tile_grid(size, spec.tile_px))) for size in sizes)
    done_tiles = 0

    def tick() -> None:
        nonlocal done_tiles
        done_tiles += 1
        if progress is not None:
            progress(done_tiles, total_tiles)

    temp_path = _reserve_hidden_temp(path)
    scratch = Path(tempfile.mkdtemp(prefix=".histomarker-pyramid-", dir=scratch_parent))
    try:
        raw_bytes = sum(w * h * 3 for w, h in sizes)
        writer = tifffile.TiffWriter(temp_path, bigtiff=raw_bytes > _BIGTIFF_RAW_BYTES)
        try:
            _write_levels(writer, spec, sizes, tiles, image_description, scratch, tick)
        except BaseException:
            # Keep the original error; closing a half-written TIFF may fail too.
            with contextlib.suppress(Exception):
                writer.close()
            raise
        writer.close()
        digest, file_size = _sha256_and_sync(temp_path)
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _sync_folder(folder)

    return PyramidInfo(
        path=path,
        level_sizes_px=sizes,
        level_downsamples=tuple((sizes[0][0] / w + sizes[0][1] / h) / 2 for w, h in sizes),
        mpp=spec.mpp,
        tile_px=spec.tile_px,
        file_size_bytes=file_size,
        sha256=digest,
    )


def write_image_pyramid(
    path: str | os.PathLike[str], rgb: np.ndarray, mpp: float, *, levels: int = 5
) -> PyramidInfo:
    """Write an image held in memory as a pyramid slide (downsamples 1, 2, 4, ...).

    For checks that need a real image to behave as a scanned slide (a finer level to
    judge focus on, a mask level); tiles of 256 px, JPEG quality 90.

    Args:
        path: Destination ``.tiff``.
        rgb: ``uint8`` RGB image of shape (height, width, 3), level 0.
        mpp: Its resolution, µm per pixel.
        levels: Least number of levels.
    """
    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidInput(f"expected uint8 RGB (h, w, 3), got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    spec = PyramidSpec(width, height, mpp=mpp, tile_px=256, min_levels=levels)
    tile = spec.tile_px

    def tiles() -> Iterator[np.ndarray]:
        for x0, y0 in spec.tile_origins_px():
            yield _pad_edge(rgb[y0 : y0 + tile, x0 : x0 + tile], tile, tile)

    return write_pyramid(path, spec, tiles())


def thumbnail(path: str | os.PathLike[str], max_px: int) -> np.ndarray:
    """Return an RGB thumbnail whose longer side is ``max_px`` (never upscaled).

    Decodes only the smallest pyramid level whose longer side is at least
    ``max_px`` (level 0 if none is), then shrinks it with area averaging.

    Args:
        path: A pyramidal TIFF, e.g. one written by :func:`write_pyramid`.
        max_px: Longer side of the thumbnail in pixels.

    Returns:
        ``uint8`` array of shape (height, width, 3).

    Raises:
        InvalidInput: ``max_px`` below 1, or a file with no RGB tiled level.
    """
    if max_px < 1:
        raise InvalidInput(f"max_px must be at least 1, got {max_px}")
    with tifffile.TiffFile(path) as tif:
        levels = [
            page
            for index, page in enumerate(tif.pages)
            if isinstance(page, tifffile.TiffPage)
            and page.is_tiled
            and (index == 0 or page.subfiletype & 1)
            and len(page.shape) == 3
            and page.shape[2] == 3
        ]
        if not levels:
            raise InvalidInput(f"{path} has no tiled RGB level")
        levels.sort(key=lambda page: page.shape[1])
        chosen = next((p for p in levels if max(p.shape[:2]) >= max_px), levels[-1])
        image = np.asarray(chosen.asarray(), dtype=np.uint8)
    height, width = image.shape[:2]
    scale = max_px / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def _write_levels(
    writer: tifffile.TiffWriter,
    spec: PyramidSpec,
    sizes: tuple[tuple[int, int], ...],
    tiles: Iterable[np.ndarray],
    description: str,
    scratch: Path,
    tick: Callable[[], None],
) -> None:
    """Write every level as one TIFF page, level 0 first.

    Level 0 comes from ``tiles``; each other level from a scratch file of raw RGB
    rows that was filled while the level below it was written.
    """
    source_tiles = iter(tiles)
    workers = _worker_count()
    tile_bytes = spec.tile_px * spec.tile_px * 3
    for level, size in enumerate(sizes):
        source_path = scratch / f"level{level}.rgb"
        with contextlib.ExitStack() as files:
            sink = None
            if level + 1 < len(sizes):
                sink = files.enter_context(open(scratch / f"level{level + 1}.rgb", "wb"))
            if level == 0:
                level_tiles = _level0_tiles(spec, source_tiles, sink, tick)
            else:
                source = files.enter_context(open(source_path, "rb"))
                level_tiles = _upper_level_tiles(source, size, spec.tile_px, sink, tick)
            writer.write(
                data=level_tiles,
                shape=(size[1], size[0], 3),
                dtype=np.uint8,
                tile=(spec.tile_px, spec.tile_px),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": spec.jpeg_quality},
                # Stored as YCbCr; 4:2:0 unless full chroma was asked for.
                subsampling=(2, 2) if spec.chroma_subsampling else (1, 1),
                resolution=_pixels_per_cm(spec, size),
                resolutionunit="CENTIMETER",
                # OpenSlide skips pages after the first unless marked reduced-resolution.
                subfiletype=1 if level else 0,
                description=description if level == 0 else None,
                software=False,  # no Software tag; no DateTime either (datetime=None)
                metadata=None,  # no tifffile JSON in the ImageDescription
                maxworkers=workers,
                buffersize=workers * _TILES_PER_WORKER * tile_bytes,
            )
        if level == 0:
            _check_exhausted(source_tiles, spec)
        source_path.unlink(missing_ok=True)  # free the disk as soon as a level is done


def _level0_tiles(
    spec: PyramidSpec,
    source: Iterator[np.ndarray],
    sink: BinaryIO | None,
    tick: Callable[[], None],
) -> Iterator[np.ndarray]:
    """Yield checked, edge-padded level-0 tiles; append their 2x box filter to ``sink``.

    The caller's tiles beyond the slide edge are replaced by the last row/column
    inside, so JPEG blocks and level-1 pixels at the edge depend on slide pixels only.
    """
    t = spec.tile_px
    half = t // 2
    next_width = -(-spec.width_px // 2)
    for row in range(spec.tiles_down):
        rows_inside = min(t, spec.height_px - row * t)
        band = np.empty((half, spec.tiles_across * half, 3), np.uint8) if sink else None
        for col in range(spec.tiles_across):
            index = row * spec.tiles_across + col
            try:
                tile = next(source)
            except StopIteration:
                raise InvalidInput(
                    f"got {index} tiles, expected {spec.tile_count} "
                    f"({spec.tiles_down} rows x {spec.tiles_across} columns of {t} px "
                    f"for {spec.width_px}x{spec.height_px} px)"
                ) from None
            tile = _checked_tile(tile, spec, row, col)
            cols_inside = min(t, spec.width_px - col * t)
            if rows_inside < t or cols_inside < t:
                tile = _pad_edge(tile[:rows_inside, :cols_inside], t, t)
            if band is not None:
                band[:, col * half : (col + 1) * half] = _halve(tile)
            if sink is not None and band is not None and col == spec.tiles_across - 1:
                # Written before the row's last tile is handed over: tifffile asks for
                # exactly tile_count tiles, so this generator never resumes after it.
                _append_rows(sink, band[: -(-rows_inside // 2), :next_width])
            tick()
            yield tile


def _upper_level_tiles(
    source: io.BufferedReader,
    size_px: tuple[int, int],
    tile_px: int,
    sink: BinaryIO | None,
    tick: Callable[[], None],
) -> Iterator[np.ndarray]:
    """Yield the tiles of a level read band by band from ``source`` (raw RGB rows).

    Appends each band's 2x box filter to ``sink`` (the next level) on the way.
    """
    width, height = size_px
    across, down = _tile_grid(size_px, tile_px)
    next_width = -(-width // 2)
    for row in range(down):
        rows_inside = min(tile_px, height - row * tile_px)
        band = _read_band(source, rows_inside, width, tile_px, across * tile_px)
        if sink is not None:
            _append_rows(sink, _halve(band)[: -(-rows_inside // 2), :next_width])
        for col in range(across):
            tick()
            # A copy, not a view: tifffile queues a few tiles before encoding them, and
            # a queued view would keep the whole band alive next to the next one.
            yield band[:, col * tile_px : (col + 1) * tile_px].copy()
        del band


def _read_band(
    source: io.BufferedReader, rows: int, width_px: int, band_height_px: int, band_width_px: int
) -> np.ndarray:
    """Read ``rows`` raw RGB rows of ``width_px`` into a band padded by edge repetition.

    Reads row by row straight into the band, so no second band-sized buffer exists.
    """
    band = np.empty((band_height_px, band_width_px, 3), np.uint8)
    for y in range(rows):
        target = band[y, :width_px].reshape(-1)
        if source.readinto(target.data) != target.size:
            raise RuntimeError(f"scratch file of a {width_px} px wide level ended early")
    band[:rows, width_px:] = band[:rows, width_px - 1 : width_px]
    band[rows:] = band[rows - 1 : rows]
    return band


def _checked_tile(tile: object, spec: PyramidSpec, row: int, col: int) -> np.ndarray:
    """Return a private copy of a caller's tile, or raise InvalidInput if it is malformed."""
    expected = (spec.tile_px, spec.tile_px, 3)
    if not isinstance(tile, np.ndarray):
        raise InvalidInput(
            f"tile at row {row}, column {col} is a {type(tile).__name__}, "
            f"expected a uint8 numpy array of shape {expected}"
        )
    if tile.shape != expected or tile.dtype != np.uint8:
        raise InvalidInput(
            f"tile at row {row}, column {col} has shape {tile.shape} and dtype {tile.dtype}, "
            f"expected uint8 of shape {expected} (edge tiles padded to full size)"
        )
    return np.array(tile, dtype=np.uint8, order="C", copy=True)


def _check_exhausted(source: Iterator[np.ndarray], spec: PyramidSpec) -> None:
    """Raise InvalidInput if ``source`` still has tiles after level 0 is complete."""
    if next(source, _END) is not _END:
        raise InvalidInput(
            f"got more than the {spec.tile_count} tiles expected ({spec.tiles_down} rows x "
            f"{spec.tiles_across} columns of {spec.tile_px} px for "
            f"{spec.width_px}x{spec.height_px} px)"
        )


def _halve(image: np.ndarray) -> np.ndarray:
    """Return the 2x2 box-filtered image: mean of each 2x2 block, rounded half up.

    OpenCV's area interpolation at exactly half size computes ``(a + b + c + d + 2) >> 2``
    per channel, the same as the numpy expression, about 15 times faster.

    Args:
        image: ``uint8`` (height, width, 3) with even height and width.
    """
    height, width = image.shape[:2]
    return np.asarray(
        cv2.resize(image, (width // 2, height // 2), interpolation=cv2.INTER_AREA), np.uint8
    )


def _pad_edge(image: np.ndarray, height_px: int, width_px: int) -> np.ndarray:
    """Return ``image`` grown to (height_px, width_px) by repeating its last row/column."""
    pad_rows = height_px - image.shape[0]
    pad_cols = width_px - image.shape[1]
    if pad_rows == 0 and pad_cols == 0:
        return image
    return np.pad(image, ((0, pad_rows), (0, pad_cols), (0, 0)), mode="edge")


def _append_rows(sink: BinaryIO, rows: np.ndarray) -> None:
    """Append raw RGB rows to a level's scratch file."""
    sink.write(np.ascontiguousarray(rows).data)


def _tile_grid(size_px: tuple[int, int], tile_px: int) -> tuple[int, int]:
    """Return (columns, rows) of tiles covering a level of size (width, height)."""
    return -(-size_px[0] // tile_px), -(-size_px[1] // tile_px)


def _pixels_per_cm(spec: PyramidSpec, size_px: tuple[int, int]) -> tuple[float, float]:
    """Return the (x, y) resolution of a level in pixels per centimetre."""
    mpp_x = spec.mpp * spec.width_px / size_px[0]
    mpp_y = spec.mpp * spec.height_px / size_px[1]
    return 1e4 / mpp_x, 1e4 / mpp_y


def _image_description(spec: PyramidSpec, extra: str) -> str:
    """Return the ImageDescription: our prefix, resolution, size, then ``extra``."""
    if not extra.isascii() or any(ch < " " and ch not in "\t\n" for ch in extra):
        raise InvalidInput("description must be printable ASCII text")
    text = (
        f"{_DESCRIPTION_PREFIX}; mpp={spec.mpp:g}; "
        f"size={spec.width_px}x{spec.height_px}; tile={spec.tile_px}"
    )
    return f"{text}; {extra}" if extra else text


def _reserve_hidden_temp(path: Path) -> Path:
    """Create an empty, hidden, uniquely named file beside ``path`` and return its path.

    Created with O_EXCL and mode 0o666 (less the umask), so the final file gets the
    permissions an ordinary new file would.
    """
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate


def _sha256_and_sync(path: Path) -> tuple[str, int]:
    """Return (hex SHA-256, size in bytes) of a file after flushing it to disk."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(handle.fileno())
    return digest.hexdigest(), size


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk, where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _worker_count() -> int:
    """Return the number of CPUs this process may use (threads for JPEG encoding)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
