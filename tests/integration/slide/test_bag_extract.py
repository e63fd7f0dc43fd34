"""A real slide embedded into a bag: the QC'd grid at the encoder's resolution, resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from realdata import realdata
from safetensors.torch import save_file

from services.common.objectstore import open_store
from services.encoders import build_encoder, load_encoder
from services.mil.bags import read_bag
from services.mil.extract import bag_key, embed_slide, store_bag
from services.slide.prepare import PrepParams
from services.slide.reader import open_slide


class Interrupted(Exception):
    pass


@pytest.fixture()
def encoder(tmp_path: Path):
    torch.manual_seed(0)
    state = build_encoder("uni", tiny=True).state_dict()
    path = tmp_path / "uni-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return load_encoder("uni", path, tiny=True)


def test_a_real_slide_is_embedded_resumably_into_a_bag(tmp_path: Path, encoder) -> None:
    slide = realdata("qc") / "slides" / "CMU-1-Small-Region.svs"
    params = PrepParams(max_patches=96)
    with open_slide(slide) as reader:
        whole = read_bag(embed_slide(reader, "CMU-1", encoder, tmp_path / "a.h5", params=params))
        mpp0, dims = float(reader.mpp[0]), reader.dimensions

        calls: list[tuple[int, int]] = []

        def stop_after_two_batches(done: int, total: int) -> None:
            calls.append((done, total))
            if done >= 64:
                raise Interrupted

        out = tmp_path / "b.h5"
        with pytest.raises(Interrupted):
            embed_slide(
                reader, "CMU-1", encoder, out, params=params, progress=stop_after_two_batches
            )
        assert not out.exists() and out.with_name("b.h5.partial").exists()
        seen: list[tuple[int, int]] = []
        resumed = embed_slide(
            reader, "CMU-1", encoder, out, params=params, progress=lambda d, t: seen.append((d, t))
        )
    assert seen[0] == (64, 96) and seen[-1] == (96, 96)  # continued, not restarted
    again = read_bag(resumed)
    assert len(whole.features) == 96 and whole.features.shape[1] == encoder.spec.embed_dim
    np.testing.assert_array_equal(again.coords, whole.coords)
    np.testing.assert_allclose(again.features, whole.features, rtol=1e-5, atol=1e-6)
    assert np.isfinite(whole.features).all()
    # The grid is the encoder's: 32 px patches at 0.5 µm/px, coordinates on level 0.
    assert whole.patch_px == encoder.spec.input_px and whole.patch_mpp == pytest.approx(0.5)
    assert whole.level0_mpp == pytest.approx(mpp0) and whole.encoder == "uni"
    assert whole.encoder_sha256 == encoder.sha256 and whole.slide_id == "CMU-1"
    side0 = whole.patch_px * whole.patch_mpp / mpp0  # a patch's side on level 0
    width, height = dims
    assert (whole.coords >= 0).all() and (whole.coords[:, 0] + side0 <= width + 1).all()
    assert (whole.coords[:, 1] + side0 <= height + 1).all()
    assert len(np.unique(whole.coords, axis=0)) == 96  # distinct grid positions
    # Different patches give different embeddings (the bag is not one repeated row).
    assert len(np.unique(whole.features, axis=0)) > 90

    store = open_store(f"file://{tmp_path / 'store'}")
    key = store_bag(store, resumed, "uni", "CMU-1")
    assert key == bag_key("uni", "CMU-1") and store.exists(key)
