"""The training pipeline is repeatable: the same cohort, seed and settings give the
same models and the same scores, whatever else the machine is doing.

The same tiny cohort is trained twice from nothing, each time in a process of its
own (another hash seed), into its own object store and on a TorchServe without any
model: once one slide at a time on a quiet machine, once four slides at a time
while two processes burn both cores. The grid is half-overlapping and the models
evaluate with two test-time views, as in the demo. Every stored model's weights,
the cancer scores that chose the CD patches, the biomarker patch scores with their
BD patches, the evaluations and the nucleus features must be the same bytes or
values.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from tiny_cohort import learnable_seed

from flows.training.config import Analysis, ModelTraining, PipelineConfig, Selection, TilingConfig
from services.common.settings import ServiceSettings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17"),
]

SLIDES = 12
SPLIT_SEED = 0
REPO = Path(__file__).resolve().parents[3]
#: Seconds a load process burns at most (the test stops them sooner).
LOAD_LIMIT_S = 600

CONFIG = PipelineConfig(
    split_seed=SPLIT_SEED,
    tiling=TilingConfig(patch_px=128, overlap_px=64, max_patches=16),
    detector=ModelTraining(
        backbone="tiny", input_px=32, epochs=2, batch_size=8, lr=3e-3, val_fraction=0.34
    ),
    biomarker=ModelTraining(
        backbone="tiny",
        input_px=32,
        epochs=1,
        batch_size=8,
        lr=3e-3,
        val_fraction=0.34,
        tta=("rot0", "rot180"),
    ),
    selection=Selection(threshold=0.9, min_patches_per_slide=3, max_patches_per_slide=5),
    analysis=Analysis(folds=2, n_estimators=10, bootstrap=50),
    max_concurrent_slides=1,
)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A tiny cohort, and the TilingService, NucleiService and AnalysisService on one
    file:// root."""
    from services.analysis.server import create as create_analysis
    from services.nuclei.server import create as create_nuclei
    from services.synth.cohort import generate_cohort
    from services.tiling.server import create as create_tiling

    root = tmp_path_factory.mktemp("repeatable")
    generate_cohort(
        root / "cohort", SLIDES, learnable_seed(SLIDES, SPLIT_SEED), "tiny", truth_crops=0
    )
    servers = []
    # One set of services per store: each run writes its own store from nothing.
    targets: dict[str, dict[str, str]] = {}
    for name in ("quiet", "loaded"):
        store_url = (root / name / "store").as_uri()
        targets[name] = {"store_url": store_url}
        for role, create in (
            ("tiling", create_tiling),
            ("nuclei", create_nuclei),
            ("analysis", create_analysis),
        ):
            server, port = create(ServiceSettings(store_url=store_url, port=0))
            server.start()
            servers.append(server)
            targets[name][role] = f"127.0.0.1:{port}"
    try:
        yield {"root": root, "targets": targets}
    finally:
        for server in servers:
            server.stop(0).wait()


def _burners(count: int) -> list[subprocess.Popen[bytes]]:
    """Processes that keep a core busy each (for at most LOAD_LIMIT_S)."""
    code = (
        f"import time\nend = time.monotonic() + {LOAD_LIMIT_S}\nwhile time.monotonic() < end: pass"
    )
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]


def _train(
    services: dict[str, Any], name: str, config: PipelineConfig, hash_seed: int
) -> tuple[Any, Path]:
    """One pipeline run into the ``name`` store, in a process of its own, on a
    TorchServe of its own."""
    from prefect.settings import PREFECT_API_URL

    from flows.training.pipeline import PipelineResult
    from services.inference.torchserve import TorchServe, TorchServeConfig

    root: Path = services["root"] / name
    targets = services["targets"][name]
    config_ts = TorchServeConfig.with_free_ports(root / "model-store", root / "torchserve")
    (root / "config.json").write_text(config.model_dump_json())
    with TorchServe(config_ts) as torchserve:
        assert torchserve.keys is not None
        env = {
            **os.environ,
            "PYTHONHASHSEED": str(hash_seed),
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "support")]),
            "PREFECT_API_URL": str(PREFECT_API_URL.value()),
            "HISTOMARKER_STORE_URL": targets["store_url"],
            "HISTOMARKER_TILING_TARGET": targets["tiling"],
            "HISTOMARKER_NUCLEI_TARGET": targets["nuclei"],
            "HISTOMARKER_ANALYSIS_TARGET": targets["analysis"],
            "HISTOMARKER_TORCHSERVE_GRPC_TARGET": torchserve.grpc_inference_target,
            "HISTOMARKER_TORCHSERVE_MANAGEMENT_URL": torchserve.management_url,
            "HISTOMARKER_TORCHSERVE_MODEL_STORE": str(config_ts.model_store),
            "HISTOMARKER_TORCHSERVE_INFERENCE_TOKEN": torchserve.keys.inference,
            "HISTOMARKER_TORCHSERVE_MANAGEMENT_TOKEN": torchserve.keys.management,
            "HISTOMARKER_WORK_DIR": str(root / "work"),
        }
        command = [
            sys.executable,
            str(REPO / "tests" / "support" / "run_pipeline.py"),
            str(services["root"] / "cohort" / "manifest.csv"),
            "tiny",
            str(root / "config.json"),
            str(root / "result.json"),
        ]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    result = PipelineResult.model_validate_json((root / "result.json").read_text())
    return result, root / "store"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(path.read_bytes()))


def _outputs(result: Any, store: Path) -> dict[str, Any]:
    """What a run decided, keyed by a name that does not depend on the run id."""
    run = store / "runs" / result.run_id
    found: dict[str, Any] = {}
    models = [result.detector.model, *(r.model for r in result.biomarkers.results)]
    for model in models:
        found[f"{model.name} version"] = model.version
        found[f"{model.name} weights"] = _sha256(store / model.prefix / "weights.pt")
        config = json.loads((store / model.prefix / "model.json").read_text())
        found[f"{model.name} temperature"] = config.get("temperature")
    for path in sorted(run.glob("cancer_scores/*.parquet")):
        found[f"cancer scores {path.stem}"] = _table(path)
    for path in sorted(run.glob("biomarkers/*/patch_scores.parquet")):
        found[f"patch scores {path.parent.name}"] = _table(path)
    for path in sorted(run.glob("biomarkers/*/evaluation.json")):
        evaluation = json.loads(path.read_text())
        evaluation.pop("model", None)
        found[f"evaluation {path.parent.name}"] = evaluation
    for path in sorted(run.glob("analysis/*/patch_sets.parquet")):
        found[f"features {path.parent.name}"] = _table(path)
    return found


def _differences(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    differ = sorted(set(first) ^ set(second))
    for key in sorted(set(first) & set(second)):
        a, b = first[key], second[key]
        if isinstance(a, pd.DataFrame):
            if not a.reset_index(drop=True).equals(b.reset_index(drop=True)):
                differ.append(key)
        elif a != b:
            differ.append(key)
    return differ


def test_the_same_seed_gives_the_same_models_and_scores_under_load(
    prefect_home: Path, services: dict[str, Any]
) -> None:
    quiet, quiet_store = _train(services, "quiet", CONFIG, hash_seed=1)
    burners = _burners(2)
    try:
        loaded_config = CONFIG.model_copy(update={"max_concurrent_slides": 4})
        loaded, loaded_store = _train(services, "loaded", loaded_config, hash_seed=2)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()

    first, second = _outputs(quiet, quiet_store), _outputs(loaded, loaded_store)
    assert not quiet.biomarkers.skipped
    assert len([k for k in first if k.endswith(" weights")]) == 7
    assert any(k.startswith("features ") for k in first)
    assert _differences(first, second) == []
