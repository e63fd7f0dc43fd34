"""A corpus of bad inputs, generated on demand (no binary blobs in the repository).

Each entry is a small file's bytes with the file name a user would give it and
what is wrong with it. Tests write them where the code under test looks for them
(a temporary folder, an object store, a gRPC message) and check that every entry
is refused with a readable reason, or - where the design converts it, e.g. an
RGBA picture or a greyscale slide - accepted.

Kinds of content:

- ``image``: an encoded picture (what NormalizePatches and NucleiService take);
- ``slide``: a whole-slide file (what TilingService and PredictionService take);
- ``table``: a patch table (what AnalysisService and ``histomarker metrics`` take).

Object keys and slide ids that must be refused live in :data:`BAD_KEYS` and
:data:`BAD_SLIDE_IDS`.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: The size a "huge" header declares, px a side: 10^10 pixels, 30 GB as RGB.
HUGE_SIDE_PX = 100_000
#: Side of the valid small pictures the corpus derives from, px.
SMALL_PX = 64
#: Resolution written into the small valid slide, µm/px (20x).
SLIDE_MPP = 0.5


@dataclass(frozen=True)
class BadInput:
    """One bad file.

    Attributes:
        name: Short id, used as the test id and in file names.
        filename: The file name a user would give it (its extension matters).
        data: The file's bytes.
        problem: What is wrong, for the reader of a failing test.
        reason: Words the refusal's message must contain (lowercase, any of them).
    """

    name: str
    filename: str
    data: bytes
    problem: str
    reason: tuple[str, ...]


def he_rgb(side: int = SMALL_PX, seed: int = 0) -> np.ndarray:
    """A small pink H&E-like picture with a few purple nuclei, uint8 RGB."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((side, side, 3), np.uint8)
    rgb[:] = (232, 180, 210)
    yy, xx = np.mgrid[0:side, 0:side]
    for _ in range(max(2, side // 16)):
        cy, cx = rng.integers(4, side - 4, size=2)
        rgb[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = (90, 50, 140)
    return rgb


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_bytes(rgb: np.ndarray) -> bytes:
    """``rgb`` as PNG."""
    return _encode(Image.fromarray(rgb), "PNG")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def huge_png(side: int = HUGE_SIDE_PX) -> bytes:
    """A well-formed PNG header declaring ``side`` x ``side`` RGB, with one tiny
    compressed row of data: a decompression bomb's header, 100 bytes long."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" + b"\xff" * 3 * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", row)
        + _png_chunk(b"IEND", b"")
    )


def huge_tiff(side: int = HUGE_SIDE_PX) -> bytes:
    """A little-endian striped RGB TIFF whose IFD declares ``side`` x ``side`` px and
    whose one strip holds 48 bytes: a header that must not be believed."""
    entries = [
        (256, 4, 1, side),  # ImageWidth, LONG
        (257, 4, 1, side),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample (8, one value for all samples)
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 2),  # Photometric: RGB
        (273, 4, 1, 0),  # StripOffsets (patched below)
        (277, 3, 1, 3),  # SamplesPerPixel
        (278, 4, 1, side),  # RowsPerStrip
        (279, 4, 1, 48),  # StripByteCounts
    ]
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = ifd_offset + ifd_size
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_offset))
    out += struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        if tag == 273:
            value = data_offset
        packed = struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    out += struct.pack("<I", 0)
    out += b"\x80" * 48
    return bytes(out)


def tiled_slide(side: int = 512, mpp: float = SLIDE_MPP) -> bytes:
    """A small valid tiled pyramid TIFF with resolution tags (a generic-tiff slide)."""
    import tifffile

    rgb = np.tile(he_rgb(128), (side // 128, side // 128, 1))
    buffer = io.BytesIO()
    resolution = (10_000.0 / mpp, 10_000.0 / mpp)
    with tifffile.TiffWriter(buffer) as tif:
        tif.write(
            rgb,
            tile=(128, 128),
            photometric="rgb",
            compression="jpeg",
            resolution=resolution,
            resolutionunit="CENTIMETER",
            subifds=1,
        )
        tif.write(
            rgb[::2, ::2],
            tile=(128, 128),
            photometric="rgb",
            compression="jpeg",
            resolution=(resolution[0] / 2, resolution[1] / 2),
            resolutionunit="CENTIMETER",
            subfiletype=1,
        )
    return buffer.getvalue()


def _grey() -> bytes:
    return _encode(Image.fromarray(he_rgb()[:, :, 1]), "PNG")


def _rgba() -> bytes:
    rgba = np.dstack([he_rgb(), np.full((SMALL_PX, SMALL_PX), 128, np.uint8)])
    return _encode(Image.fromarray(rgba, "RGBA"), "PNG")


def _grey16() -> bytes:
    grey = he_rgb()[:, :, 1].astype(np.uint16) * 257
    return _encode(Image.fromarray(grey), "PNG")  # Pillow writes uint16 as 16-bit


def _cmyk_jpeg() -> bytes:
    return _encode(Image.fromarray(he_rgb()).convert("CMYK"), "JPEG", quality=90)


def image_corpus() -> list[BadInput]:
    """Pictures a patch RPC or ``histomarker nuclei`` must refuse or convert."""
    valid = png_bytes(he_rgb())
    return [
        BadInput("zero_bytes", "empty.png", b"", "no bytes at all", ("empty",)),
        BadInput(
            "truncated_png",
            "truncated.png",
            valid[: len(valid) // 2],
            "a PNG cut in half",
            ("decod", "not a png", "truncated", "image"),
        ),
        BadInput(
            "not_an_image",
            "notes.png",
            b"this is a text file, not a picture\n" * 4,
            "text with an image extension",
            ("not a png", "cannot decode", "unrecognised"),
        ),
        BadInput(
            "huge_png_header",
            "bomb.png",
            huge_png(),
            f"a PNG header declaring {HUGE_SIDE_PX}x{HUGE_SIDE_PX} px",
            ("larger than", "exceeds", "px a side", "too large"),
        ),
        BadInput(
            "huge_tiff_header",
            "bomb.tiff",
            huge_tiff(),
            f"a TIFF header declaring {HUGE_SIDE_PX}x{HUGE_SIDE_PX} px",
            ("larger than", "exceeds", "px a side", "too large"),
        ),
        BadInput("grey", "grey.png", _grey(), "8-bit greyscale", ("mode", "grey")),
        BadInput("rgba", "rgba.png", _rgba(), "RGB with a half-transparent alpha", ("mode",)),
        BadInput("grey16", "grey16.png", _grey16(), "16-bit greyscale", ("mode", "16-bit")),
        BadInput("cmyk_jpeg", "cmyk.jpg", _cmyk_jpeg(), "a CMYK JPEG", ("mode", "cmyk")),
    ]


def slide_corpus() -> list[BadInput]:
    """Slide files TileSlide, PredictSlide, ``histomarker tile`` and ``predict`` must
    refuse (or, for the plain pictures, refuse for want of a resolution)."""
    slide = tiled_slide()
    unreadable = ("not a readable", "cannot", "unsupported", "not a", "truncated", "corrupt")
    return [
        BadInput("zero_bytes", "EMPTY-1.svs", b"", "a zero-byte slide", ("empty", "0 bytes")),
        BadInput(
            "truncated_header",
            "TRUNC-1.tiff",
            slide[:64],
            "a TIFF cut inside its first directory",
            unreadable,
        ),
        BadInput(
            "truncated_body",
            "TRUNC-2.tiff",
            slide[: len(slide) * 2 // 3],
            "a tiled TIFF whose last tiles are missing",
            unreadable,
        ),
        BadInput(
            "garbage_svs",
            "GARBAGE-1.svs",
            bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8)),
            "random bytes with a slide extension",
            unreadable,
        ),
        BadInput(
            "text_as_ndpi",
            "TEXT-1.ndpi",
            b"not a slide\n" * 64,
            "a text file with an NDPI extension",
            unreadable,
        ),
        BadInput(
            "png_as_svs",
            "PNG-1.svs",
            png_bytes(he_rgb()),
            "a small PNG renamed .svs (no resolution)",
            ("resolution", "mpp"),
        ),
        BadInput(
            "huge_tiff_header",
            "HUGE-1.tiff",
            huge_tiff(),
            f"a TIFF header declaring {HUGE_SIDE_PX}x{HUGE_SIDE_PX} px",
            ("exceeds", "larger", "bomb", "limit"),
        ),
        BadInput(
            "huge_png_as_tiff",
            "HUGE-2.tiff",
            huge_png(),
            f"a PNG header declaring {HUGE_SIDE_PX}x{HUGE_SIDE_PX} px, named .tiff",
            ("exceeds", "larger", "bomb", "limit"),
        ),
    ]


def table_corpus() -> list[BadInput]:
    """Patch tables ``ComputeMetrics`` and ``histomarker metrics`` must refuse."""
    return [
        BadInput("zero_bytes", "empty.csv", b"", "a zero-byte CSV", ("empty", "no ", "cannot")),
        BadInput(
            "png_as_csv",
            "picture.csv",
            png_bytes(he_rgb()),
            "a PNG named .csv",
            ("cannot", "column", "utf", "decode", "parse"),
        ),
        BadInput(
            "garbage_parquet",
            "table.parquet",
            b"PAR1" + b"\x00" * 64,
            "bytes that only start like parquet",
            ("cannot", "parquet"),
        ),
        BadInput(
            "wrong_extension",
            "table.xlsx",
            b"slide_id,probability,label\nA,0.5,1\n",
            "a CSV named .xlsx",
            ("extension", "csv", "format"),
        ),
        BadInput(
            "missing_columns",
            "columns.csv",
            b"name,value\nA,1\n",
            "a CSV without the patch table's columns",
            ("column", "slide_id", "probability"),
        ),
        BadInput(
            "not_numbers",
            "words.csv",
            b"slide_id,probability,label\nA,high,1\nB,low,0\n",
            "probabilities that are words",
            ("probabilit", "numer", "number"),
        ),
    ]


#: Object keys every RPC must refuse before any I/O (the rule each breaks).
BAD_KEYS = {
    "dotdot": "../slides/x.svs",
    "dotdot_inside": "slides/../../etc/passwd",
    "absolute": "/etc/passwd",
    "dot_segment": "slides/./x.svs",
    "backslash": "slides\\..\\x.svs",
    "nul": "slides/x\x00.svs",
    "empty_segment": "slides//x.svs",
}

#: Slide ids that cannot name keys (non-ASCII, separators, dots).
BAD_SLIDE_IDS = {
    "non_ascii": "Schnitt-Ünïcødé-1",
    "cjk": "切片-1",
    "slash": "a/b",
    "dotdot": "..",
    "leading_dot": ".hidden",
}
