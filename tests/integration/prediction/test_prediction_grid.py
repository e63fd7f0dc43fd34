"""The PredictionService tiles new slides on the grid the cancer detector was trained on.

The detector's ``model.json`` records the overlap of its 20x training grid
(``grid_overlap_px``); the service predicts on that grid unless its
``grid_overlap_px`` setting says otherwise. The service runs in this process over
real gRPC, with the seven models as tiny untrained networks scored locally (their
probabilities do not matter here: the cancer threshold 0 keeps every tissue patch);
the slide is a synthetic ``tiny`` WSI (4096x3072 px at 0.25 µm/px).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pandas as pd
import pydantic
import pytest
from tiny_models import untrained_scorer

from services.common.grpc_client import open_channel
from services.common.grpc_server import ServiceBinding, create_server
from services.common.objectstore import ObjectStore, open_store
from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2, prediction_pb2_grpc
from services.prediction.pipeline import PredictionParams
from services.prediction.server import SERVICE_NAME, PredictionServicer, PredictionSettings
from services.slide.grid import GridParams, TissueRule, footprint_px, patch_grid
from services.slide.highres import quadrant_origins
from services.slide.reader import open_slide
from services.slide.tissue import compute_masks
from services.synth.cohort import generate_cohort

SLIDE_KEY = "slides/GRID-1.tiff"


@dataclass
class Slide:
    """The stored slide and its 20x tissue grids by overlap (px at 20x)."""

    store: ObjectStore
    root: Path
    grids: dict[int, pd.DataFrame]
    footprint_px: float
    tissue: TissueRule


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Slide:
    root = tmp_path_factory.mktemp("prediction-grid")
    store = open_store((root / "store").as_uri())
    generate_cohort(root / "cohort", 2, seed=3, preset="tiny", truth_crops=0)
    manifest = pd.read_csv(root / "cohort" / "manifest.csv")
    path = root / "cohort" / manifest[manifest["kind"] == "cancer"].iloc[0]["slide_path"]
    store.put_file(SLIDE_KEY, path)
    # The grids as the service lays them: its tissue masks, 512 px patches at 20x.
    params = PredictionParams()
    with open_slide(path) as reader:
        masks = compute_masks(reader, "GRID-1", params.tissue, params.mask_downsample)
        mpp0 = float(reader.mpp[0])
        grids = {
            overlap: patch_grid(
                reader.dimensions,
                mpp0,
                masks.tissue,
                masks.downsample,
                GridParams(overlap_px=overlap),
            )
            for overlap in (0, 256)
        }
    rule = TissueRule(masks.tissue, masks.downsample, params.grid.min_tissue)
    return Slide(store, root, grids, footprint_px(GridParams(), mpp0), rule)


@contextmanager
def _service(
    slide: Slide, recorded_overlap_px: int, **settings: object
) -> Iterator[prediction_pb2_grpc.PredictionServiceStub]:
    """The service with models whose model.json record that training grid overlap."""
    folder = slide.root / f"bundles-{recorded_overlap_px}"
    scorer = untrained_scorer(folder, grid_overlap_px=recorded_overlap_px)
    config = PredictionSettings(
        host="127.0.0.1",
        port=0,
        store_url=slide.store.url,
        slide_cache_dir=slide.root / "cache",
        batch_size=8,
        max_in_flight=2,
        **settings,  # type: ignore[arg-type]
    )
    servicer = PredictionServicer(config, scorer=scorer, registry=scorer)  # type: ignore[arg-type]
    binding = ServiceBinding(
        SERVICE_NAME, servicer, prediction_pb2_grpc.add_PredictionServiceServicer_to_server
    )
    server, port = create_server(config, [binding])
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        yield prediction_pb2_grpc.PredictionServiceStub(channel)
    finally:
        channel.close()
        server.stop(0).wait()


def _predict(stub: prediction_pb2_grpc.PredictionServiceStub) -> prediction_pb2.SlidePrediction:
    request = prediction_pb2.PredictSlideRequest(
        slide=common_pb2.SlideRef(object=common_pb2.ObjectRef(key=SLIDE_KEY)),
        options=prediction_pb2.PredictionOptions(
            biomarkers=[common_pb2.BIOMARKER_TP53, common_pb2.BIOMARKER_ER],
            cancer_confidence=0.0,
            skip_heatmaps=True,
        ),
    )
    return stub.PredictSlide(request, timeout=120).prediction


@pytest.mark.parametrize(
    ("recorded", "setting", "used"),
    [
        (256, None, 256),  # the detector's training grid
        (0, None, 0),  # a detector trained on the plain grid (or an older model.json)
        (256, 0, 0),  # the service's setting wins
        (0, 256, 256),
    ],
)
def test_slides_are_tiled_on_the_detectors_training_grid(
    slide: Slide, recorded: int, setting: int | None, used: int
) -> None:
    with _service(slide, recorded, grid_overlap_px=setting) as stub:
        prediction = _predict(stub)
    grid = slide.grids[used]
    assert prediction.status == prediction_pb2.PREDICTION_STATUS_OK
    assert prediction.tissue_patch_count == prediction.cancer_patch_count == len(grid)
    table = pd.read_parquet(io.BytesIO(slide.store.get_bytes(prediction.patch_table.key)))
    # Each 40x window once: the union of the cancer 20x patches' quadrants with
    # enough tissue.
    windows = set()
    for x, y in zip(grid["x"], grid["y"], strict=True):
        origins = quadrant_origins(int(x), int(y), slide.footprint_px)
        keeps = slide.tissue.keeps(origins, slide.footprint_px / 2)
        windows |= {origin for origin, keep in zip(origins, keeps, strict=True) if keep}
    assert not table.duplicated(["x", "y"]).any()
    assert set(zip(table["x"], table["y"], strict=True)) == windows
    for item in prediction.biomarkers:
        assert item.patch_count == len(table)
        name = common_pb2.Biomarker.Name(item.biomarker).removeprefix("BIOMARKER_").lower()
        assert item.probability == pytest.approx(table[name].mean(), abs=1e-9)


def test_the_overlapping_grid_has_more_patches(slide: Slide) -> None:
    assert len(slide.grids[256]) > 2 * len(slide.grids[0]) > 0


def test_a_detector_grid_the_service_cannot_use_is_failed_precondition(slide: Slide) -> None:
    with _service(slide, 512) as stub, pytest.raises(grpc.RpcError) as error:
        _predict(stub)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "512 px" in error.value.details() and "grid_overlap_px" in error.value.details()


@pytest.mark.parametrize("overlap", [-1, 512])
def test_the_overlap_setting_stays_within_the_patch(overlap: int) -> None:
    with pytest.raises(pydantic.ValidationError, match="grid_overlap_px"):
        PredictionSettings(grid_overlap_px=overlap)
