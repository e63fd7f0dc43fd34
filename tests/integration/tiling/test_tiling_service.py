"""TilingService over real gRPC on 127.0.0.1, with slides in a real object store."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pandas as pd
import pytest

from services.common.grpc_client import open_channel
from services.common.objectstore import open_store
from services.common.qc_messages import qc_from_proto
from services.common.stubs.histomarker.v1 import common_pb2, tiling_pb2, tiling_pb2_grpc
from services.slide.grid import TissueRule
from services.slide.highres import quadrant_origins
from services.slide.qc import ARTIFACTS
from services.slide.reader import open_slide
from services.slide.stain import builtin_reference, get_normalizer
from services.synth.cohort import generate_cohort
from services.tiling.client import normalize_batches, tile_slide
from services.tiling.pipeline import load_slide_stain, load_tissue_rule
from services.tiling.server import TilingSettings, create, stain_to_proto


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Path, Path]]:
    root = tmp_path_factory.mktemp("tiling")
    generate_cohort(root / "cohort", n_slides=1, seed=2, preset="tiny", truth_crops=0)
    slide = next((root / "cohort" / "slides").glob("*.tiff"))
    store = open_store((root / "store").as_uri())
    store.put_file(f"slides/{slide.name}", slide)
    settings = TilingSettings(
        port=0, store_url=(root / "store").as_uri(), slide_cache_dir=root / "cache"
    )
    server, port = create(settings)
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        yield tiling_pb2_grpc.TilingServiceStub(channel), slide, root / "store"
    finally:
        channel.close()
        server.stop(0).wait()


def _slide_ref(name: str) -> common_pb2.SlideRef:
    return common_pb2.SlideRef(object=common_pb2.ObjectRef(key=f"slides/{name}"))


def test_slide_info_with_thumbnail(stack) -> None:
    stub, slide, _ = stack
    info = stub.GetSlideInfo(
        tiling_pb2.GetSlideInfoRequest(slide=_slide_ref(slide.name), thumbnail_max_px=256),
        timeout=30,
    )
    assert (info.width, info.height) == (4096, 3072)
    assert info.resolution.mpp_x == pytest.approx(0.25)
    assert info.resolution.magnification == pytest.approx(40)
    assert len(info.levels) >= 4 and info.has_native_40x
    assert info.slide_id == slide.name.split(".")[0]
    thumb = cv2.imdecode(np.frombuffer(info.thumbnail.data, np.uint8), cv2.IMREAD_COLOR)
    assert max(thumb.shape[:2]) == 256


def test_tile_slide_stream_reports_progress_then_result(stack) -> None:
    stub, slide, store_dir = stack
    request = tiling_pb2.TileSlideRequest(
        slide=_slide_ref(slide.name), params=tiling_pb2.TilingParams(magnification=20)
    )
    events = list(stub.TileSlide(request, timeout=120))
    progress = [e.progress for e in events if e.HasField("progress")]
    results = [e.result for e in events if e.HasField("result")]
    assert len(results) == 1 and events[-1].HasField("result")
    result = results[0]
    assert result.patch_count > 0 and progress[-1].done == progress[-1].total == result.patch_count
    # The QC metrics travel with the result: the tests' floor (tests/conftest.py) passes
    # the tiny slide; every artifact class has its share.
    qc = qc_from_proto(result.qc)
    assert qc["verdict"] in {"pass", "warn"} and 0.2 < qc["tissue_area_mm2"] < 0.8
    assert 0 < qc["usable_area_mm2"] <= qc["tissue_area_mm2"]
    assert set(qc["artifact_fractions"]) == set(ARTIFACTS)
    store = open_store(store_dir.as_uri())
    recorded = json.loads(store.get_bytes(result.grid.key.replace("grid.parquet", "tile.json")))
    assert recorded["result"]["qc"] == qc
    assert store.exists(result.grid.key) and result.grid.key.startswith("tiles/")
    assert all(store.exists(shard.key) for shard in result.shards)
    seen: list = []
    again = tile_slide(
        stub,
        tiling_pb2.TileSlideRequest(slide=request.slide, params=request.params),
        timeout_s=60,
        on_progress=seen.append,
    )
    assert again.reused and again.params_hash == result.params_hash and not seen


def test_normalize_patches_streams_one_answer_per_message(stack) -> None:
    stub, slide, _ = stack
    with open_slide(slide) as reader:
        patch = reader.read_region(1024, 1024, 1, 256, 256)
        reference = reader.read_region(0, 1024, 1, 512, 512)
    normalizer = get_normalizer("macenko").fit(reference)
    _, png = cv2.imencode(".png", cv2.cvtColor(patch, cv2.COLOR_RGB2BGR))
    image = common_pb2.Image(data=png.tobytes(), format=common_pb2.IMAGE_FORMAT_PNG)
    first = tiling_pb2.NormalizePatchesRequest(
        images=[image] * 2,
        method=tiling_pb2.STAIN_METHOD_MACENKO,
        reference_matrix=stain_to_proto(normalizer.target),
    )
    later = [
        tiling_pb2.NormalizePatchesRequest(
            images=[image], output_format=common_pb2.IMAGE_FORMAT_JPEG
        )
    ] * 3
    responses = list(normalize_batches(stub, [first, *later], timeout_s=30))
    assert [len(r.images) for r in responses] == [2, 1, 1, 1]
    assert len(responses[0].source_matrices) == 2 and len(responses[0].reference.hematoxylin) == 3
    assert responses[1].images[0].format == common_pb2.IMAGE_FORMAT_JPEG
    out = cv2.imdecode(np.frombuffer(responses[0].images[0].data, np.uint8), cv2.IMREAD_COLOR)
    expected = normalizer.transform(patch, normalizer.stain_matrix_of(patch))
    assert out.shape == (256, 256, 3)
    assert np.abs(cv2.cvtColor(out, cv2.COLOR_BGR2RGB).astype(int) - expected).max() == 0


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([tiling_pb2.NormalizePatchesRequest(images=[common_pb2.Image(data=b"x")])], "images[0]"),
        ("bad image", "message 1: images[0]"),
        ("other reference", "message 1: reference differs"),
        ("no images", "message 1: images: at least one"),
    ],
)
def test_normalize_patches_refuses_bad_messages(stack, messages, reason: str) -> None:
    stub, slide, _ = stack
    with open_slide(slide) as reader:
        patch = reader.read_region(1024, 1024, 1, 128, 128)
    matrix = stain_to_proto(get_normalizer("macenko").fit(patch).target)
    _, png = cv2.imencode(".png", patch)
    good = tiling_pb2.NormalizePatchesRequest(
        images=[common_pb2.Image(data=png.tobytes())], reference_matrix=matrix
    )
    second = {
        "bad image": tiling_pb2.NormalizePatchesRequest(images=[common_pb2.Image(data=b"nope")]),
        "other reference": tiling_pb2.NormalizePatchesRequest(
            images=good.images, reference_object=common_pb2.ObjectRef(key="refs/x/stain.json")
        ),
        "no images": tiling_pb2.NormalizePatchesRequest(),
    }
    if isinstance(messages, str):
        messages = [good, second[messages]]
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for response in normalize_batches(stub, messages, timeout_s=30):
            received.append(response)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in info.value.details()
    assert len(received) == len(messages) - 1  # the good first message was answered
    # The service stays up.
    assert next(iter(normalize_batches(stub, [good], timeout_s=30))).images


def test_bad_slides_are_refused_and_the_service_stays_up(stack) -> None:
    stub, slide, store_dir = stack
    store = open_store(store_dir.as_uri())
    store.put_bytes("slides/garbage.svs", b"\x00" * 1000)
    for key, code in (
        ("slides/garbage.svs", grpc.StatusCode.INVALID_ARGUMENT),
        ("slides/missing.svs", grpc.StatusCode.NOT_FOUND),
    ):
        request = tiling_pb2.TileSlideRequest(
            slide=common_pb2.SlideRef(object=common_pb2.ObjectRef(key=key))
        )
        with pytest.raises(grpc.RpcError) as info:
            tile_slide(stub, request, timeout_s=30)
        assert info.value.code() == code, info.value.details()
    assert not any(i.key.startswith("tiles/garbage") for i in store.list("tiles/"))
    info = stub.GetSlideInfo(tiling_pb2.GetSlideInfoRequest(slide=_slide_ref(slide.name)))
    assert info.width == 4096


def test_fit_a_stored_reference_then_tile_with_it(stack) -> None:
    stub, slide, store_dir = stack
    with open_slide(slide) as reader:
        reference = reader.read_region(0, 1024, 1, 512, 512)
    _, png = cv2.imencode(".png", cv2.cvtColor(reference, cv2.COLOR_RGB2BGR))
    fitted = stub.FitStainReference(
        tiling_pb2.FitStainReferenceRequest(
            images=[common_pb2.Image(data=png.tobytes(), format=common_pb2.IMAGE_FORMAT_PNG)],
            method=tiling_pb2.STAIN_METHOD_VAHADANE,
            output=common_pb2.ObjectRef(key="references/lab-a/stain.json"),
        ),
        timeout=60,
    )
    assert len(fitted.reference.hematoxylin) == 3 and fitted.stored.key
    assert len(fitted.stored.sha256) == 64
    params = tiling_pb2.TilingParams(
        magnification=20,
        stain_method=tiling_pb2.STAIN_METHOD_VAHADANE,
        stain_reference=fitted.stored,
    )
    result = tile_slide(
        stub, tiling_pb2.TileSlideRequest(slide=_slide_ref(slide.name), params=params), 120
    )
    assert result.patch_count > 0 and result.stain.key.endswith("stain.json")
    plain = tile_slide(
        stub,
        tiling_pb2.TileSlideRequest(
            slide=_slide_ref(slide.name), params=tiling_pb2.TilingParams(magnification=20)
        ),
        120,
    )
    assert plain.params_hash != result.params_hash
    store = open_store(store_dir.as_uri())
    assert store.exists(result.stain.key)


def _tiled_at_20x(stub, slide: Path):
    """TileSlide of the slide at 20x with the default (Vahadane) normalization."""
    request = tiling_pb2.TileSlideRequest(
        slide=_slide_ref(slide.name), params=tiling_pb2.TilingParams(magnification=20)
    )
    return tile_slide(stub, request, 120)


def test_upsample_to_40x_native_and_upsampled(stack) -> None:
    stub, slide, store_dir = stack
    tiled = _tiled_at_20x(stub, slide)
    store = open_store(store_dir.as_uri())
    grid = pd.read_parquet(io.BytesIO(store.get_bytes(tiled.grid.key))).head(2)
    rule = load_tissue_rule(store, f"tiles/{tiled.slide_id}/{tiled.params_hash}")
    assert rule is not None
    windows = _kept_windows(rule, [(int(r.x), int(r.y), int(r.width)) for r in grid.itertuples()])
    patches = [
        common_pb2.PatchRef(
            x=int(r.x), y=int(r.y), width=int(r.width), height=int(r.height), mpp=0.5, size_px=512
        )
        for r in grid.itertuples()
    ]
    for policy, source in (
        (common_pb2.HIGH_RES_POLICY_AUTO, common_pb2.HIGH_RES_SOURCE_NATIVE),
        (common_pb2.HIGH_RES_POLICY_UPSAMPLE, common_pb2.HIGH_RES_SOURCE_UPSAMPLED),
    ):
        response = stub.UpsampleTo40x(
            tiling_pb2.UpsampleTo40xRequest(
                slide=_slide_ref(slide.name),
                params_hash=tiled.params_hash,
                patches=patches,
                policy=policy,
            ),
            timeout=120,
        )
        assert response.source == source and response.patch_count == len(windows)
        assert response.resolution.mpp_x == pytest.approx(0.25)
        index = pd.read_parquet(io.BytesIO(store.get_bytes(response.index.key)))
        assert _parents(index) == windows
        assert set(index["source"]) == {"native" if source == 1 else "upsampled"}
        first = index.iloc[0]
        with tarfile.open(fileobj=io.BytesIO(store.get_bytes(first["shard"]))) as tar:
            data = tar.extractfile(first["member"]).read()
        quad = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), 1), cv2.COLOR_BGR2RGB)
        with open_slide(slide) as reader:
            native = reader.read_region(int(first["x"]), int(first["y"]), 0, 512, 512)
        # Normalized as the tiling's 20x patches were (what the PredictionService does
        # to the 40x patches it scores): never the slide's own colours.
        stain = load_slide_stain(store, f"tiles/{tiled.slide_id}/{tiled.params_hash}")
        assert stain is not None
        expected = stain.transform(native)
        error = np.abs(quad.astype(int) - expected).mean()
        # Native quadrants are the 40x pixels; upsampled ones only approximate them.
        assert error < (3 if source == common_pb2.HIGH_RES_SOURCE_NATIVE else 25)
        assert np.abs(quad.astype(int) - native).mean() > error + 5
    with pytest.raises(grpc.RpcError) as info:
        stub.UpsampleTo40x(
            tiling_pb2.UpsampleTo40xRequest(
                slide=_slide_ref(slide.name), params_hash="../../x", patches=patches
            ),
            timeout=30,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_overlapping_20x_patches_store_each_40x_window_once(stack) -> None:
    stub, slide, store_dir = stack
    tiled = _tiled_at_20x(stub, slide)
    store = open_store(store_dir.as_uri())
    first = pd.read_parquet(io.BytesIO(store.get_bytes(tiled.grid.key))).iloc[0]
    x, y, side = int(first.x), int(first.y), int(first.width)
    # Two patches half a patch apart share two quadrants; the third repeats the first.
    patches = [
        common_pb2.PatchRef(x=px, y=y, width=side, height=side, mpp=0.5, size_px=512)
        for px in (x, x + side // 2, x)
    ]
    response = stub.UpsampleTo40x(
        tiling_pb2.UpsampleTo40xRequest(
            slide=_slide_ref(slide.name), params_hash=tiled.params_hash, patches=patches
        ),
        timeout=120,
    )
    rule = load_tissue_rule(store, f"tiles/{tiled.slide_id}/{tiled.params_hash}")
    assert rule is not None
    expected = _kept_windows(rule, [(x, y, side), (x + side // 2, y, side)])
    assert response.patch_count == len(expected) <= 6
    index = pd.read_parquet(io.BytesIO(store.get_bytes(response.index.key)))
    assert not index.duplicated(["x", "y"]).any()
    assert _parents(index) == expected  # a shared window under the first patch


def _kept_windows(
    rule: TissueRule, patches: list[tuple[int, int, int]]
) -> dict[tuple[int, int], tuple[int, int]]:
    """The quadrants of these 20x patches with enough tissue, each under the first."""
    windows: dict[tuple[int, int], tuple[int, int]] = {}
    for x, y, side in patches:
        origins = quadrant_origins(x, y, side)
        for origin, keep in zip(origins, rule.keeps(origins, side / 2), strict=True):
            if keep:
                windows.setdefault(origin, (x, y))
    return windows


def _parents(index: pd.DataFrame) -> dict[tuple[int, int], tuple[int, int]]:
    columns = [index[c].astype(int) for c in ("x", "y", "parent_x", "parent_y")]
    return {(x, y): (px, py) for x, y, px, py in zip(*columns, strict=True)}


def test_40x_windows_without_enough_tissue_are_left_out(stack) -> None:
    """A 20x patch at the tissue's edge passes the grid's 50% rule with a quadrant of
    glass: that quadrant is not stored (checked on the stored mask, pixel by pixel)."""
    stub, slide, store_dir = stack
    tiled = _tiled_at_20x(stub, slide)
    store = open_store(store_dir.as_uri())
    prefix = f"tiles/{tiled.slide_id}/{tiled.params_hash}"
    grid = pd.read_parquet(io.BytesIO(store.get_bytes(tiled.grid.key)))
    edge = grid.sort_values("tissue_fraction").head(6)
    patches = [
        common_pb2.PatchRef(
            x=int(r.x), y=int(r.y), width=int(r.width), height=int(r.height), mpp=0.5, size_px=512
        )
        for r in edge.itertuples()
    ]
    response = stub.UpsampleTo40x(
        tiling_pb2.UpsampleTo40xRequest(
            slide=_slide_ref(slide.name), params_hash=tiled.params_hash, patches=patches
        ),
        timeout=120,
    )
    index = pd.read_parquet(io.BytesIO(store.get_bytes(response.index.key)))
    tissue, blur, fold = (
        cv2.imdecode(np.frombuffer(store.get_bytes(f"{prefix}/{name}.png"), np.uint8), 0) > 0
        for name in ("tissue", "blur", "fold")
    )
    usable = tissue & ~blur & ~fold  # the grid's own rule (blur and folds left out)
    step = json.loads(store.get_bytes(f"{prefix}/tissue.json"))["downsample"]

    def coverage(x: int, y: int, side: int) -> float:
        rows = slice(round(y / step), round((y + side) / step))
        cols = slice(round(x / step), round((x + side) / step))
        return float(usable[rows, cols].sum()) / (side / step) ** 2

    stored = set(zip(index["x"].astype(int), index["y"].astype(int), strict=True))
    dropped = 0
    for r in edge.itertuples():
        for qx, qy in quadrant_origins(int(r.x), int(r.y), int(r.width)):
            if (qx, qy) in stored:
                assert coverage(qx, qy, int(r.width) // 2) >= 0.45
            else:
                dropped += 1
                assert coverage(qx, qy, int(r.width) // 2) < 0.5
    assert dropped > 0 and response.patch_count == len(index) >= len(edge)


def test_native_policy_needs_a_40x_level(tmp_path: Path) -> None:
    from services.common.errors import FailedPrecondition
    from services.slide.highres import choose_source

    path = tmp_path / "twenty.png"
    cv2.imwrite(str(path), np.full((600, 600, 3), 200, np.uint8))
    with open_slide(path, mpp=0.5) as reader:
        assert choose_source(reader, "auto").value == "upsampled"
        with pytest.raises(FailedPrecondition, match="no native 40x"):
            choose_source(reader, "native")


def test_segment_tissue_stores_masks_and_reuses_them(stack) -> None:
    stub, slide, store_dir = stack
    request = tiling_pb2.SegmentTissueRequest(
        slide=_slide_ref(slide.name), params=tiling_pb2.TissueParams(mask_mpp=2.0)
    )
    first = stub.SegmentTissue(request, timeout=60)
    assert not first.reused and first.tissue.downsample == pytest.approx(8)
    assert 0.2 < first.tissue.tissue_fraction < 0.8
    kinds = [a.kind for a in first.tissue.artifacts]
    # One pen mask per ink colour: green, blue, black, red and other.
    pens = [a.mask.key for a in first.tissue.artifacts if a.kind == tiling_pb2.ARTIFACT_KIND_PEN]
    assert kinds.count(tiling_pb2.ARTIFACT_KIND_PEN) == 5
    assert [key.rsplit("/", 1)[1] for key in pens] == [
        f"pen_{colour}.png" for colour in ("green", "blue", "black", "red", "other")
    ]
    store = open_store(store_dir.as_uri())
    assert all(store.exists(a.mask.key) for a in first.tissue.artifacts)
    mask = cv2.imdecode(
        np.frombuffer(store.get_bytes(first.tissue.mask.key), np.uint8), cv2.IMREAD_GRAYSCALE
    )
    assert mask.shape == (3072 // 8, 4096 // 8)
    second = stub.SegmentTissue(request, timeout=60)
    assert second.reused and second.params_hash == first.params_hash


def test_tiling_options_are_applied(stack) -> None:
    stub, slide, store_dir = stack
    ref = _slide_ref(slide.name)
    full = tile_slide(
        stub,
        tiling_pb2.TileSlideRequest(
            slide=ref, params=tiling_pb2.TilingParams(magnification=20, patch_size_px=256)
        ),
        120,
    )
    # No reference given: the built-in one (stain.json records it).
    store = open_store(store_dir.as_uri())
    assert full.stain.key and "builtin" in store.get_bytes(full.stain.key).decode()
    sampled = tile_slide(
        stub,
        tiling_pb2.TileSlideRequest(
            slide=ref,
            params=tiling_pb2.TilingParams(
                magnification=20, patch_size_px=256, max_patches=3, seed=1
            ),
        ),
        120,
    )
    assert full.patch_count > 3 and sampled.patch_count == 3
    assert sampled.params_hash != full.params_hash
    with pytest.raises(grpc.RpcError) as info:
        tile_slide(
            stub,
            tiling_pb2.TileSlideRequest(
                slide=ref,
                params=tiling_pb2.TilingParams(
                    tissue=tiling_pb2.TissueParams(ignore_artifacts=[tiling_pb2.ARTIFACT_KIND_PEN])
                ),
            ),
            30,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pen" in info.value.details()
    keep_blur = tile_slide(
        stub,
        tiling_pb2.TileSlideRequest(
            slide=ref,
            params=tiling_pb2.TilingParams(
                magnification=20,
                patch_size_px=256,
                tissue=tiling_pb2.TissueParams(
                    ignore_artifacts=[tiling_pb2.ARTIFACT_KIND_BLUR, tiling_pb2.ARTIFACT_KIND_FOLD]
                ),
            ),
        ),
        120,
    )
    assert keep_blur.patch_count >= full.patch_count


def test_normalize_patches_defaults_to_the_builtin_reference(stack) -> None:
    stub, slide, _ = stack
    with open_slide(slide) as reader:
        patch = reader.read_region(1024, 1024, 1, 128, 128)
    _, png = cv2.imencode(".png", cv2.cvtColor(patch, cv2.COLOR_RGB2BGR))
    request = tiling_pb2.NormalizePatchesRequest(images=[common_pb2.Image(data=png.tobytes())])
    (response,) = normalize_batches(stub, [request], timeout_s=30)
    expected = builtin_reference()
    assert list(response.reference.hematoxylin) == pytest.approx(expected.matrix[0].tolist())
    assert len(response.images) == 1
