"""Named foundation encoders: published architectures on meta, local weights only,
strict loading with readable errors, and embedding uint8 patches (tiny variants)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from services.common.errors import FailedPrecondition, InvalidInput
from services.encoders import (
    ENCODERS,
    build_encoder,
    encoder_names,
    encoder_spec,
    load_encoder,
    tiny_spec,
)
from services.encoders.architectures import DETECTOR_BACKBONE
from services.encoders.key_maps import dinov2_hf_to_timm
from services.inference.bundle import ModelConfig, save_bundle
from services.inference.preprocess import PreprocessConfig
from services.inference.training import TrainConfig
from services.slide.grid import GridParams

NAMES = encoder_names()


@functools.cache
def _meta(name: str) -> torch.nn.Module:
    """The published-size encoder on meta, built once per test session (read only)."""
    return build_encoder(name, device="meta")


def _random_tiny_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a tiny encoder, with non-trivial norms and layer scales."""
    torch.manual_seed(seed)
    module = build_encoder(name, tiny=True)
    state = {}
    for key, value in module.state_dict().items():
        if value.is_floating_point():
            value = torch.randn_like(value) * 0.1 + (1.0 if key.endswith("running_var") else 0.0)
        state[key] = value.clone()
    return state


def _he_patches(count: int, side: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB patches that look roughly like H&E: pink stroma, purple nuclei."""
    rng = np.random.default_rng(seed)
    patches = np.empty((count, side, side, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:side, :side]
    for i in range(count):
        image = np.full((side, side, 3), (232, 182, 212), dtype=np.float64)
        for _ in range(6):
            cy, cx = rng.uniform(0, side, 2)
            radius = rng.uniform(side / 16, side / 6)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = (96, 62, 150)
        image += rng.normal(0, 12, image.shape)
        patches[i] = np.clip(image, 0, 255).astype(np.uint8)
    return patches


def _save(state: dict[str, torch.Tensor], path: Path, wrap: bool = False) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(
            {"state_dict": {f"module.{k}": v for k, v in state.items()}} if wrap else state, path
        )
    return path


# --- registry and published architectures (meta device: nothing allocated) -----------


def test_registry_names_and_specs() -> None:
    assert tuple(ENCODERS) == NAMES and len(NAMES) == 11
    for name in NAMES:
        spec = encoder_spec(name)
        assert spec.name == name and spec.licence and spec.source
        # The biomarker CNNs see the paper's 40x patches; the others 20x ones.
        assert spec.mpp == (0.25 if name == "biomarker-cnns" else 0.5)
        assert spec.stain_reference == ("" if name == "biomarker-cnns" else None)
    assert encoder_spec("virchow2").embed_dim == 2560
    assert encoder_spec("conch").input_px == 448


def test_detector_spec_is_what_the_detector_trains_with() -> None:
    spec, defaults = encoder_spec("detector"), PreprocessConfig()
    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert spec.input_px == defaults.input_px == train["input_px"]
    assert (spec.mean, spec.std) == (defaults.mean, defaults.std)
    assert spec.mpp == 10 / GridParams().magnification
    assert train["backbone"] == DETECTOR_BACKBONE


@pytest.mark.parametrize("name", NAMES)
def test_every_encoder_builds_on_meta_with_its_published_width(name: str) -> None:
    spec = encoder_spec(name)
    module = _meta(name)
    out = module(torch.empty(2, 3, spec.input_px, spec.input_px, device="meta"))
    assert tuple(out.shape) == (2, spec.embed_dim)
    shapes = [(k, tuple(v.shape)) for k, v in module.state_dict().items()]
    again = [
        (k, tuple(v.shape)) for k, v in build_encoder(name, device="meta").state_dict().items()
    ]
    assert shapes and shapes == again


@pytest.mark.parametrize(
    ("name", "key", "shape"),
    [
        ("uni", "blocks.23.ls1.gamma", (1024,)),
        ("uni", "pos_embed", (1, 197, 1024)),
        ("uni2-h", "reg_token", (1, 8, 1536)),
        ("uni2-h", "pos_embed", (1, 256, 1536)),  # no_embed_class: patches only
        ("uni2-h", "blocks.23.mlp.fc1.weight", (8192, 1536)),
        ("h-optimus-0", "reg_token", (1, 4, 1536)),
        ("h-optimus-0", "blocks.39.ls2.gamma", (1536,)),
        ("h0-mini", "reg_token", (1, 4, 768)),
        ("h0-mini", "blocks.11.mlp.fc1.weight", (4096, 768)),
        ("virchow2", "reg_token", (1, 4, 1280)),
        ("virchow2", "pos_embed", (1, 261, 1280)),
        ("virchow2", "blocks.31.mlp.fc2.weight", (1280, 3416)),
        ("prov-gigapath", "patch_embed.proj.weight", (1536, 3, 16, 16)),
        ("prov-gigapath", "blocks.39.mlp.fc1.weight", (8192, 1536)),
        ("phikon-v2", "blocks.23.attn.qkv.weight", (3072, 1024)),
        ("conch", "trunk.pos_embed", (1, 785, 768)),
        ("conch", "attn_pool_contrast.query", (1, 512)),
        ("conch", "attn_pool_contrast.attn.k_proj_weight", (512, 768)),
        ("conch", "proj_contrast", (512, 512)),
        ("resnet50-trunc", "layer3.5.conv3.weight", (1024, 256, 1, 1)),
        ("detector", "Mixed_7c.branch_pool.conv.weight", (192, 2048, 1, 1)),
        ("biomarker-cnns", "tp53.fc.weight", (2, 2048)),
        ("biomarker-cnns", "basal.Mixed_7c.branch_pool.conv.weight", (192, 2048, 1, 1)),
    ],
)
def test_published_key_names_and_shapes(name: str, key: str, shape: tuple[int, ...]) -> None:
    assert tuple(_meta(name).state_dict()[key].shape) == shape


def test_heads_the_embedding_does_not_use_are_not_built() -> None:
    keys = {n: set(_meta(n).state_dict()) for n in NAMES}
    assert not any(k.startswith(("layer4.", "fc.")) for k in keys["resnet50-trunc"])
    assert not any(k.startswith(("AuxLogits.", "fc.")) for k in keys["detector"])
    assert not any(k.startswith(("head.", "attn_pool.")) for k in keys["virchow2"])
    assert not any(k.startswith("attn_pool_caption.") for k in keys["conch"])


@pytest.mark.parametrize(
    ("name", "published_millions"),
    [
        ("uni", 303),
        ("uni2-h", 681),
        ("h-optimus-0", 1134),  # "1.1B"
        ("h0-mini", 86),
        ("virchow2", 631),
        ("prov-gigapath", 1134),  # "1.13B"
    ],
)
def test_parameter_counts_match_the_published_figures(name: str, published_millions: int) -> None:
    count = sum(p.numel() for p in _meta(name).parameters())
    assert abs(count / 1e6 - published_millions) / published_millions < 0.02


def test_unknown_encoder_name_lists_the_known_ones(tmp_path: Path) -> None:
    for call in (
        lambda: encoder_spec("unii"),
        lambda: build_encoder("unii", device="meta"),
        lambda: load_encoder("unii", tmp_path / "w.pt"),
    ):
        with pytest.raises(InvalidInput, match=r"unknown encoder 'unii'.*virchow2"):
            call()


# --- load -> embed on the tiny variants ------------------------------------------------

_FILES = {
    "uni": "w.safetensors",
    "uni2-h": "w.pth",
    "h-optimus-0": "w.bin",
    "h0-mini": "w.safetensors",
    "virchow2": "wrapped.pt",  # {"state_dict": {"module.<key>": ...}}
    "prov-gigapath": "w.safetensors",
    "phikon-v2": "w.bin",
    "conch": "w.pth",
    "resnet50-trunc": "w.safetensors",
}


@pytest.mark.parametrize("name", sorted(_FILES))
def test_tiny_load_and_embed(name: str, tmp_path: Path) -> None:
    state = _random_tiny_state(name)
    path = _save(state, tmp_path / _FILES[name], wrap=_FILES[name].startswith("wrapped"))
    encoder = load_encoder(name, path, tiny=True)
    spec = encoder.spec
    assert spec == tiny_spec(name) and not encoder.module.training
    loaded = encoder.module.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    patches = _he_patches(5, spec.input_px)
    out = encoder.embed(patches, batch_size=2)
    assert out.shape == (5, spec.embed_dim) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.std() > 0
    assert np.array_equal(out, encoder.embed(patches, batch_size=2))
    np.testing.assert_allclose(out, encoder.embed(patches, batch_size=5), rtol=1e-4, atol=1e-5)

    # Larger patches are shrunk with area interpolation, smaller ones enlarged.
    large = _he_patches(2, spec.input_px * 2, seed=1)
    shrunk = np.stack(
        [cv2.resize(p, (spec.input_px,) * 2, interpolation=cv2.INTER_AREA) for p in large]
    )
    np.testing.assert_allclose(encoder.embed(large), encoder.embed(shrunk), rtol=1e-5, atol=1e-5)
    assert encoder.embed(_he_patches(2, spec.input_px - 5)).shape == (2, spec.embed_dim)
    assert encoder.embed(np.zeros((0, 40, 40, 3), np.uint8)).shape == (0, spec.embed_dim)


def test_loaded_encoder_normalises_with_its_spec(tmp_path: Path) -> None:
    path = _save(_random_tiny_state("h0-mini"), tmp_path / "w.safetensors")
    encoder = load_encoder("h0-mini", path, tiny=True)
    patches = _he_patches(3, encoder.spec.input_px)
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(encoder.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = encoder.module((x - mean) / std).numpy()
    np.testing.assert_allclose(encoder.embed(patches), expected, rtol=1e-5, atol=1e-5)


def test_model_card_entry(tmp_path: Path) -> None:
    path = _save(_random_tiny_state("uni"), tmp_path / "uni.safetensors")
    card = load_encoder("uni", path, tiny=True).model_card_entry()
    assert card["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["weights_file"] == "uni.safetensors" and card["licence"] == "CC-BY-NC-ND-4.0"
    assert card["name"] == "uni" and card["embed_dim"] == 64 and card["mpp"] == 0.5
    assert set(card) >= {"source", "input_px", "mean", "std"}
    assert card["stain_reference"] is None  # colours as scanned


def test_conch_takes_the_vision_tower_of_a_whole_checkpoint(tmp_path: Path) -> None:
    state = _random_tiny_state("conch")
    whole = {f"visual.{k}": v for k, v in state.items()}
    whole |= {
        "visual.attn_pool_caption.query": torch.zeros(4, 64),
        "visual.ln_caption.weight": torch.ones(64),
        "text.token_embedding.weight": torch.zeros(10, 8),
        "logit_scale": torch.ones(()),
    }
    encoder = load_encoder("conch", _save(whole, tmp_path / "conch.bin"), tiny=True)
    assert all(torch.equal(encoder.module.state_dict()[k], v) for k, v in state.items())


def test_resnet50_trunc_drops_layer4_and_fc_of_a_full_resnet(tmp_path: Path) -> None:
    from torchvision.models.resnet import Bottleneck, ResNet

    full = ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=8).state_dict()
    encoder = load_encoder("resnet50-trunc", _save(full, tmp_path / "r50.pth"), tiny=True)
    assert encoder.embed(_he_patches(2, 32)).shape == (2, 1024)


def test_detector_loads_the_bundle_weights_without_its_classifier(tmp_path: Path) -> None:
    from services.inference.backbones import build_backbone

    torch.manual_seed(0)
    model = build_backbone("tiny", num_classes=2)
    config = ModelConfig(
        name="cancer_detector", version="1", backbone="tiny", preprocess=PreprocessConfig(32)
    )
    folder = save_bundle(tmp_path / "bundle", model, config)
    encoder = load_encoder("detector", folder / "weights.pt", tiny=True)
    assert set(encoder.module.state_dict()) == {
        k for k in model.state_dict() if not k.startswith("fc.")
    }
    model.eval()
    with torch.inference_mode():
        x = torch.randn(2, 3, 32, 32)
        pooled = torch.flatten(model.pool(model.features(x)), 1)
        assert torch.allclose(encoder.module(x), pooled)

    # A detector trained at another input side (a CPU demo's 64 px) is the encoder at
    # that side, with its own normalisation; another backbone is refused.
    other = dataclasses.replace(
        config, preprocess=PreprocessConfig(64, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    )
    save_bundle(tmp_path / "other", model, other)
    wide = load_encoder("detector", tmp_path / "other" / "weights.pt", tiny=True)
    assert wide.spec.input_px == 64 and wide.spec.mean == (0.5, 0.5, 0.5)
    assert wide.spec.mpp == pytest.approx(4.0)  # its 512 px 20x patches seen at 64 px
    assert wide.embed(np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, wide.spec.embed_dim)
    with pytest.raises(InvalidInput, match="trained as tiny; the detector encoder is inception_v3"):
        load_encoder("detector", tmp_path / "other" / "weights.pt")


# --- errors --------------------------------------------------------------------------


def test_missing_file_is_a_failed_precondition_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "uni.safetensors"
    with pytest.raises(FailedPrecondition, match=str(path)):
        load_encoder("uni", path, tiny=True)


def test_wrong_keys_list_the_missing_and_the_unexpected(tmp_path: Path) -> None:
    state = _random_tiny_state("virchow2")
    del state["blocks.1.ls2.gamma"]
    state["blocks.1.extra.weight"] = torch.zeros(3)
    with pytest.raises(InvalidInput) as caught:
        load_encoder("virchow2", _save(state, tmp_path / "w.pth"), tiny=True)
    message = str(caught.value)
    assert "1 missing (blocks.1.ls2.gamma)" in message
    assert "1 unexpected (blocks.1.extra.weight)" in message


def test_many_wrong_keys_are_counted_and_cut_short(tmp_path: Path) -> None:
    state = {f"other.{k}": v for k, v in _random_tiny_state("uni").items()}
    with pytest.raises(
        InvalidInput, match=r"\d+ missing \(cls_token, .*, \.\.\.\); \d+ unexpected"
    ):
        load_encoder("uni", _save(state, tmp_path / "w.safetensors"), tiny=True)


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    state = _random_tiny_state("uni2-h")
    state["reg_token"] = torch.zeros(1, 4, 64)
    with pytest.raises(InvalidInput, match=r"reg_token has shape \(1, 4, 64\).*\(1, 8, 64\)"):
        load_encoder("uni2-h", _save(state, tmp_path / "w.safetensors"), tiny=True)


@pytest.mark.parametrize("file_name", ["junk.pth", "junk.bin", "junk.safetensors"])
def test_garbage_bytes_are_invalid_input_in_one_line(tmp_path: Path, file_name: str) -> None:
    path = tmp_path / file_name
    path.write_bytes(b"\x00not a weights file\xff" * 64)
    with pytest.raises(InvalidInput) as caught:
        load_encoder("uni", path, tiny=True)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_other_file_types_and_non_tensors_are_invalid_input(tmp_path: Path) -> None:
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(InvalidInput, match=r"unknown type \.ckpt"):
        load_encoder("uni", tmp_path / "w.ckpt", tiny=True)
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "c.pt")
    with pytest.raises(InvalidInput, match="not a tensor"):
        load_encoder("uni", tmp_path / "c.pt", tiny=True)


def test_embed_refuses_what_is_not_uint8_rgb(tmp_path: Path) -> None:
    encoder = load_encoder("uni", _save(_random_tiny_state("uni"), tmp_path / "w.pt"), tiny=True)
    with pytest.raises(InvalidInput, match="uint8"):
        encoder.embed(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(InvalidInput, match="uint8"):
        encoder.embed(np.zeros((32, 32, 3), np.uint8))


# --- phikon-v2: Hugging Face Dinov2 names --------------------------------------------


def _timm_to_hf_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse mapping, written independently of the loader's tables."""
    out = {"embeddings.mask_token": torch.zeros(1, state["cls_token"].shape[-1])}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            layer = f"encoder.layer.{index}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for part, chunk in zip(("query", "key", "value"), value.chunk(3), strict=True):
                    out[f"{layer}attention.attention.{part}.{kind}"] = chunk.clone()
                continue
            rest = (
                rest.replace("attn.proj.", "attention.output.dense.")
                .replace("ls1.gamma", "layer_scale1.lambda1")
                .replace("ls2.gamma", "layer_scale2.lambda1")
            )
            out[layer + rest] = value
        else:
            out[
                {
                    "cls_token": "embeddings.cls_token",
                    "pos_embed": "embeddings.position_embeddings",
                    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                    "norm.weight": "layernorm.weight",
                    "norm.bias": "layernorm.bias",
                }[key]
            ] = value
    return out


def test_phikon_v2_loads_hugging_face_dinov2_weights_exactly(tmp_path: Path) -> None:
    state = _random_tiny_state("phikon-v2")
    hf = _timm_to_hf_dinov2(state)
    assert not set(hf) & set(state)
    assert "encoder.layer.1.attention.attention.value.bias" in hf
    encoder = load_encoder("phikon-v2", _save(hf, tmp_path / "model.safetensors"), tiny=True)
    loaded = encoder.module.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    plain = load_encoder("phikon-v2", _save(state, tmp_path / "timm.bin"), tiny=True)
    patches = _he_patches(2, 32)
    assert np.array_equal(encoder.embed(patches), plain.embed(patches))


def test_hugging_face_dinov2_with_a_missing_projection_is_invalid_input() -> None:
    hf = _timm_to_hf_dinov2(_random_tiny_state("phikon-v2"))
    del hf["encoder.layer.0.attention.attention.value.weight"]
    with pytest.raises(InvalidInput, match="layer 0 has no attention value weight"):
        dinov2_hf_to_timm(hf)
