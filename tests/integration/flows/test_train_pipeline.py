"""The training pipeline end to end: a tiny synthetic cohort, real TilingService,
NucleiService and AnalysisService on 127.0.0.1, a real TorchServe, Prefect's test
harness.

The first run is pointed at a wrong NucleiService address (the TilingService's, which
answers UNIMPLEMENTED: not retried) and fails in ``analyze_features``, after every
model is trained; the second run, with the right address, takes every finished task
from the cache and only computes the features, the analysis and the report.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from prefect_harness import latest_artifacts
from tiny_cohort import learnable_seed

from flows.training.config import Analysis, ModelTraining, PipelineConfig, Selection, TilingConfig
from services.common.settings import ServiceSettings
from services.common.vocabulary import BIOMARKERS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17"),
]

SLIDES = 12
SPLIT_SEED = 0


CONFIG = PipelineConfig(
    split_seed=SPLIT_SEED,
    tiling=TilingConfig(patch_px=128, max_patches=16),
    detector=ModelTraining(
        backbone="tiny", input_px=32, epochs=2, batch_size=8, lr=3e-3, val_fraction=0.34
    ),
    biomarker=ModelTraining(
        backbone="tiny", input_px=32, epochs=1, batch_size=8, lr=3e-3, val_fraction=0.34
    ),
    selection=Selection(threshold=0.9, min_patches_per_slide=3, max_patches_per_slide=5),
    analysis=Analysis(folds=2, n_estimators=10, bootstrap=50),
    biomarker_epochs={"pik3ca": 2},
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A cohort, a file:// store, TilingService, NucleiService, AnalysisService and
    TorchServe."""
    from services.analysis.server import create as create_analysis
    from services.inference.torchserve import TorchServe, TorchServeConfig
    from services.nuclei.server import create as create_nuclei
    from services.synth.cohort import generate_cohort
    from services.tiling.server import create as create_tiling

    root = tmp_path_factory.mktemp("pipeline")
    generate_cohort(
        root / "cohort", SLIDES, learnable_seed(SLIDES, SPLIT_SEED), "tiny", truth_crops=0
    )
    store_url = (root / "store").as_uri()
    servers = {}
    for name, create in (
        ("tiling", create_tiling),
        ("nuclei", create_nuclei),
        ("analysis", create_analysis),
    ):
        server, port = create(ServiceSettings(store_url=store_url, port=0))
        server.start()
        servers[name] = (server, f"127.0.0.1:{port}")
    config = TorchServeConfig.with_free_ports(root / "model-store", root / "torchserve")
    torchserve = TorchServe(config).start()
    try:
        assert torchserve.keys is not None
        yield {
            "root": root,
            "store_url": store_url,
            "tiling": servers["tiling"][1],
            "nuclei": servers["nuclei"][1],
            "torchserve": torchserve,
            "env": {
                "HISTOMARKER_STORE_URL": store_url,
                "HISTOMARKER_TILING_TARGET": servers["tiling"][1],
                "HISTOMARKER_NUCLEI_TARGET": servers["nuclei"][1],
                "HISTOMARKER_ANALYSIS_TARGET": servers["analysis"][1],
                "HISTOMARKER_TORCHSERVE_GRPC_TARGET": torchserve.grpc_inference_target,
                "HISTOMARKER_TORCHSERVE_MANAGEMENT_URL": torchserve.management_url,
                "HISTOMARKER_TORCHSERVE_MODEL_STORE": str(config.model_store),
                "HISTOMARKER_TORCHSERVE_INFERENCE_TOKEN": torchserve.keys.inference,
                "HISTOMARKER_TORCHSERVE_MANAGEMENT_TOKEN": torchserve.keys.management,
                "HISTOMARKER_WORK_DIR": str(root / "work"),
            },
        }
    finally:
        torchserve.stop()
        for server, _ in servers.values():
            server.stop(0).wait()


def _latest_states(names: list[str]) -> dict[str, str]:
    """The state name of the latest task run of each name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=names)),
            sort=TaskRunSort.EXPECTED_START_TIME_DESC,
            limit=200,
        )
    latest: dict[str, str] = {}
    for run in runs:
        if run.state is not None:
            latest.setdefault(run.name, run.state.name)
    return latest


def _settled_states(names: list[str], expected: str, timeout_s: float = 60.0) -> dict[str, str]:
    """The latest states of ``names`` once each is ``expected``, or as they are after
    ``timeout_s``: the server records task-run states from events, a little after
    the flow has returned (longer on a busy machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = _latest_states(names)
        settled = set(states) == set(names) and set(states.values()) == {expected}
        if settled or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def test_a_failed_run_resumes_from_its_cached_tasks_and_serves_every_model(
    prefect_home: Path, stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.training.pipeline import train_pipeline
    from services.common.objectstore import open_store
    from services.inference.serving_records import read_record

    for name, value in stack["env"].items():
        monkeypatch.setenv(name, value)
    manifest = str(stack["root"] / "cohort" / "manifest.csv")

    # Run 1: the NucleiService address is wrong; everything before the features runs.
    monkeypatch.setenv("HISTOMARKER_NUCLEI_TARGET", stack["tiling"])
    state = train_pipeline(manifest, "tiny", CONFIG, return_state=True)
    assert state.is_failed()
    model_tasks = ["train-cancer_detector", *(f"train-biomarker_{b}" for b in BIOMARKERS)]
    states = _settled_states(model_tasks, "Completed")
    assert set(states.values()) == {"Completed"}, states

    # Run 2: the right address; the finished tasks come from the cache.
    monkeypatch.setenv("HISTOMARKER_NUCLEI_TARGET", stack["nuclei"])
    result = train_pipeline(manifest, "tiny", CONFIG)
    states = _settled_states([*model_tasks, "tile-" + result.detector.split.biomarker[0]], "Cached")
    assert set(states.values()) == {"Cached"}, states
    features = _settled_states(
        [f"nuclei-{s}" for s in result.detector.split.biomarker], "Completed"
    )
    assert set(features.values()) == {"Completed"}, features

    # Every model is stored and served with READY workers.
    assert not result.biomarkers.skipped
    torchserve = stack["torchserve"]
    models = [result.detector.model, *(r.model for r in result.biomarkers.results)]
    assert {m.name for m in models} == {
        "cancer_detector",
        *(f"biomarker_{b}" for b in BIOMARKERS),
    }
    store = open_store(stack["store_url"])
    for model in models:
        description = torchserve.describe(model.name)
        assert description["modelVersion"] == model.version
        assert [w["status"] for w in description["workers"]] == ["READY"]
        for name in ("weights.pt", "model.json", "metrics.json", f"{model.name}.mar"):
            assert store.exists(f"{model.prefix}/{name}"), (model.prefix, name)
        # Recorded as served, so that TorchServe gets it back after a restart.
        record = read_record(store, model.name)
        assert record is not None and record.version == model.version, model.name
        assert record.current.archive_key == model.archive_key
        assert record.current.source == "train_pipeline"
    # PIK3CA trained its own epochs (biomarker_epochs), the others the shared ones.
    epochs = {
        m.name: json.loads(store.get_bytes(f"{m.prefix}/metrics.json"))["epochs"] for m in models
    }
    assert epochs == {
        "cancer_detector": 2,
        "biomarker_pik3ca": 2,
        **{f"biomarker_{b}": 1 for b in BIOMARKERS if b != "pik3ca"},
    }

    # TTA metrics at patch and slide level, BD and CD feature tables, the report.
    prefix = f"runs/{result.run_id}"
    for biomarker in result.biomarkers.results:
        evaluation = json.loads(store.get_bytes(biomarker.evaluation_key))
        assert evaluation["tta"] and {"patch_level", "slide_level"} <= set(evaluation)
        key = f"{prefix}/analysis/{biomarker.biomarker}/patch_sets.parquet"
        sets = pd.read_parquet(io.BytesIO(store.get_bytes(key)))
        assert "CD" in set(sets["patch_set"])
        assert sets["morph.area.mean"].notna().all()
        assert len(sets[sets["patch_set"] == "BD"]) <= biomarker.bd_patches
    report = store.get_bytes(result.analysis.report_key).decode()
    assert report.startswith("<!DOCTYPE html>") and "Discrimination" in report
    assert result.analysis.report_key == f"{prefix}/report/report.html"

    # The tables and the report's link are recorded as Prefect artifacts.
    keys = [
        "cancer-detector",
        "cancer-discriminative-patches",
        "biomarker-models",
        "training-report",
        "training-run",
    ]
    artifacts = latest_artifacts(keys)
    assert sorted(artifacts) == sorted(keys)
    assert result.analysis.report_key in artifacts["training-report"]
    assert f"Training run `{result.run_id}`" in artifacts["training-run"]
    detector_rows = json.loads(artifacts["cancer-detector"])
    assert [(r["model"], r["version"]) for r in detector_rows] == [
        ("cancer_detector", result.detector.model.version)
    ]
    biomarker_rows = json.loads(artifacts["biomarker-models"])
    assert sorted(r["biomarker"] for r in biomarker_rows) == sorted(BIOMARKERS)
