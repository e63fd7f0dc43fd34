"""Fuzzing every AnalysisService RPC over real gRPC: arbitrary messages and raw bytes.

Whatever arrives — tables of the wrong kind, NaN and infinite numbers, unknown enum
values, extreme counts and seeds — the answer is OK or a clear client-side status
(never INTERNAL or UNKNOWN), the reason is readable, and the service keeps serving.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator

import grpc
import numpy as np
import pandas as pd
import pytest
from hypothesis import strategies as st
from PIL import Image
from protofuzz import (
    check_arbitrary_requests,
    check_unparsable_bytes,
    messages,
    mutations,
    raw_call,
    status_of,
)

from services.analysis.server import AnalysisSettings, create
from services.common.grpc_client import open_channel
from services.common.objectstore import ObjectStore, open_store
from services.common.stubs.histomarker.v1 import analysis_pb2, common_pb2
from services.nuclei.features import FEATURE_NAMES

SERVICE = analysis_pb2.DESCRIPTOR.services_by_name["AnalysisService"]
#: Statuses a bad request may get: each names the caller's mistake.
PATCHES = "runs/f/patches.csv"
FEATURES = "runs/f/features.parquet"
MANIFEST = "cohorts/f/manifest.csv"
COVARIATES = "runs/f/covariates.parquet"
ABLATION = "runs/f/ablation.csv"
GRID = "tiles/f/grid.csv"
THUMBNAIL = "tiles/f/thumbnail.png"
SHARD = "tiles/f/shards/40x-00000.tar"
KEYS = (PATCHES, FEATURES, MANIFEST, COVARIATES, ABLATION, GRID, THUMBNAIL, SHARD, "runs/none.csv")


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(side).integers(90, 250, (side, side, 3), np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _put(store: ObjectStore, key: str, table: pd.DataFrame) -> None:
    if key.endswith(".parquet"):
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        store.put_bytes(key, buffer.getvalue())
    else:
        store.put_bytes(key, table.to_csv(index=False).encode())


def _seed(store: ObjectStore) -> None:
    rng = np.random.default_rng(1)
    slides = [f"S{i}" for i in range(6)]
    patches = pd.DataFrame(
        {
            "slide_id": np.repeat(slides, 3),
            "label": np.repeat([i % 2 for i in range(6)], 3),
            "probability": rng.uniform(0, 1, 18),
        }
    )
    _put(store, PATCHES, patches)
    features = pd.DataFrame(rng.normal(0, 1, (24, len(FEATURE_NAMES))), columns=FEATURE_NAMES)
    features.insert(0, "slide_id", np.repeat(slides, 4))
    features.insert(1, "few_nuclei", False)
    _put(store, FEATURES, features)
    _put(
        store,
        MANIFEST,
        pd.DataFrame({"slide_id": slides, "patient_id": slides, "tp53": [0, 1] * 3}),
    )
    _put(
        store,
        COVARIATES,
        pd.DataFrame({"group": [0, 1] * 6, "value": rng.normal(0, 1, 12)}),
    )
    _put(
        store,
        ABLATION,
        pd.DataFrame(
            {
                "biomarker": ["tp53"],
                "patch_set": ["BD"],
                "group": ["all"],
                "n_features": [75],
                "auprc": [0.7],
                "ci_low": [0.6],
                "ci_high": [0.8],
                "prevalence": [0.5],
                "folds": [2],
                "note": [""],
            }
        ),
    )
    _put(
        store,
        GRID,
        pd.DataFrame(
            {
                "x": [0, 512],
                "y": [0, 0],
                "width": [512] * 2,
                "height": [512] * 2,
                "probability": [0.2, 0.9],
            }
        ),
    )
    store.put_bytes(THUMBNAIL, _png(16))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        data = _png(8)
        info = tarfile.TarInfo("p0.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    store.put_bytes(SHARD, buffer.getvalue())


def _valid_requests() -> dict[str, object]:
    """One valid request per RPC, the seeds the mutation fuzzing starts from."""
    ref = common_pb2.ObjectRef
    return {
        "ComputeMetrics": analysis_pb2.ComputeMetricsRequest(
            table=ref(key=PATCHES), bootstrap_samples=5
        ),
        "AggregateSlides": analysis_pb2.AggregateSlidesRequest(
            scores=analysis_pb2.PatchScores(slide_ids=["a", "b"], probabilities=[0.1, 0.2])
        ),
        "RunFeatureAblation": analysis_pb2.RunFeatureAblationRequest(
            biomarker=common_pb2.BIOMARKER_TP53,
            bd_features=ref(key=FEATURES),
            manifest=ref(key=MANIFEST),
            groups=[analysis_pb2.FEATURE_GROUP_INTENSITY],
            tree_count=3,
            folds=2,
        ),
        "CompareGroups": analysis_pb2.CompareGroupsRequest(
            table=analysis_pb2.GroupTable(table=ref(key=COVARIATES), group_column="group")
        ),
        "BuildReport": analysis_pb2.BuildReportRequest(
            output_prefix="runs/f/report",
            ablation=ref(key=ABLATION),
            montages=[
                analysis_pb2.ReportMontage(
                    biomarker=common_pb2.BIOMARKER_TP53,
                    patches=[
                        analysis_pb2.MontagePatch(
                            patch=common_pb2.PatchRef(shard=ref(key=SHARD), member="p0.png")
                        )
                    ],
                )
            ],
            heatmaps=[
                analysis_pb2.ReportHeatmap(
                    biomarker=common_pb2.BIOMARKER_TP53,
                    patches=ref(key=GRID),
                    thumbnail=ref(key=THUMBNAIL),
                    downsample=64,
                )
            ],
        ),
    }


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    root = tmp_path_factory.mktemp("analysis-fuzz")
    _seed(open_store((root / "store").as_uri()))
    server, port = create(AnalysisSettings(port=0, store_url=(root / "store").as_uri()))
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        server.stop(0).wait()


def test_the_valid_seeds_succeed(service: grpc.Channel) -> None:
    for name, request in _valid_requests().items():
        call = raw_call(service, SERVICE.methods_by_name[name])
        assert status_of(call, [request.SerializeToString()], 10.0) == (grpc.StatusCode.OK, ""), (
            name
        )


@pytest.mark.slow
@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
def test_arbitrary_messages_get_a_clear_answer(service: grpc.Channel, method_name: str) -> None:
    method = SERVICE.methods_by_name[method_name]
    valid = _valid_requests()[method_name]
    request = st.one_of(
        messages(method.input_type, strings=KEYS, blobs=(_png(8),)),
        mutations(valid, strings=KEYS, blobs=(_png(8),)),
        mutations(valid, strings=KEYS, blobs=(_png(8),)),
    )
    check_arbitrary_requests(service, method, st.lists(request, min_size=1, max_size=1), 30)


@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
def test_unparsable_bytes_are_invalid_argument(service: grpc.Channel, method_name: str) -> None:
    check_unparsable_bytes(service, SERVICE.methods_by_name[method_name], 30)
