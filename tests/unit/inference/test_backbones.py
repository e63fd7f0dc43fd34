"""Backbones by name, preprocessing, and local weights only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.errors import InvalidInput
from services.inference.backbones import (
    BACKBONES,
    backbone_spec,
    build_backbone,
    split_outputs,
)
from services.inference.preprocess import PreprocessConfig, to_input


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_gives_logits(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=3).eval()
    side = max(backbone_spec(name).min_input_px, 64) if name != "inception_v3" else 96
    with torch.inference_mode():
        out = model(torch.randn(2, 3, side, side))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_inception_trains_with_aux_logits_from_299_px() -> None:
    model = build_backbone("inception_v3", input_px=299).train()
    logits, aux = split_outputs(model(torch.randn(2, 3, 299, 299)))
    assert logits.shape == (2, 2) and aux is not None and aux.shape == (2, 2)
    small = build_backbone("inception_v3", input_px=128).train()
    logits, aux = split_outputs(small(torch.randn(2, 3, 128, 128)))
    assert logits.shape == (2, 2) and aux is None


def test_local_weights_load_the_body_and_replace_the_head(tmp_path: Path) -> None:
    source = build_backbone("resnet18", num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    model = build_backbone("resnet18", num_classes=2, weights_path=path)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 2


def test_bad_weights_and_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="unknown backbone"):
        build_backbone("vit_huge")
    with pytest.raises(InvalidInput, match="does not exist"):
        build_backbone("resnet18", weights_path=tmp_path / "none.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInput, match="not a torch state_dict"):
        build_backbone("resnet18", weights_path=junk)
    other = tmp_path / "tiny.pth"
    torch.save(build_backbone("tiny").state_dict(), other)
    with pytest.raises(InvalidInput, match="do not fit"):
        build_backbone("resnet18", weights_path=other)


def test_preprocess_scales_resizes_and_normalizes() -> None:
    config = PreprocessConfig(input_px=32)
    patch = np.full((64, 64, 3), 255, np.uint8)
    x = to_input(patch, config)
    assert x.shape == (1, 3, 32, 32)
    expected = (1.0 - np.array(config.mean)) / np.array(config.std)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), expected, rtol=1e-5)
    assert PreprocessConfig.from_json(config.to_json()) == config
    with pytest.raises(InvalidInput, match="uint8"):
        to_input(np.zeros((2, 8, 8, 3), np.float32), config)
    with pytest.raises(InvalidInput, match="input_px"):
        PreprocessConfig(input_px=4)
