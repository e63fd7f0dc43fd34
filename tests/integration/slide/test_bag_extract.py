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


def test_embed_command_writes_a_bag_from_a_local_weights_file(tmp_path: Path, capsys) -> None:
    import json

    from services.cli import main

    slide = realdata("qc") / "slides" / "CMU-1-Small-Region.svs"
    torch.manual_seed(1)
    weights = tmp_path / "resnet50.pth"
    torch.save(build_encoder("resnet50-trunc").state_dict(), weights)
    out = tmp_path / "cmu.h5"
    argv = ["embed", str(slide), str(out), "--encoder", "resnet50-trunc", "--weights"]
    assert main([*argv, str(weights), "--max-patches", "8", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    bag = read_bag(out)
    assert answer["patches"] == 8 == len(bag.features) and bag.features.shape[1] == 1024
    assert answer["encoder"]["licence"] == "BSD-3-Clause"
    assert bag.encoder_sha256 == answer["encoder"]["sha256"]
    # Bad input: one readable line, exit 2, nothing written.
    assert main([*argv, str(tmp_path / "missing.pth"), "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pth" in err[0]
    # A finished bag is not overwritten: it says so.
    assert main([*argv, str(weights), "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished already" in err[0]
    assert read_bag(out).encoder_sha256 == answer["encoder"]["sha256"]
    assert (
        main(
            [
                "embed",
                str(slide),
                str(tmp_path / "x.txt"),
                "--encoder",
                "uni",
                "--weights",
                str(weights),
            ]
        )
        == 2
    )
    assert not (tmp_path / "x.txt").exists()


def test_an_encoder_trained_on_normalized_patches_embeds_them_normalized(tmp_path: Path) -> None:
    """With a stain reference each patch goes from the slide's own stains onto it
    before it is embedded: the bag is the embedding of the normalized patches, not of
    the scanned ones, on the same grid."""
    from services.mil.extract import encoder_reference
    from services.slide.prepare import prepare_slide
    from services.slide.stain import builtin_reference

    assert encoder_reference(None) is None and encoder_reference("none") is None
    reference = encoder_reference("")
    assert reference is not None and reference.to_json() == builtin_reference("vahadane").to_json()
    with pytest.raises(Exception, match="stored stain reference"):
        encoder_reference("references/lab.json")

    # A convolutional encoder: its embedding follows the patches' colours.
    torch.manual_seed(0)
    state = build_encoder("resnet50-trunc", tiny=True).state_dict()
    path = tmp_path / "resnet-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    encoder = load_encoder("resnet50-trunc", path, tiny=True)
    slide = realdata("qc") / "slides" / "CMU-1-Small-Region.svs"
    params = PrepParams(max_patches=16)
    with open_slide(slide) as reader:
        scanned = read_bag(embed_slide(reader, "CMU-1", encoder, tmp_path / "s.h5", params=params))
        normalized = read_bag(
            embed_slide(
                reader, "CMU-1", encoder, tmp_path / "n.h5", params=params, reference=reference
            )
        )
        # The same patches, normalized by hand with the slide's stains, embed the same.
        from dataclasses import replace

        from services.mil.extract import encoder_grid

        prep = replace(params, grid=encoder_grid(encoder, params.grid))
        prepared = prepare_slide(reader, "CMU-1", prep, reference=reference)
        assert prepared.stains is not None
        side, mpp = encoder.spec.input_px, prep.grid.target_mpp
        raw = [reader.read_patch(int(x), int(y), side, mpp) for x, y in normalized.coords[:4]]
        first = np.stack([prepared.stains.transform(patch) for patch in raw])
    # Normalization changed the pixels (CMU-1 is far from the reference's stains).
    assert np.abs(first.astype(float) - np.stack(raw).astype(float)).mean() > 2.0
    np.testing.assert_array_equal(normalized.coords, scanned.coords)
    change = np.abs(normalized.features - scanned.features).max()
    assert change > 1e-2 * np.abs(scanned.features).max()
    np.testing.assert_allclose(normalized.features[:4], encoder.embed(first), rtol=1e-4, atol=1e-5)
