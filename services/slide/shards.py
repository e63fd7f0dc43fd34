"""Patch shards: many small patch images packed in tar files in the object store.

A slide's patches go to ``{prefix}/shards/{name}-{index:05d}.tar``; each member is
one encoded patch (JPEG quality 90 by default, or PNG) named ``{x}_{y}.{ext}`` after
its level-0 origin. The shard index, one row per patch with its coordinates, shard
key and member name, is returned to the caller, who stores it with the grid. Each
shard is assembled in a temporary file and uploaded whole, so a reader never sees a
half-written shard; training reads shards sequentially, which object stores serve
far better than millions of tiny objects.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from services.common.errors import InvalidInput
from services.common.images import decode_rgb
from services.common.objectstore import ObjectStore

#: Patches per shard: ~1000 JPEG 512 px patches make ~60-100 MB shards.
DEFAULT_PATCHES_PER_SHARD = 1000
FORMATS = ("jpeg", "png")


def encode_patch(rgb: np.ndarray, image_format: str = "jpeg", quality: int = 90) -> bytes:
    """Encode an RGB patch as JPEG or PNG bytes."""
    if image_format not in FORMATS:
        raise InvalidInput(f"unknown patch format {image_format!r}; use one of {FORMATS}")
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if image_format == "jpeg":
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    else:
        ok, data = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise InvalidInput(f"cannot encode a patch of shape {rgb.shape} as {image_format}")
    return bytes(data.tobytes())


def decode_patch(data: bytes) -> np.ndarray:
    """Decode JPEG or PNG bytes to an RGB ``uint8`` patch (the one picture rule of
    :func:`services.common.images.decode_rgb`)."""
    return decode_rgb(data, "the patch image")


@dataclass
class ShardWriter:
    """Packs patches into tar shards and uploads each shard when it is full.

    Args:
        store: Where the shards go.
        prefix: Key prefix, e.g. ``tiles/{slide_id}/{params_hash}``.
        name: Shard family name, e.g. ``20x`` or ``40x``.
        image_format: ``jpeg`` or ``png``.
        quality: JPEG quality (1-100).
        patches_per_shard: Members per shard.
    """

    store: ObjectStore
    prefix: str
    name: str
    image_format: str = "jpeg"
    quality: int = 90
    patches_per_shard: int = DEFAULT_PATCHES_PER_SHARD
    rows: list[dict[str, Any]] = field(default_factory=list)
    _tmp: Any = None
    _tar: tarfile.TarFile | None = None
    _count: int = 0
    _index: int = 0

    def __post_init__(self) -> None:
        if self.image_format not in FORMATS:
            raise InvalidInput(f"unknown patch format {self.image_format!r}; use one of {FORMATS}")
        if not 1 <= self.quality <= 100:
            raise InvalidInput(f"JPEG quality must be within 1-100, got {self.quality}")
        if self.patches_per_shard < 1:
            raise InvalidInput("patches per shard must be at least 1")

    @property
    def _ext(self) -> str:
        return "jpg" if self.image_format == "jpeg" else "png"

    def _shard_key(self) -> str:
        name = f"shards/{self.name}-{self._index:05d}.tar"
        return f"{self.prefix}/{name}" if self.prefix else name

    def add(self, rgb: np.ndarray, **meta: Any) -> dict[str, Any]:
        """Add one patch; ``meta`` must hold its level-0 ``x`` and ``y``.

        Returns:
            The patch's index row (``meta`` plus ``shard`` and ``member``).
        """
        if "x" not in meta or "y" not in meta:
            raise InvalidInput("a patch needs its level-0 x and y")
        if self._tar is None:
            # Both stay open across add() calls until the shard is full.
            self._tmp = tempfile.NamedTemporaryFile(suffix=".tar", delete=False)  # noqa: SIM115
            self._tar = tarfile.open(  # noqa: SIM115
                fileobj=self._tmp, mode="w", format=tarfile.USTAR_FORMAT
            )
        data = encode_patch(rgb, self.image_format, self.quality)
        member = f"{int(meta['x'])}_{int(meta['y'])}.{self._ext}"
        info = tarfile.TarInfo(member)
        info.size = len(data)
        info.mtime = 0  # the same patches give the same shard bytes
        self._tar.addfile(info, io.BytesIO(data))
        row = {**meta, "shard": self._shard_key(), "member": member}
        self.rows.append(row)
        self._count += 1
        if self._count >= self.patches_per_shard:
            self._flush()
        return row

    def _flush(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tmp.close()
        path = Path(self._tmp.name)
        try:
            self.store.put_file(self._shard_key(), path)
        finally:
            path.unlink(missing_ok=True)
        self._tar, self._tmp = None, None
        self._count = 0
        self._index += 1

    def close(self) -> list[dict[str, Any]]:
        """Upload the last shard; returns the index rows of every patch added."""
        self._flush()
        return self.rows

    def abort(self) -> None:
        """Drop the shard being assembled (uploaded shards are the caller's to clean)."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.close()
            Path(self._tmp.name).unlink(missing_ok=True)
            self._tar, self._tmp = None, None


def iter_shard(store: ObjectStore, key: str) -> Iterator[tuple[str, np.ndarray]]:
    """The (member name, RGB patch) pairs of one shard, in order."""
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        store.get_file(key, tmp.name)
        with tarfile.open(tmp.name, mode="r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                yield member.name, decode_patch(handle.read())
