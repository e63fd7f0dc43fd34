"""predict_batch end to end: two slides in the inbox, a real PredictionService on a
real TorchServe with tiny models trained once here, Prefect's test harness.

The first batch predicts both slides (a summary table with both, heatmaps stored);
the second finds their records and skips them, writing no table.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from prefect_harness import latest_artifacts
from tiny_models import ALL_MODELS, publish_models, train_tiny, training_cohort

from services.common.objectstore import ObjectStore, open_store
from services.common.vocabulary import BIOMARKERS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17"),
]


@pytest.fixture(scope="module")
def prediction(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Tiny models trained once, on TorchServe; PredictionService; two inbox slides."""
    from services.inference.torchserve import TorchServe, TorchServeConfig
    from services.prediction.server import PredictionSettings, create
    from services.synth.cohort import generate_cohort

    root = tmp_path_factory.mktemp("predict-batch")
    store = open_store((root / "store").as_uri())
    manifest = training_cohort(store, 4)
    bundles = {n: train_tiny(store, manifest, n, root / "train" / n) for n in ALL_MODELS}
    model_store = root / "model-store"
    mars = publish_models(store, bundles, model_store)

    generate_cohort(root / "cohort", 2, seed=5, preset="tiny", truth_crops=0)
    slides = pd.read_csv(root / "cohort" / "manifest.csv")
    inbox = {}
    for index, path in enumerate(slides["slide_path"]):
        source = root / "cohort" / path
        key = f"inbox/NEW-{index}{source.suffix}"
        store.put_file(key, source)
        inbox[f"NEW-{index}"] = key
    store.put_bytes("inbox/README.txt", b"not a slide")

    config = TorchServeConfig.with_free_ports(model_store, root / "torchserve")
    torchserve = TorchServe(config).start()
    try:
        with ThreadPoolExecutor(len(mars)) as pool:
            list(pool.map(lambda m: torchserve.register(m, initial_workers=1), mars.values()))
        settings = PredictionSettings(
            port=0,
            store_url=store.url,
            slide_cache_dir=root / "slide-cache",
            torchserve_grpc_target=torchserve.grpc_inference_target,
            torchserve_management_url=torchserve.management_url,
            torchserve_key_file=config.work_dir / "key_file.json",
            batch_size=8,
            max_in_flight=2,
        )
        server, port = create(settings)
        server.start()
        try:
            yield {
                "store": store,
                "inbox": inbox,
                "env": {
                    "HISTOMARKER_STORE_URL": store.url,
                    "HISTOMARKER_PREDICTION_TARGET": f"127.0.0.1:{port}",
                    "HISTOMARKER_WORK_DIR": str(root / "work"),
                },
            }
        finally:
            server.stop(0).wait()
    finally:
        torchserve.stop()


def test_two_inbox_slides_are_predicted_once_then_skipped(
    prefect_home: Path, prediction: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.batch.predict import BatchOptions, predict_batch

    for name, value in prediction["env"].items():
        monkeypatch.setenv(name, value)
    store: ObjectStore = prediction["store"]
    # Keep every tissue patch: the tiny detector was not trained on these slides.
    options = BatchOptions(cancer_confidence=0.0)

    first = predict_batch("inbox/", options)
    assert [o.slide_id for o in first.outcomes] == sorted(prediction["inbox"])
    assert {o.status for o in first.outcomes} == {"predicted"}, first.outcomes
    assert first.table_key == f"runs/predictions/batches/{first.batch_id}.parquet"
    table = pd.read_parquet(io.BytesIO(store.get_bytes(first.table_key)))
    assert sorted(table["slide_id"]) == sorted(prediction["inbox"])
    assert set(table["status"]) == {"predicted"} and set(table["prediction_status"]) == {"ok"}
    assert set(table["qc_verdict"]) <= {"pass", "warn"} and (table["usable_area_mm2"] > 0).all()
    for biomarker in BIOMARKERS:
        assert table[f"{biomarker}_probability"].between(0, 1).all()
        assert set(table[f"{biomarker}_call"]) <= {"positive", "negative"}
        for key in table[f"{biomarker}_heatmap_key"]:
            assert key.endswith(f"heatmap_{biomarker}.png") and store.exists(key)
    for key in table["prediction_key"]:
        assert json.loads(store.get_bytes(key))["status"] == "ok"
    batch = json.loads(latest_artifacts(["prediction-batch"])["prediction-batch"])
    assert sorted(row["slide_id"] for row in batch) == sorted(prediction["inbox"])

    second = predict_batch("inbox/", options)
    assert {o.status for o in second.outcomes} == {"skipped"}
    assert second.table_key == ""
    before = {o.slide_id: o.biomarkers for o in first.outcomes}
    assert {o.slide_id: o.biomarkers for o in second.outcomes} == before
