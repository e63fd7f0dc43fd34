"""Every bad input of the corpus (tests/support/badinputs.py) against every RPC and
command that takes it, over real gRPC on 127.0.0.1.

For each: INVALID_ARGUMENT or NOT_FOUND (RESOURCE_EXHAUSTED where the design says
so) with a reason naming the problem; the service still SERVING afterwards; and
nothing written - the store's folder (objects, checksum records and in-flight
temporary files alike) is the same before and after, and no upload folder is left
in the prediction service's cache. The commands exit 2 with one readable line.
Where the design converts an input instead (a greyscale or CMYK picture given to
stain normalization), the call must succeed.

Malformed messages and out-of-range fields are fuzzed per service in
``tests/integration/*/test_*_fuzz.py``; this module covers the files, keys and ids.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from badinputs import (
    BAD_KEYS,
    BAD_SLIDE_IDS,
    BadInput,
    he_rgb,
    image_corpus,
    png_bytes,
    slide_corpus,
    table_corpus,
    tiled_slide,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tiny_models import untrained_scorer

from services import cli
from services.analysis.server import AnalysisSettings
from services.analysis.server import create as create_analysis
from services.common.grpc_client import open_channel
from services.common.grpc_server import HistomarkerServer, ServiceBinding, create_server
from services.common.objectstore import ObjectStore, open_store
from services.common.stubs.histomarker.v1 import (
    analysis_pb2,
    analysis_pb2_grpc,
    common_pb2,
    nuclei_pb2,
    nuclei_pb2_grpc,
    prediction_pb2,
    prediction_pb2_grpc,
    tiling_pb2,
    tiling_pb2_grpc,
)
from services.nuclei.server import NucleiSettings
from services.nuclei.server import create as create_nuclei
from services.prediction.server import PredictionServicer, PredictionSettings
from services.tiling.server import TilingSettings
from services.tiling.server import create as create_tiling

pytestmark = pytest.mark.slow

IMAGES = image_corpus()
SLIDES = slide_corpus()
TABLES = table_corpus()
PARAMS_HASH = "0123456789abcdef"
GOOD_SLIDE_KEY = "slides/GOOD-1.tiff"
#: A key outside ASCII is fine; the slide id derived from it is not (it names keys).
UNICODE_SLIDE_KEY = "slides/Schnitt-Ünïcødé-1.tiff"
TIMEOUT_S = 30.0

#: Pictures the design converts rather than refuses, per RPC or command.
CONVERTED = {
    # One rule for every picture (services/common/images.py): 8-bit colour only,
    # the alpha channel dropped; greyscale, 16-bit and CMYK refused.
    "NormalizePatches": {"rgba"},
    "ExtractFeaturesForShards": {"rgba"},
    "SegmentNuclei": {"rgba"},
    "ExtractFeatures": {"rgba"},
    "cli nuclei": {"rgba"},
}

#: Words naming the rule each bad key breaks.
KEY_REASONS = {
    "dotdot": "'..' segment",
    "dotdot_inside": "'..' segment",
    "absolute": "relative",
    "dot_segment": "'.' segment",
    "backslash": "backslash",
    "nul": "control character",
    "empty_segment": "empty segment",
}


@dataclass
class Stack:
    root: Path
    store: ObjectStore
    cache: Path
    channels: dict[str, grpc.Channel]
    prediction_target: str
    tiling: tiling_pb2_grpc.TilingServiceStub
    nuclei: nuclei_pb2_grpc.NucleiServiceStub
    analysis: analysis_pb2_grpc.AnalysisServiceStub
    prediction: prediction_pb2_grpc.PredictionServiceStub


SERVICE_OF = {
    "tiling": "histomarker.v1.TilingService",
    "nuclei": "histomarker.v1.NucleiService",
    "analysis": "histomarker.v1.AnalysisService",
    "prediction": "histomarker.v1.PredictionService",
}


def _shard(member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _shard_key(name: str) -> str:
    return f"tiles/BAD-1/{PARAMS_HASH}/shards/{name}.tar"


def _seed_store(store: ObjectStore) -> None:
    for item in SLIDES:
        store.put_bytes(f"slides/{item.filename}", item.data)
    for item in IMAGES:
        store.put_bytes(_shard_key(item.name), _shard("0_0.png", item.data))
    store.put_bytes(_shard_key("empty-shard"), b"")
    store.put_bytes(_shard_key("garbage-shard"), b"not a tar file" * 40)
    for item in TABLES:
        store.put_bytes(f"tables/{item.filename}", item.data)
    good = tiled_slide()
    store.put_bytes(GOOD_SLIDE_KEY, good)
    store.put_bytes(UNICODE_SLIDE_KEY, good)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("bad-inputs")
    store = open_store((root / "store").as_uri())
    _seed_store(store)
    common = {"host": "127.0.0.1", "port": 0, "store_url": store.url}
    servers: list[HistomarkerServer] = []
    channels: dict[str, grpc.Channel] = {}
    try:
        for name, server_and_port in (
            ("tiling", create_tiling(TilingSettings(**common, slide_cache_dir=root / "tc"))),
            ("nuclei", create_nuclei(NucleiSettings(**common))),
            ("analysis", create_analysis(AnalysisSettings(**common))),
        ):
            server, port = server_and_port
            server.start()
            servers.append(server)
            channels[name] = open_channel(f"127.0.0.1:{port}")
        scorer = untrained_scorer(root / "bundles")
        settings = PredictionSettings(
            **common,
            slide_cache_dir=root / "prediction-cache",
            max_upload_mb=1,
            max_concurrent_predictions=1,
            max_queued_predictions=1,
        )
        servicer = PredictionServicer(settings, scorer=scorer, registry=scorer)  # type: ignore[arg-type]
        binding = ServiceBinding(
            SERVICE_OF["prediction"],
            servicer,
            prediction_pb2_grpc.add_PredictionServiceServicer_to_server,
        )
        server, port = create_server(settings, [binding])
        server.start()
        servers.append(server)
        channels["prediction"] = open_channel(f"127.0.0.1:{port}")
        yield Stack(
            root=root,
            store=store,
            cache=root / "prediction-cache",
            channels=channels,
            prediction_target=f"127.0.0.1:{port}",
            tiling=tiling_pb2_grpc.TilingServiceStub(channels["tiling"]),
            nuclei=nuclei_pb2_grpc.NucleiServiceStub(channels["nuclei"]),
            analysis=analysis_pb2_grpc.AnalysisServiceStub(channels["analysis"]),
            prediction=prediction_pb2_grpc.PredictionServiceStub(channels["prediction"]),
        )
    finally:
        for channel in channels.values():
            channel.close()
        for server in servers:
            server.stop(0).wait()


# -- checks ------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (hidden bookkeeping too) with its size and mtime."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
    }


def _call(function: Callable[[], Any]) -> grpc.RpcError | None:
    """Run a call to its end (streams drained); its error, or None if it succeeded."""
    try:
        result = function()
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as error:
        return error
    return None


def _assert_serving(stack: Stack, service: str) -> None:
    health = health_pb2_grpc.HealthStub(stack.channels[service])
    answer = health.Check(
        health_pb2.HealthCheckRequest(service=SERVICE_OF[service]), timeout=TIMEOUT_S
    )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _assert_refused(
    stack: Stack,
    service: str,
    function: Callable[[], Any],
    reasons: tuple[str, ...],
    codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.INVALID_ARGUMENT,),
) -> str:
    """``function`` is refused with one of ``codes``, a reason holding one of
    ``reasons``, nothing written, and the service still serving. Returns the reason."""
    before = _tree(stack.root / "store")
    error = _call(function)
    assert error is not None, "the bad input was accepted"
    details = error.details() or ""
    assert error.code() in codes, f"{error.code()}: {details}"
    assert any(word.lower() in details.lower() for word in reasons), details
    assert "Traceback" not in details and "\n" not in details
    assert _tree(stack.root / "store") == before, "the refused call wrote to the store"
    assert not list(stack.cache.glob("upload-*")), "an upload folder was left behind"
    _assert_serving(stack, service)
    return details


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(argv)
    return code, capsys.readouterr().err


def _assert_cli_refused(
    argv: list[str], reasons: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_cli(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"histomarker {argv[0]}: "), err
    assert any(word.lower() in err.lower() for word in reasons), err
    assert "internal error" not in err


# -- requests ----------------------------------------------------------------------------


def _image(data: bytes) -> common_pb2.Image:
    return common_pb2.Image(data=data, format=common_pb2.IMAGE_FORMAT_PNG)


def _image_calls(stack: Stack, item: BadInput) -> dict[str, Callable[[], Any]]:
    shard = common_pb2.ObjectRef(key=_shard_key(item.name))
    output = common_pb2.ObjectRef(key=f"runs/bad/{item.name}.parquet")
    return {
        "NormalizePatches": lambda: stack.tiling.NormalizePatches(
            iter([tiling_pb2.NormalizePatchesRequest(images=[_image(item.data)])]),
            timeout=TIMEOUT_S,
        ),
        "SegmentNuclei": lambda: stack.nuclei.SegmentNuclei(
            nuclei_pb2.SegmentNucleiRequest(image=_image(item.data), mpp=0.25),
            timeout=TIMEOUT_S,
        ),
        "ExtractFeatures": lambda: stack.nuclei.ExtractFeatures(
            iter([nuclei_pb2.ExtractFeaturesRequest(patch_id="p", image=_image(item.data))]),
            timeout=TIMEOUT_S,
        ),
        "ExtractFeaturesForShards": lambda: stack.nuclei.ExtractFeaturesForShards(
            nuclei_pb2.ExtractFeaturesForShardsRequest(
                patches=[common_pb2.PatchRef(shard=shard, member="0_0.png", mpp=0.25)],
                output=output,
            ),
            timeout=TIMEOUT_S,
        ),
    }


def _slide_ref(key: str, slide_id: str = "") -> common_pb2.SlideRef:
    return common_pb2.SlideRef(slide_id=slide_id, object=common_pb2.ObjectRef(key=key))


def _options() -> prediction_pb2.PredictionOptions:
    return prediction_pb2.PredictionOptions(biomarkers=[common_pb2.BIOMARKER_TP53])


def _upload(stack: Stack, filename: str, data: bytes, slide_id: str = "") -> Any:
    size, sha256 = len(data), hashlib.sha256(data).hexdigest()
    messages = [
        prediction_pb2.UploadAndPredictRequest(
            metadata=prediction_pb2.UploadMetadata(
                filename=filename,
                size_bytes=size,
                sha256=sha256,
                slide_id=slide_id,
                options=_options(),
            )
        )
    ]
    messages += [
        prediction_pb2.UploadAndPredictRequest(chunk=data[i : i + 4096])
        for i in range(0, len(data), 4096)
    ]
    return stack.prediction.UploadAndPredict(iter(messages), timeout=TIMEOUT_S)


def _slide_calls(
    stack: Stack, key: str, slide_id: str = ""
) -> dict[str, tuple[str, Callable[[], Any]]]:
    """The RPCs taking a stored slide: name -> (service, call)."""
    slide = _slide_ref(key, slide_id)
    patch = common_pb2.PatchRef(x=0, y=0, width=256, height=256, mpp=0.5, size_px=128)
    return {
        "TileSlide": (
            "tiling",
            lambda: stack.tiling.TileSlide(
                tiling_pb2.TileSlideRequest(
                    slide=slide, params=tiling_pb2.TilingParams(patch_size_px=128)
                ),
                timeout=TIMEOUT_S,
            ),
        ),
        "UpsampleTo40x": (
            "tiling",
            lambda: stack.tiling.UpsampleTo40x(
                tiling_pb2.UpsampleTo40xRequest(
                    slide=slide, params_hash=PARAMS_HASH, patches=[patch]
                ),
                timeout=TIMEOUT_S,
            ),
        ),
        "PredictSlide": (
            "prediction",
            lambda: stack.prediction.PredictSlide(
                prediction_pb2.PredictSlideRequest(slide=slide, options=_options()),
                timeout=TIMEOUT_S,
            ),
        ),
    }


# -- pictures ----------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", list(CONVERTED)[:4])
@pytest.mark.parametrize("item", IMAGES, ids=lambda item: item.name)
def test_bad_picture_to_each_patch_rpc(stack: Stack, item: BadInput, rpc: str) -> None:
    call = _image_calls(stack, item)[rpc]
    service = "tiling" if rpc == "NormalizePatches" else "nuclei"
    if item.name in CONVERTED[rpc]:
        assert _call(call) is None
        _assert_serving(stack, service)
        return
    _assert_refused(stack, service, call, item.reason)


@pytest.mark.parametrize("shard", ["empty-shard", "garbage-shard"])
def test_shard_that_is_no_tar_is_refused(stack: Stack, shard: str) -> None:
    request = nuclei_pb2.ExtractFeaturesForShardsRequest(
        shards=[common_pb2.ObjectRef(key=_shard_key(shard))],
        output=common_pb2.ObjectRef(key="runs/bad/shard.parquet"),
    )
    _assert_refused(
        stack,
        "nuclei",
        lambda: stack.nuclei.ExtractFeaturesForShards(request, timeout=TIMEOUT_S),
        ("not a tar shard",),
    )


@pytest.mark.parametrize("item", IMAGES, ids=lambda item: item.name)
def test_bad_picture_to_the_nuclei_command(
    item: BadInput, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / item.filename
    path.write_bytes(item.data)
    labels = tmp_path / "labels.tif"
    argv = ["nuclei", str(path), "--labels", str(labels)]
    if item.name in CONVERTED["cli nuclei"]:
        code, err = _run_cli(argv, capsys)
        assert code == 0, err
        return
    _assert_cli_refused(argv, item.reason, capsys)
    assert not labels.exists()


# -- slides ------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", ["TileSlide", "UpsampleTo40x", "PredictSlide"])
@pytest.mark.parametrize("item", SLIDES, ids=lambda item: item.name)
def test_bad_stored_slide_to_each_slide_rpc(stack: Stack, item: BadInput, rpc: str) -> None:
    service, call = _slide_calls(stack, f"slides/{item.filename}")[rpc]
    details = _assert_refused(stack, service, call, item.reason)
    assert item.filename in details  # the reason names the slide


@pytest.mark.parametrize("item", SLIDES, ids=lambda item: item.name)
def test_bad_slide_upload_is_refused_and_not_stored(stack: Stack, item: BadInput) -> None:
    reasons = ("size_bytes",) if not item.data else item.reason
    # The corpus is seeded under its file name; the upload would store slides/{id}.{ext}.
    stack.store.delete(f"slides/{item.filename}")
    try:
        _assert_refused(
            stack, "prediction", lambda: _upload(stack, item.filename, item.data), reasons
        )
        assert not stack.store.exists(f"slides/{item.filename}")
    finally:
        stack.store.put_bytes(f"slides/{item.filename}", item.data)


def test_upload_over_the_limit_is_resource_exhausted(stack: Stack) -> None:
    def oversize() -> Any:
        meta = prediction_pb2.UploadMetadata(
            filename="BIG-1.svs", size_bytes=(1 << 20) + 1, sha256="0" * 64, options=_options()
        )
        request = prediction_pb2.UploadAndPredictRequest(metadata=meta)
        return stack.prediction.UploadAndPredict(iter([request]), timeout=TIMEOUT_S)

    _assert_refused(
        stack, "prediction", oversize, ("exceeds the limit",), (grpc.StatusCode.RESOURCE_EXHAUSTED,)
    )


@pytest.mark.parametrize("filename", ["slide.png", "slide", "slide.svs.exe", "slide.txt"])
def test_upload_with_a_wrong_extension_is_refused(stack: Stack, filename: str) -> None:
    data = png_bytes(he_rgb())
    _assert_refused(stack, "prediction", lambda: _upload(stack, filename, data), ("extension",))


@pytest.mark.parametrize("item", SLIDES, ids=lambda item: item.name)
def test_bad_slide_to_the_tile_command(
    item: BadInput, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / item.filename
    path.write_bytes(item.data)
    out = tmp_path / "out"
    _assert_cli_refused(["tile", str(path), str(out)], item.reason, capsys)
    assert not out.exists()


@pytest.mark.parametrize("item", SLIDES, ids=lambda item: item.name)
def test_bad_slide_to_the_predict_command(
    stack: Stack, item: BadInput, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / item.filename
    path.write_bytes(item.data)
    before = _tree(stack.root / "store")
    argv = ["predict", str(path), "--target", stack.prediction_target, "--biomarker", "tp53"]
    reasons = ("size_bytes",) if not item.data else item.reason
    # --json: no upload progress bar on stderr, so the error is its only line.
    _assert_cli_refused([*argv, "--timeout", "30", "--json"], reasons, capsys)
    assert _tree(stack.root / "store") == before
    _assert_serving(stack, "prediction")


def test_the_installed_command_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "EMPTY-1.svs"
    path.write_bytes(b"")
    command = Path(sys.executable).with_name("histomarker")
    done = subprocess.run(
        [str(command), "tile", str(path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "histomarker tile: EMPTY-1.svs: empty file (0 bytes)"


@pytest.mark.parametrize("rpc", ["TileSlide", "UpsampleTo40x", "PredictSlide"])
def test_missing_slide_is_not_found(stack: Stack, rpc: str) -> None:
    service, call = _slide_calls(stack, "slides/NOPE-1.svs")[rpc]
    _assert_refused(
        stack, service, call, ("slides/NOPE-1.svs", "NOPE-1.svs"), (grpc.StatusCode.NOT_FOUND,)
    )


# -- keys and slide ids ------------------------------------------------------------------


def _keyed_calls(stack: Stack, key: str) -> dict[str, tuple[str, Callable[[], Any]]]:
    """Every RPC taking an object reference, with ``key`` in it."""
    ref = common_pb2.ObjectRef(key=key)
    calls = {name: value for name, value in _slide_calls(stack, key).items()}
    calls["NormalizePatches"] = (
        "tiling",
        lambda: stack.tiling.NormalizePatches(
            iter(
                [
                    tiling_pb2.NormalizePatchesRequest(
                        images=[_image(png_bytes(he_rgb()))], reference_object=ref
                    )
                ]
            ),
            timeout=TIMEOUT_S,
        ),
    )
    calls["ExtractFeaturesForShards.shards"] = (
        "nuclei",
        lambda: stack.nuclei.ExtractFeaturesForShards(
            nuclei_pb2.ExtractFeaturesForShardsRequest(
                shards=[ref], output=common_pb2.ObjectRef(key="runs/bad/x.parquet")
            ),
            timeout=TIMEOUT_S,
        ),
    )
    calls["ExtractFeaturesForShards.output"] = (
        "nuclei",
        lambda: stack.nuclei.ExtractFeaturesForShards(
            nuclei_pb2.ExtractFeaturesForShardsRequest(
                shards=[common_pb2.ObjectRef(key=_shard_key("rgba"))], output=ref
            ),
            timeout=TIMEOUT_S,
        ),
    )
    calls["ComputeMetrics.table"] = (
        "analysis",
        lambda: stack.analysis.ComputeMetrics(
            analysis_pb2.ComputeMetricsRequest(table=ref), timeout=TIMEOUT_S
        ),
    )
    calls["AggregateSlides.output"] = (
        "analysis",
        lambda: stack.analysis.AggregateSlides(
            analysis_pb2.AggregateSlidesRequest(
                scores=analysis_pb2.PatchScores(slide_ids=["A"], probabilities=[0.5]),
                output=ref,
            ),
            timeout=TIMEOUT_S,
        ),
    )
    return calls


KEYED_RPCS = [
    "TileSlide",
    "UpsampleTo40x",
    "PredictSlide",
    "NormalizePatches",
    "ExtractFeaturesForShards.shards",
    "ExtractFeaturesForShards.output",
    "ComputeMetrics.table",
    "AggregateSlides.output",
]


@pytest.mark.parametrize("rpc", KEYED_RPCS)
@pytest.mark.parametrize("kind", list(BAD_KEYS))
def test_bad_object_key_is_refused_by_every_rpc(stack: Stack, kind: str, rpc: str) -> None:
    service, call = _keyed_calls(stack, BAD_KEYS[kind])[rpc]
    details = _assert_refused(stack, service, call, (KEY_REASONS[kind],))
    assert "object key" in details


@pytest.mark.parametrize("kind", list(BAD_KEYS))
def test_upload_file_name_with_a_path_is_refused(stack: Stack, kind: str) -> None:
    name = BAD_KEYS[kind]
    data = tiled_slide()
    _assert_refused(
        stack, "prediction", lambda: _upload(stack, name, data), ("bare file name", "extension")
    )


@pytest.mark.parametrize("rpc", ["TileSlide", "UpsampleTo40x", "PredictSlide", "upload"])
@pytest.mark.parametrize("kind", list(BAD_SLIDE_IDS))
def test_bad_slide_id_is_refused(stack: Stack, kind: str, rpc: str) -> None:
    slide_id = BAD_SLIDE_IDS[kind]
    if rpc == "upload":
        service = "prediction"

        def call() -> Any:
            return _upload(stack, "GOOD-2.tiff", tiled_slide(), slide_id=slide_id)
    else:
        service, call = _slide_calls(stack, GOOD_SLIDE_KEY, slide_id)[rpc]
    _assert_refused(stack, service, call, ("slide id",))


@pytest.mark.parametrize("rpc", ["TileSlide", "PredictSlide"])
def test_non_ascii_key_needs_an_explicit_slide_id(stack: Stack, rpc: str) -> None:
    service, call = _slide_calls(stack, UNICODE_SLIDE_KEY)[rpc]
    _assert_refused(stack, service, call, ("slide id",))


def test_non_ascii_key_with_a_slide_id_is_tiled(stack: Stack) -> None:
    _, call = _slide_calls(stack, UNICODE_SLIDE_KEY, "SCHNITT-1")["TileSlide"]
    responses = list(call())
    result = responses[-1].result
    # A pink square is no tissue to the mask; that the key was served is the point.
    assert result.slide_id == "SCHNITT-1" and len(result.params_hash) == 16


def test_non_ascii_upload_name_is_refused_unless_given_an_id(stack: Stack) -> None:
    data = tiled_slide()
    _assert_refused(
        stack, "prediction", lambda: _upload(stack, "Schnitt-Ünï-1.tiff", data), ("slide id",)
    )


# -- tables ------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", ["ComputeMetrics", "AggregateSlides"])
@pytest.mark.parametrize("item", TABLES, ids=lambda item: item.name)
def test_bad_table_to_each_analysis_rpc(stack: Stack, item: BadInput, rpc: str) -> None:
    table = common_pb2.ObjectRef(key=f"tables/{item.filename}")
    output = common_pb2.ObjectRef(key=f"runs/bad/{item.name}.json")

    def call() -> Any:
        if rpc == "ComputeMetrics":
            request = analysis_pb2.ComputeMetricsRequest(
                table=table, bootstrap_samples=10, output=output
            )
            return stack.analysis.ComputeMetrics(request, timeout=TIMEOUT_S)
        request = analysis_pb2.AggregateSlidesRequest(
            table=table, output=common_pb2.ObjectRef(key=f"runs/bad/{item.name}.parquet")
        )
        return stack.analysis.AggregateSlides(request, timeout=TIMEOUT_S)

    details = _assert_refused(stack, "analysis", call, item.reason)
    assert "/tmp" not in details  # the service's temporary paths stay on the server


@pytest.mark.parametrize("item", TABLES, ids=lambda item: item.name)
def test_bad_table_to_the_metrics_command(
    item: BadInput, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / item.filename
    path.write_bytes(item.data)
    _assert_cli_refused(["metrics", str(path), "--bootstrap", "10"], item.reason, capsys)


def test_missing_table_is_not_found(stack: Stack) -> None:
    request = analysis_pb2.ComputeMetricsRequest(table=common_pb2.ObjectRef(key="tables/no.csv"))
    _assert_refused(
        stack,
        "analysis",
        lambda: stack.analysis.ComputeMetrics(request, timeout=TIMEOUT_S),
        ("tables/no.csv",),
        (grpc.StatusCode.NOT_FOUND,),
    )


def test_corpus_files_are_small() -> None:
    """The corpus stays cheap to generate and to send."""
    for item in [*IMAGES, *SLIDES, *TABLES]:
        assert len(item.data) < 256 * 1024, item.name
