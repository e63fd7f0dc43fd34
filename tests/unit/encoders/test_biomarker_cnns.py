"""``biomarker-cnns``: trained biomarker bundles combined into one weights file and its
sidecar, loaded as one encoder whose embedding is each bundle's pooled features and
logit margin (the MIL encoder trial's computation), with readable errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from services.cli import main
from services.common.errors import FailedPrecondition, InvalidInput, NotFound
from services.encoders import build_encoder, effective_spec, load_encoder, tiny_spec
from services.encoders.biomarker_cnns import (
    SIDECAR_SUFFIX,
    bundles_by_biomarker,
    combine_bundles,
    read_sidecar,
    sidecar_path,
)
from services.inference.backbones import build_backbone
from services.inference.bundle import ModelConfig, load_bundle, save_bundle
from services.inference.preprocess import PreprocessConfig, to_input
from services.mil.scoring import LocalEmbedder

NAME = "biomarker-cnns"
SIDE = 32
PRE = PreprocessConfig(SIDE, mean=(0.6, 0.5, 0.7), std=(0.2, 0.25, 0.15))


def _bundle(
    root: Path,
    biomarker: str,
    *,
    seed: int,
    backbone: str = "tiny",
    preprocess: PreprocessConfig = PRE,
    stain_reference: str = "none",
) -> Path:
    """A real bundle with random weights and BatchNorm statistics (eval mode matters)."""
    torch.manual_seed(seed)
    model = build_backbone(backbone, 2, input_px=preprocess.input_px)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(
                    torch.randn_like(value) * 0.1 + (1.0 if key.endswith("running_var") else 0.0)
                )
    config = ModelConfig(
        name=f"biomarker_{biomarker}",
        version="3",
        backbone=backbone,
        preprocess=preprocess,
        temperature=1.7,
        stain_reference=stain_reference,
    )
    return save_bundle(root / biomarker, model, config)


@pytest.fixture
def bundles(tmp_path: Path) -> dict[str, Path]:
    return {
        "tp53": _bundle(tmp_path, "tp53", seed=1),
        "er": _bundle(tmp_path, "er", seed=2, backbone="small"),
        "her2": _bundle(tmp_path, "her2", seed=3),
    }


def _patches(count: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def _trial_embedding(bundles: dict[str, Path], patches: np.ndarray) -> np.ndarray:
    """benchmarks/recipes/mil_encoder_trial.py's PaperModelsEmbedder.embed."""
    parts = []
    with torch.inference_mode():
        for name in sorted(bundles):
            model, config = load_bundle(bundles[name])
            x = to_input(patches, config.preprocess)
            pooled = torch.flatten(model.pool(model.features(x)), 1)
            logits = model.fc(pooled)
            parts += [pooled, (logits[:, 1] - logits[:, 0]).unsqueeze(1)]
    return torch.cat(parts, dim=1).numpy()


def test_combined_bundles_embed_as_the_trial_does(bundles: dict[str, Path], tmp_path: Path) -> None:
    out = combine_bundles(bundles, tmp_path / "combined" / "cnns.pt")
    sidecar = sidecar_path(out)
    assert sidecar.name == "cnns" + SIDECAR_SUFFIX and sidecar.is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no leftovers
    state = torch.load(out, weights_only=True)
    assert {k.split(".")[0] for k in state} == {"er", "her2", "tp53"}
    assert torch.equal(state["tp53.fc.weight"], load_bundle(bundles["tp53"])[0].fc.weight)
    data = json.loads(sidecar.read_text())
    assert data["encoder"] == NAME and data["format"] == 1
    assert data["bundles"]["er"]["backbone"] == "small"
    assert data["bundles"]["tp53"]["temperature"] == 1.7
    assert set(read_sidecar(out)) == {"er", "her2", "tp53"}

    encoder = load_encoder(NAME, out)
    spec = encoder.spec
    # small and tiny CNNs both end in 128 channels: 3 x (128 features + 1 margin).
    assert spec.embed_dim == 3 * (128 + 1) == effective_spec(NAME, out).embed_dim
    assert (spec.input_px, spec.mpp) == (SIDE, pytest.approx(0.25 * 512 / SIDE))
    assert (spec.mean, spec.std) == (PRE.mean, PRE.std)
    assert spec.stain_reference is None  # "none": colours as scanned
    assert spec.card()["stain_reference"] is None
    assert "er (small v3), her2 (tiny v3), tp53 (tiny v3)" in spec.source
    patches = _patches(5, 48)  # resized to 32 px as the bundles' preprocessing does
    np.testing.assert_allclose(
        encoder.embed(patches, batch_size=2),
        _trial_embedding(bundles, patches),
        rtol=1e-5,
        atol=1e-5,
    )
    embedder = LocalEmbedder(encoder)
    assert embedder.stain_reference is None and embedder.embed_dim == spec.embed_dim
    # tiny changes nothing: the sidecar names the networks.
    assert load_encoder(NAME, out, tiny=True).spec.embed_dim == spec.embed_dim


def test_the_stain_reference_travels_with_the_spec(tmp_path: Path) -> None:
    folders = {
        b: _bundle(tmp_path, b, seed=i, stain_reference="") for i, b in enumerate(("pr", "basal"))
    }
    out = combine_bundles(folders, tmp_path / "cnns.pt")
    spec = effective_spec(NAME, out)
    assert spec.stain_reference == "" and spec.card()["stain_reference"] == ""
    assert LocalEmbedder(load_encoder(NAME, out)).stain_reference == ""


def test_registry_spec_without_a_sidecar_is_the_methods_six() -> None:
    module = build_encoder(NAME, device="meta")
    assert sorted(module.keys()) == sorted(["basal", "er", "her2", "pik3ca", "pr", "tp53"])
    tiny = build_encoder(NAME, tiny=True)
    assert tiny(torch.zeros(2, 3, 32, 32)).shape == (2, tiny_spec(NAME).embed_dim)
    with pytest.raises(InvalidInput, match="biomarker-cnns only"):
        build_encoder("uni", device="meta", bundles={})


def test_a_file_missing_a_key_is_refused_listing_it(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    out = combine_bundles(bundles, tmp_path / "cnns.pt")
    state = torch.load(out, weights_only=True)
    del state["her2.fc.bias"]
    torch.save(state, out)
    with pytest.raises(InvalidInput, match=r"1 missing \(her2\.fc\.bias\)"):
        load_encoder(NAME, out)


def test_missing_weights_or_sidecar_is_a_failed_precondition(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(FailedPrecondition, match=r"absent\.pt does not exist"):
        load_encoder(NAME, tmp_path / "absent.pt")
    out = combine_bundles(bundles, tmp_path / "cnns.pt")
    sidecar_path(out).unlink()
    with pytest.raises(FailedPrecondition, match=r"sidecar .*cnns\.bundles\.json"):
        load_encoder(NAME, out)
    sidecar_path(out).write_text('{"format": 1, "bundles": {}}')
    with pytest.raises(InvalidInput, match="lists no bundles"):
        effective_spec(NAME, out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"preprocess": PreprocessConfig(64, PRE.mean, PRE.std)}, "preprocess"),
        ({"preprocess": PreprocessConfig(SIDE)}, "preprocess"),
        ({"stain_reference": ""}, "stain_reference"),
    ],
)
def test_bundles_that_disagree_are_refused(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    folders = {"tp53": _bundle(tmp_path, "tp53", seed=1)}
    folders["pr"] = _bundle(tmp_path, "pr", seed=2, **change)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=f"bundles pr and tp53 differ in {message}"):
        combine_bundles(folders, tmp_path / "cnns.pt")
    assert not (tmp_path / "cnns.pt").exists()


def test_other_bad_inputs_are_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no bundles"):
        combine_bundles({}, tmp_path / "cnns.pt")
    with pytest.raises(InvalidInput, match="must end in"):
        combine_bundles(bundles, tmp_path / "cnns.safetensors")
    with pytest.raises(InvalidInput, match="the pr bundle is biomarker_er"):
        combine_bundles({"pr": bundles["er"]}, tmp_path / "cnns.pt")
    with pytest.raises(InvalidInput, match="unknown biomarker 'ki67'"):
        combine_bundles({"ki67": bundles["er"]}, tmp_path / "cnns.pt")
    with pytest.raises(NotFound):
        bundles_by_biomarker([tmp_path / "nothing"])
    with pytest.raises(InvalidInput, match="two bundles of er"):
        bundles_by_biomarker([bundles["er"], bundles["er"]])
    detector = save_bundle(
        tmp_path / "det",
        build_backbone("tiny", 2),
        dataclasses.replace(
            ModelConfig(name="cancer_detector", version="1", backbone="tiny"), preprocess=PRE
        ),
    )
    with pytest.raises(InvalidInput, match="not a biomarker model"):
        bundles_by_biomarker([detector])


def test_cli_combines_and_exits_2_on_bad_input(
    bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli" / "cnns.pt"
    folders = [str(p) for p in bundles.values()]
    assert main(["encoders", "combine", *folders, "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["weights"] == str(out) and result["sidecar"] == str(sidecar_path(out))
    assert result["embed_dim"] == 3 * 129 and result["input_px"] == SIDE
    assert load_encoder(NAME, out).spec.embed_dim == 3 * 129

    mismatched = _bundle(tmp_path / "other", "pr", seed=4, preprocess=PreprocessConfig(64))
    for argv in (
        ["encoders", "combine", *folders, str(mismatched), "--out", str(tmp_path / "x.pt")],
        ["encoders", "combine", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.pt")],
        ["encoders", "combine", *folders, "--out", str(tmp_path / "x.h5")],
        ["encoders", "combine", "--out", str(tmp_path / "x.pt")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "histomarker encoders" in err
    assert not (tmp_path / "x.pt").exists()
    # The listing still works without an action.
    assert main(["encoders", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["encoders"]
    assert any(spec["name"] == NAME for spec in listed)


# --- serving: the archive carries the sidecar ------------------------------------------


def test_the_archive_carries_the_sidecar_and_its_worker_loads_the_same_encoder(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    import zipfile

    from services.encoders.handler import load_archived_encoder
    from services.mil.archive import build_encoder_mar, encoder_card
    from services.mil.remote import TorchServeEmbedder

    out = combine_bundles(bundles, tmp_path / "cnns.pt")
    mar = build_encoder_mar(NAME, out, tmp_path / "store", version="1")
    assert mar.name == "encoder_biomarker_cnns.mar"
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as archive:
        assert {"cnns.pt", "cnns.bundles.json", "encoder.json"} <= set(archive.namelist())
        assert "services/encoders/biomarker_cnns.py" in archive.namelist()
        archive.extractall(folder)
    served = load_archived_encoder(folder)
    local = load_encoder(NAME, out)
    assert served.spec == local.spec
    patches = _patches(3, SIDE, seed=4)
    np.testing.assert_array_equal(served.embed(patches), local.embed(patches))

    card = encoder_card(mar)
    assert card["encoder"] == NAME and card["stain_reference"] is None
    assert card["embed_dim"] == local.spec.embed_dim and card["mpp"] == 4.0
    embedder = TorchServeEmbedder(None, card["model_name"], "1", card)  # type: ignore[arg-type]
    assert embedder.stain_reference is None and embedder.input_px == SIDE
    keyed = TorchServeEmbedder(None, "x", "1", {**card, "stain_reference": ""})  # type: ignore[arg-type]
    assert keyed.stain_reference == ""
    older = {k: v for k, v in card.items() if k != "stain_reference"}
    assert TorchServeEmbedder(None, "x", "1", older).stain_reference is None  # type: ignore[arg-type]
    with pytest.raises(FailedPrecondition, match="stain_reference"):
        TorchServeEmbedder(None, "x", "1", {**card, "stain_reference": 3})  # type: ignore[arg-type]

    sidecar_path(out).unlink()
    with pytest.raises(FailedPrecondition, match="sidecar"):
        build_encoder_mar(NAME, out, tmp_path / "store", version="2")
