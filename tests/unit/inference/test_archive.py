"""Building a TorchServe .mar from a model bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from services.common.errors import FailedPrecondition, InvalidInput, NotFound
from services.inference.archive import PACKED_MODULES, build_mar, mar_members
from services.inference.backbones import build_backbone
from services.inference.bundle import ModelConfig, load_config, save_bundle
from services.inference.preprocess import PreprocessConfig

CONFIG = ModelConfig(
    name="cancer_detector",
    version="3",
    backbone="tiny",
    class_names=("normal", "cancer"),
    preprocess=PreprocessConfig(input_px=32),
    temperature=1.3,
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bundle")
    return save_bundle(folder, build_backbone("tiny", 2, input_px=32), CONFIG, {"auroc": 0.5})


@pytest.fixture(scope="module")
def mar(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mar(bundle, tmp_path_factory.mktemp("store"))


def test_the_archive_holds_weights_config_handler_and_modules(mar: Path, bundle: Path) -> None:
    assert mar.name == "cancer_detector.mar"
    with zipfile.ZipFile(mar) as archive:
        names = sorted(archive.namelist())
        assert names == mar_members(has_metrics=True)
        assert archive.read("weights.pt") == (bundle / "weights.pt").read_bytes()
        assert archive.read("model.json") == (bundle / "model.json").read_bytes()
        handler = Path(__file__).parents[3] / "services" / "inference" / "handler.py"
        assert archive.read("handler.py") == handler.read_bytes()
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert manifest["model"] == {
        "modelName": "cancer_detector",
        "serializedFile": "weights.pt",
        "handler": "handler.py",
        "modelVersion": "3",
    }
    assert manifest["runtime"] == "python"
    assert not [p for p in mar.parent.iterdir() if p.name != mar.name], "leftover files"


def test_the_unpacked_archive_imports_its_own_modules_only(mar: Path, tmp_path: Path) -> None:
    """What a TorchServe worker does: model folder first on PYTHONPATH, import handler."""
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(tmp_path)
    script = (
        "import json, sys, handler, services.inference.bundle as b\n"
        "mods = {n: getattr(m, '__file__', None) for n, m in sys.modules.items()"
        " if n == 'services' or n.startswith('services.')}\n"
        "model, config = b.load_bundle(__import__('pathlib').Path('.'))\n"
        "print(json.dumps({'modules': mods, 'T': config.temperature}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["T"] == pytest.approx(1.3)
    files = {name: Path(path) for name, path in result["modules"].items() if path}
    assert files, "no services module was imported"
    outside = [name for name, path in files.items() if tmp_path not in path.parents]
    assert not outside, f"imported from outside the archive: {outside}"
    assert {f"services/{p.relative_to(tmp_path / 'services')}" for p in files.values()} <= set(
        PACKED_MODULES
    )


def test_a_name_override_and_refusing_to_overwrite(bundle: Path, tmp_path: Path) -> None:
    built = build_mar(bundle, tmp_path, model_name="biomarker_tp53", version="7")
    with zipfile.ZipFile(built) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert built.name == "biomarker_tp53.mar"
    assert manifest["model"]["modelName"] == "biomarker_tp53"
    assert manifest["model"]["modelVersion"] == "7"
    with pytest.raises(FailedPrecondition, match="exists"):
        build_mar(bundle, tmp_path, model_name="biomarker_tp53", force=False)
    with pytest.raises(InvalidInput, match="model name"):
        build_mar(bundle, tmp_path, model_name="Bad Name")


def test_a_folder_that_is_not_a_bundle_is_refused(tmp_path: Path, bundle: Path) -> None:
    with pytest.raises(NotFound, match="not a model bundle"):
        build_mar(tmp_path, tmp_path / "out")
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.json").write_text(load_config(bundle).to_json())
    with pytest.raises(InvalidInput, match="weights"):
        build_mar(half, tmp_path / "out")
