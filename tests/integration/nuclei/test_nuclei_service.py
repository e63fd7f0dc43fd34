"""NucleiService over real gRPC on 127.0.0.1, with shards in a file:// object store."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_client import open_channel
from services.common.objectstore import ObjectStore, open_store
from services.common.stubs.histomarker.v1 import common_pb2, nuclei_pb2, nuclei_pb2_grpc
from services.nuclei.features import FEATURE_NAMES
from services.nuclei.pipeline import TABLE_COLUMNS, analyze_patch, decode_labels_tiff
from services.nuclei.server import SERVICE_NAME, NucleiSettings, create
from services.slide.images import read_image
from services.slide.shards import ShardWriter
from services.synth.cohort import generate_cohort

SLIDE = "SLIDE-A"
PREFIX = f"tiles/{SLIDE}/0123456789abcdef"
BACKGROUND = (235, 190, 215)


@dataclass
class Stack:
    stub: nuclei_pb2_grpc.NucleiServiceStub
    channel: grpc.Channel
    store: ObjectStore
    crops: list[np.ndarray]
    shards: list[str]
    members: list[str]


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def _image(rgb: np.ndarray, mpp: float = 0.0) -> common_pb2.Image:
    return common_pb2.Image(data=_png(rgb), format=common_pb2.IMAGE_FORMAT_PNG, mpp=mpp)


def _blank(side: int = 256) -> np.ndarray:
    return np.full((side, side, 3), BACKGROUND, np.uint8)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("nuclei")
    generate_cohort(root / "cohort", n_slides=1, seed=4, preset="tiny", truth_crops=2)
    crops = [read_image(p) for p in sorted((root / "cohort" / "truth").glob("*/nuclei/*.png"))]
    assert len(crops) == 2
    store = open_store((root / "store").as_uri())
    # Three 40x patches in two shards, as TilingService writes them (PNG: lossless).
    writer = ShardWriter(store, PREFIX, "40x-test", image_format="png", patches_per_shard=2)
    for (x, y), rgb in zip([(0, 0), (512, 0), (1024, 512)], [*crops, _blank()], strict=True):
        writer.add(rgb, x=x, y=y)
    rows = writer.close()
    store.put_bytes(f"{PREFIX}/not-a-shard.tar", b"this is not a tar file")
    settings = NucleiSettings(port=0, store_url=(root / "store").as_uri())
    server, port = create(settings)
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        yield Stack(
            nuclei_pb2_grpc.NucleiServiceStub(channel),
            channel,
            store,
            crops,
            sorted({row["shard"] for row in rows}),
            [row["member"] for row in rows],
        )
    finally:
        channel.close()
        server.stop(0).wait()


def _ref(key: str) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(key=key)


def _assert_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if not isinstance(result, nuclei_pb2.SegmentNucleiResponse):
            list(result)
    return info.value


# -- SegmentNuclei ------------------------------------------------------------------


def test_segment_nuclei_returns_labels_nuclei_and_features(stack: Stack) -> None:
    crop = stack.crops[1]
    response = stack.stub.SegmentNuclei(
        nuclei_pb2.SegmentNucleiRequest(image=_image(crop)), timeout=60
    )
    assert response.mpp == 0.25
    assert response.labels.format == common_pb2.IMAGE_FORMAT_TIFF
    assert response.labels.mpp == 0.25
    labels = decode_labels_tiff(response.labels.data)
    assert labels.dtype == np.uint16 and labels.shape == crop.shape[:2]
    present = np.unique(labels[labels > 0])
    assert len(response.nuclei) == len(present) == response.features.nucleus_count > 3
    assert [n.label for n in response.nuclei] == present.tolist()
    # Physical units: a nucleus's area is its pixel count times mpp².
    first = response.nuclei[0]
    assert first.area_um2 == pytest.approx(np.count_nonzero(labels == first.label) * 0.25**2)
    assert first.major_axis_um >= first.minor_axis_um > 0 and first.degree >= 1
    assert labels[round(first.centroid_y_px), round(first.centroid_x_px)] in (0, first.label)
    features = response.features
    assert list(features.names) == list(FEATURE_NAMES) and len(features.values) == 75
    assert not features.few_nuclei
    # The same logic in-process gives the same answer.
    local = analyze_patch(crop, 0.25)
    assert local.features.nucleus_count == features.nucleus_count
    np.testing.assert_allclose(features.values, local.features.values)


def test_each_method_is_served_by_name_and_the_default_is_the_unet(stack: Stack) -> None:
    crop = stack.crops[1]
    labels = {}
    for method in ("", "unet", "phoulady", "otsu"):
        response = stack.stub.SegmentNuclei(
            nuclei_pb2.SegmentNucleiRequest(
                image=_image(crop), params=nuclei_pb2.SegmentationParams(method=method)
            ),
            timeout=60,
        )
        labels[method] = decode_labels_tiff(response.labels.data)
        assert response.features.nucleus_count > 3, method
    np.testing.assert_array_equal(labels[""], labels["unet"])
    assert not np.array_equal(labels["unet"], labels["phoulady"])
    assert not np.array_equal(labels["phoulady"], labels["otsu"])


def test_mpp_is_taken_from_the_request_or_the_image(stack: Stack) -> None:
    crop = stack.crops[0]
    request = nuclei_pb2.SegmentNucleiRequest(image=_image(crop), omit_labels=True, mpp=0.5)
    from_request = stack.stub.SegmentNuclei(request, timeout=60)
    from_image = stack.stub.SegmentNuclei(
        nuclei_pb2.SegmentNucleiRequest(image=_image(crop, mpp=0.5), omit_labels=True), timeout=60
    )
    assert not from_request.HasField("labels")
    assert from_request.mpp == from_image.mpp == 0.5
    assert list(from_request.features.values) == list(from_image.features.values)
    conflict = nuclei_pb2.SegmentNucleiRequest(image=_image(crop, mpp=0.25), mpp=0.5)
    error = _error(stack.stub.SegmentNuclei, conflict, timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "differs from image.mpp" in error.details()


def test_an_all_background_image_is_ok_with_few_nuclei(stack: Stack) -> None:
    response = stack.stub.SegmentNuclei(
        nuclei_pb2.SegmentNucleiRequest(image=_image(_blank())), timeout=30
    )
    assert response.features.nucleus_count == 0 and response.features.few_nuclei
    assert set(response.features.values) == {0.0} and not response.nuclei
    assert not decode_labels_tiff(response.labels.data).any()


def _grey_png() -> bytes:
    return cv2.imencode(".png", np.full((64, 64), 200, np.uint8))[1].tobytes()


@pytest.mark.parametrize(
    ("image", "mpp", "params", "reason"),
    [
        (common_pb2.Image(), 0.0, None, "image is empty"),
        (common_pb2.Image(data=b"GIF89a not really"), 0.0, None, "not a PNG, JPEG or TIFF"),
        (common_pb2.Image(data=_grey_png()), 0.0, None, "mode 'L'"),
        (_image(np.zeros((8, 4100, 3), np.uint8)), 0.0, None, "over 4096 px a side"),
        (_image(np.zeros((4, 64, 3), np.uint8)), 0.0, None, "too small"),
        (_image(_blank(64)), 5.0, None, "outside 0.05-2.0"),
        (_image(_blank(64)), float("nan"), None, "mpp"),
        (_image(_blank(64)), -1.0, None, "mpp"),
        (
            _image(_blank(64)),
            0.0,
            nuclei_pb2.SegmentationParams(min_area_um2=500),
            "min_area_um2 < max_area_um2",
        ),
        (
            _image(_blank(64)),
            0.0,
            nuclei_pb2.SegmentationParams(threshold_step=300),
            "threshold_step",
        ),
        (
            _image(_blank(64)),
            0.0,
            nuclei_pb2.SegmentationParams(method="magic"),
            "unknown nuclei method 'magic'",
        ),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_problem(
    stack: Stack, image: common_pb2.Image, mpp: float, params, reason: str
) -> None:
    request = nuclei_pb2.SegmentNucleiRequest(image=image, mpp=mpp, params=params)
    error = _error(stack.stub.SegmentNuclei, request, timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert reason in error.details()
    _assert_serving(stack.channel)


# -- ExtractFeatures ----------------------------------------------------------------


def test_extract_features_answers_each_image_in_order(stack: Stack) -> None:
    images = [("crop-0", stack.crops[0]), ("blank", _blank()), ("crop-1", stack.crops[1])]
    requests = [
        nuclei_pb2.ExtractFeaturesRequest(patch_id=patch_id, image=_image(rgb))
        for patch_id, rgb in images
    ]
    responses = list(stack.stub.ExtractFeatures(iter(requests), timeout=60))
    assert [r.patch_id for r in responses] == ["crop-0", "blank", "crop-1"]
    for response, (_, rgb) in zip(responses, images, strict=True):
        expected = analyze_patch(rgb, 0.25).features
        assert response.features.nucleus_count == expected.nucleus_count
        assert response.features.few_nuclei == expected.few_nuclei
        assert list(response.features.names) == list(FEATURE_NAMES)
        assert response.mpp == 0.25
    assert responses[1].features.few_nuclei and responses[1].features.nucleus_count == 0


def test_extract_features_names_the_bad_patch_and_keeps_serving(stack: Stack) -> None:
    requests = [
        nuclei_pb2.ExtractFeaturesRequest(patch_id="good", image=_image(_blank(64))),
        nuclei_pb2.ExtractFeaturesRequest(
            patch_id="bad-one", image=common_pb2.Image(data=b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
        ),
    ]
    call = stack.stub.ExtractFeatures(iter(requests), timeout=30)
    first = next(call)
    assert first.patch_id == "good"
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'bad-one'" in info.value.details() and "message 1" in info.value.details()
    changed = [
        nuclei_pb2.ExtractFeaturesRequest(patch_id="a", image=_image(_blank(64))),
        nuclei_pb2.ExtractFeaturesRequest(
            patch_id="b",
            image=_image(_blank(64)),
            params=nuclei_pb2.SegmentationParams(threshold_step=4),
        ),
    ]
    error = _error(stack.stub.ExtractFeatures, iter(changed), timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params differ" in error.details() and "'b'" in error.details()
    _assert_serving(stack.channel)


# -- ExtractFeaturesForShards -------------------------------------------------------


def _table(store: ObjectStore, key: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.get_bytes(key)))


def test_shards_give_one_row_per_patch_with_progress(stack: Stack) -> None:
    key = "runs/test/features.parquet"
    request = nuclei_pb2.ExtractFeaturesForShardsRequest(
        shards=[_ref(shard) for shard in stack.shards], output=_ref(key)
    )
    events = list(stack.stub.ExtractFeaturesForShards(request, timeout=120))
    assert events[-1].HasField("result")
    assert all(e.HasField("progress") for e in events[:-1])
    progress = [e.progress for e in events[:-1]]
    assert progress[0].stage == "download" and progress[-1].stage == "features"
    assert progress[-1].done == progress[-1].total == 3
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    result = events[-1].result
    assert result.table.key == key and result.table.bucket == "histomarker"
    assert result.patch_count == 3 and result.few_nuclei_count == 1
    assert list(result.feature_names) == list(FEATURE_NAMES)

    table = _table(stack.store, key)
    assert list(table.columns) == [*TABLE_COLUMNS, *FEATURE_NAMES]
    assert len(FEATURE_NAMES) == 75
    assert list(table["member"]) == stack.members
    assert set(table["slide_id"]) == {SLIDE}
    assert list(zip(table["x"], table["y"], strict=True)) == [(0, 0), (512, 0), (1024, 512)]
    assert list(table["few_nuclei"]) == [False, False, True]
    assert (table["mpp"] == 0.25).all()
    for (_, row), rgb in zip(table.iterrows(), [*stack.crops, _blank()], strict=True):
        assert row["nucleus_count"] == analyze_patch(rgb, 0.25).features.nucleus_count


def test_single_patches_by_shard_and_member(stack: Stack) -> None:
    key = "runs/test/single.parquet"
    patch = common_pb2.PatchRef(
        slide_id="OTHER", shard=_ref(stack.shards[0]), member=stack.members[1], mpp=0.5
    )
    request = nuclei_pb2.ExtractFeaturesForShardsRequest(patches=[patch, patch], output=_ref(key))
    events = list(stack.stub.ExtractFeaturesForShards(request, timeout=60))
    assert events[-1].result.patch_count == 1
    table = _table(stack.store, key)
    row = table.iloc[0]
    assert (row["slide_id"], row["member"], row["mpp"]) == ("OTHER", stack.members[1], 0.5)
    expected = analyze_patch(stack.crops[1], 0.5).features
    assert row["nucleus_count"] == expected.nucleus_count


@pytest.mark.parametrize(
    ("change", "code", "reason"),
    [
        ({"shards": ["tiles/x/missing.tar"]}, grpc.StatusCode.NOT_FOUND, "missing.tar"),
        ({"shards": [f"{PREFIX}/not-a-shard.tar"]}, grpc.StatusCode.INVALID_ARGUMENT, "tar"),
        ({"member": "9_9.png"}, grpc.StatusCode.NOT_FOUND, "9_9.png"),
        ({"output": "runs/test/out.csv"}, grpc.StatusCode.INVALID_ARGUMENT, ".parquet"),
        ({"output": ""}, grpc.StatusCode.INVALID_ARGUMENT, "output"),
        ({"shards": []}, grpc.StatusCode.INVALID_ARGUMENT, "at least one"),
        ({"mpp": 3.0}, grpc.StatusCode.INVALID_ARGUMENT, "0.05-2.0"),
        ({"bucket": "elsewhere"}, grpc.StatusCode.INVALID_ARGUMENT, "not served here"),
    ],
)
def test_bad_shard_requests_write_nothing(stack: Stack, change: dict, code, reason: str) -> None:
    key = change.get("output", "runs/bad/features.parquet")
    shards = change.get("shards", stack.shards)
    request = nuclei_pb2.ExtractFeaturesForShardsRequest(
        shards=[common_pb2.ObjectRef(bucket=change.get("bucket", ""), key=s) for s in shards],
        output=_ref(key) if key else None,
        mpp=change.get("mpp", 0.0),
    )
    if "member" in change:
        request.ClearField("shards")
        request.patches.add(shard=_ref(stack.shards[0]), member=change["member"])
    error = _error(stack.stub.ExtractFeaturesForShards, request, timeout=60)
    assert error.code() == code, error.details()
    assert reason in error.details()
    assert not list(stack.store.list("runs/bad/")) and not stack.store.exists("runs/test/out.csv")
    _assert_serving(stack.channel)


def test_patch_limit_and_deadline(stack: Stack, tmp_path: Path) -> None:
    settings = NucleiSettings(port=0, store_url=stack.store.url, max_patches_per_call=2)
    server, port = create(settings)
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        stub = nuclei_pb2_grpc.NucleiServiceStub(channel)
        request = nuclei_pb2.ExtractFeaturesForShardsRequest(
            shards=[_ref(shard) for shard in stack.shards], output=_ref("runs/limit/f.parquet")
        )
        error = _error(stub.ExtractFeaturesForShards, request, timeout=60)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "3 patches is over the limit of 2" in error.details()
    finally:
        channel.close()
        server.stop(0).wait()
    request = nuclei_pb2.ExtractFeaturesForShardsRequest(
        shards=[_ref(shard) for shard in stack.shards], output=_ref("runs/late/f.parquet")
    )
    error = _error(stack.stub.ExtractFeaturesForShards, request, timeout=0.1)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not list(stack.store.list("runs/limit/")) and not list(stack.store.list("runs/late/"))
    _assert_serving(stack.channel)
