"""The TileSlide request the preprocess flow sends, from its TilingConfig, and the
QC table it records."""

from __future__ import annotations

import pydantic
import pytest

from flows.runtime.records import TiledSlide
from flows.training.config import TilingConfig
from flows.training.preprocess import qc_rows, tiling_request
from services.common.stubs.histomarker.v1 import tiling_pb2


def test_request_carries_the_grid_settings() -> None:
    config = TilingConfig(patch_px=256, overlap_px=128, min_tissue_fraction=0.3, max_patches=9)
    request = tiling_request("S1", "slides/S1.tiff", config)
    params = request.params
    assert (params.patch_size_px, params.overlap_px, params.max_patches) == (256, 128, 9)
    assert params.min_tissue_fraction == pytest.approx(0.3)
    assert params.magnification == 20.0
    assert params.stain_method == tiling_pb2.STAIN_METHOD_VAHADANE
    assert request.slide.slide_id == "S1" and request.slide.object.key == "slides/S1.tiff"


def test_the_method_grid_has_no_overlap() -> None:
    assert tiling_request("S1", "k", TilingConfig()).params.overlap_px == 0


@pytest.mark.parametrize("overlap", [512, 600, -1])
def test_overlap_must_be_within_the_patch(overlap: int) -> None:
    with pytest.raises(pydantic.ValidationError, match="overlap_px"):
        TilingConfig(patch_px=512, overlap_px=overlap)


def test_qc_rows_list_each_slides_verdict() -> None:
    common = {"slide_key": "k", "params_hash": "h", "grid_key": "g", "patch_px": 512}
    tiled = [
        TiledSlide(slide_id="A", patch_count=40, patch_mpp=0.5, qc_verdict="pass", **common),
        TiledSlide(
            slide_id="B",
            patch_count=2,
            patch_mpp=0.5,
            qc_verdict="fail",
            qc_reasons=("usable tissue 0.1 mm² is under 0.5 mm²", "blur covers 20%"),
            usable_area_mm2=0.1,
            usable_fraction=0.5,
            **common,
        ),
    ]
    rows = qc_rows(tiled)
    assert [r["qc_verdict"] for r in rows] == ["pass", "fail"]
    assert rows[1]["qc_reasons"] == "usable tissue 0.1 mm² is under 0.5 mm²; blur covers 20%"
    assert rows[1]["usable_area_mm2"] == 0.1 and rows[1]["patch_count"] == 2
