"""``histomarker mil publish``: a trained head and its encoder's weights become two
archives with cards in the store, ready for ``histomarker models deploy``; weights
other than the ones the head was trained on are refused before anything is
written."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from services.cli import main
from services.common.objectstore import open_store
from services.common.vocabulary import BIOMARKERS
from services.encoders import build_encoder, load_encoder
from services.mil.train import train_mil

pytestmark = pytest.mark.slow


@pytest.fixture()
def trained(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    weights = tmp_path / "uni-tiny.safetensors"
    state = build_encoder("uni", tiny=True).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    encoder = load_encoder("uni", weights, tiny=True)
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(12, encoder.spec.embed_dim)).astype(np.float32) for _ in range(8)]
    labels = (rng.random((8, len(BIOMARKERS))) < 0.5).astype(np.float64)
    model = train_mil(bags[:5], labels[:5], bags[5:], labels[5:], epochs=1)
    model.encoder, model.encoder_sha256 = "uni", encoder.sha256
    return model.save(tmp_path / "mil_abmil.pt"), weights


def test_publish_puts_both_archives_and_cards_in_the_store(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, weights = trained
    url = (tmp_path / "store").as_uri()
    argv = ["mil", "publish", str(model), "--weights", str(weights), "--tiny", "--store-url", url]
    assert main([*argv, "--name", "demo", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    encoder, head = answer["encoder"], answer["mil"]
    assert encoder["model"] == "encoder_uni" and head["model"] == "mil_demo"
    assert answer["deploy"] == [
        f"histomarker models deploy encoder_uni {encoder['version']}",
        f"histomarker models deploy mil_demo {head['version']}",
    ]
    store = open_store(url)
    card = json.loads(store.get_bytes(f"{head['prefix']}/model.json"))
    assert card["kind"] == "mil" and card["encoder"]["name"] == "uni"
    encoder_card = json.loads(store.get_bytes(f"{encoder['prefix']}/model.json"))
    assert encoder_card["kind"] == "encoder" and encoder_card["sha256"] == card["encoder"]["sha256"]
    archive = tmp_path / "head.mar"
    archive.write_bytes(store.get_bytes(f"{head['prefix']}/mil_demo.mar"))
    assert "handler.py" in zipfile.ZipFile(archive).namelist()


def test_other_weights_are_refused_before_anything_is_written(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _ = trained
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    state = build_encoder("uni", tiny=True).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(other))
    url = (tmp_path / "store").as_uri()
    argv = ["mil", "publish", str(model), "--weights", str(other), "--tiny", "--store-url", url]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "is not the uni weights mil_abmil.pt was trained on" in error
    assert not list(open_store(url).list("models/"))
