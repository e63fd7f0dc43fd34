from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.errors import InvalidInput
from services.common.objectstore import open_store
from services.slide.shards import ShardWriter, decode_patch, encode_patch, iter_shard


def _patch(seed: int) -> np.ndarray:
    """A smooth pink-purple patch with some texture, like stained tissue."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    base = np.stack([200 - xx, 120 + yy // 2, 180 - yy // 3], axis=-1).astype(float)
    texture = rng.normal(0, 3, (64, 64, 1))
    return np.clip(base + texture, 0, 255).astype(np.uint8)


def test_patches_round_trip_through_shards(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri())
    writer = ShardWriter(store, "tiles/s1/abc", "20x", patches_per_shard=2)
    patches = {(i * 100, 7): _patch(i) for i in range(5)}
    for (x, y), rgb in patches.items():
        writer.add(rgb, x=x, y=y, tissue_fraction=0.9)
    rows = writer.close()
    keys = sorted(info.key for info in store.list("tiles/s1/abc/shards/"))
    assert keys == [f"tiles/s1/abc/shards/20x-{i:05d}.tar" for i in range(3)]
    assert [row["member"] for row in rows] == [f"{x}_{y}.jpg" for x, y in patches]
    assert rows[0]["tissue_fraction"] == 0.9 and rows[4]["shard"].endswith("20x-00002.tar")
    seen = {}
    for key in keys:
        for member, rgb in iter_shard(store, key):
            seen[member] = rgb
    for (x, y), rgb in patches.items():
        decoded = seen[f"{x}_{y}.jpg"]
        assert decoded.shape == rgb.shape
        assert np.abs(decoded.astype(int) - rgb).mean() < 4  # JPEG q90


def test_png_is_lossless_and_shards_are_deterministic(tmp_path: Path) -> None:
    rgb = _patch(1)
    assert np.array_equal(decode_patch(encode_patch(rgb, "png")), rgb)
    blobs = []
    for run in ("a", "b"):
        store = open_store((tmp_path / run).as_uri())
        writer = ShardWriter(store, "t", "40x", image_format="png")
        writer.add(rgb, x=0, y=0)
        writer.close()
        blobs.append(store.get_bytes("t/shards/40x-00000.tar"))
    assert blobs[0] == blobs[1]


def test_bad_arguments(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri())
    with pytest.raises(InvalidInput):
        ShardWriter(store, "t", "20x", image_format="gif")
    with pytest.raises(InvalidInput):
        ShardWriter(store, "t", "20x", quality=0)
    writer = ShardWriter(store, "t", "20x")
    with pytest.raises(InvalidInput, match="x and y"):
        writer.add(_patch(0))
    writer.abort()
    assert list(store.list("t/")) == []
    with pytest.raises(InvalidInput):
        decode_patch(b"not an image")
