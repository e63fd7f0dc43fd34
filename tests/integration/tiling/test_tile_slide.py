"""`histomarker tile` and the tiling pipeline on generated slides."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from services.cli import main
from services.common.errors import InvalidInput
from services.common.objectstore import open_store
from services.slide.reader import open_slide
from services.slide.shards import decode_patch
from services.synth.cohort import generate_cohort
from services.tiling.pipeline import TileParams, load_slide_stain, tile_slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, n_slides=1, seed=2, preset="tiny", truth_crops=0)
    return next((out / "slides").glob("*.tiff"))


def _members(folder: Path, shard: str) -> dict[str, np.ndarray]:
    with tarfile.open(folder / shard) as tar:
        return {m.name: decode_patch(tar.extractfile(m).read()) for m in tar if m.isfile()}


def test_tile_writes_masks_grid_and_patches(slide: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["tile", str(slide), str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok" and result["patch_count"] > 0
    # QC is recorded, not acted on: the tiny slide is under a real slide's 0.5 mm²
    # usable-tissue floor, and is tiled all the same.
    assert result["qc"]["verdict"] == "fail" and result["qc"]["usable_area_mm2"] < 0.5
    for name in ("tissue.png", "tissue.json", "grid.parquet", "tile.json"):
        assert (out / name).is_file(), name
    grid = pd.read_parquet(out / "grid.parquet")
    assert len(grid) == result["patch_count"]
    assert (grid["tissue_fraction"] >= 0.5).all()
    assert (grid["width"] == 1024).all()  # a 20x patch on a 40x slide
    tissue_meta = json.loads((out / "tissue.json").read_text())
    mask = cv2.imread(str(out / "tissue.png"), cv2.IMREAD_GRAYSCALE) > 0
    ds = tissue_meta["downsample"]
    with open_slide(slide) as reader:
        for shard, rows in grid.groupby("shard"):
            members = _members(out, shard)
            for row in rows.itertuples():
                patch = members[row.member]
                assert patch.shape == (512, 512, 3)
                expected = reader.read_patch(int(row.x), int(row.y), 512, 0.5)
                assert np.abs(patch.astype(int) - expected).mean() < 3  # JPEG q90
                centre = mask[int((row.y + 512) / ds), int((row.x + 512) / ds)]
                assert centre or row.tissue_fraction < 1.0
    # The same parameters again: reused, not recomputed.
    assert main(["tile", str(slide), str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reused"] is True and again["params_hash"] == result["params_hash"]


def test_tile_with_a_reference_normalizes(slide: Path, tmp_path: Path, capsys) -> None:
    with open_slide(slide) as reader:
        reference = reader.read_region(1024, 1024, 1, 512, 512)
    ref_path = tmp_path / "reference.png"
    cv2.imwrite(str(ref_path), cv2.cvtColor(reference, cv2.COLOR_RGB2BGR))
    out = tmp_path / "normalized"
    argv = ["tile", str(slide), str(out), "--reference", str(ref_path), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    stain = json.loads((out / "stain.json").read_text())
    assert {"slide", "target"} <= set(stain)
    assert result["patch_count"] > 0


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_the_stain_record_rebuilds_the_tiling_transform(
    slide: Path, tmp_path: Path, capsys, method: str
) -> None:
    """What the 40x patches are normalized with: the 20x patches' own transform."""
    with open_slide(slide) as reader:
        reference = reader.read_region(1024, 1024, 1, 512, 512)
    ref_path = tmp_path / "reference.png"
    cv2.imwrite(str(ref_path), cv2.cvtColor(reference, cv2.COLOR_RGB2BGR))
    out = tmp_path / method
    argv = ["tile", str(slide), str(out), "--reference", str(ref_path), "--method", method]
    assert main([*argv, "--json"]) == 0
    capsys.readouterr()
    store = open_store(out.as_uri())
    stain = load_slide_stain(store, "")
    assert stain is not None and json.loads(store.get_bytes("stain.json"))["method"] == method
    assert stain.method == method and stain.estimate == "ok"
    row = pd.read_parquet(out / "grid.parquet").iloc[0]
    stored = _members(out, row.shard)[row.member]
    with open_slide(slide) as reader:
        raw = reader.read_patch(int(row.x), int(row.y), 512, 0.5)
    again = stain.transform(raw)
    assert np.abs(stored.astype(int) - again).mean() < 3  # JPEG q90
    assert np.abs(stored.astype(int) - raw).mean() > 3
    empty = open_store((tmp_path / "none").as_uri())
    assert load_slide_stain(empty, "") is None
    empty.put_bytes("bad/stain.json", b'{"slide": {}}')
    with pytest.raises(InvalidInput, match="not a stain record"):
        load_slide_stain(empty, "bad")


def test_blank_slide_gives_an_empty_grid_not_an_error(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    glass = np.clip(238 + rng.normal(0, 2, (3000, 4000, 3)), 0, 255).astype(np.uint8)
    path = tmp_path / "blank.png"
    cv2.imwrite(str(path), glass)
    out = tmp_path / "out"
    assert main(["tile", str(path), str(out), "--mpp", "0.5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "no_tissue" and result["patch_count"] == 0
    assert pd.read_parquet(out / "grid.parquet").empty


def test_bad_inputs_exit_2_and_leave_nothing(tmp_path: Path, capsys) -> None:
    garbage = tmp_path / "slide.svs"
    garbage.write_bytes(b"\x00" * 100)
    plain = tmp_path / "no-mpp.png"
    cv2.imwrite(str(plain), np.full((600, 600, 3), 230, np.uint8))
    for argv in (
        ["tile", str(garbage), str(tmp_path / "o1")],
        ["tile", str(tmp_path / "missing.svs"), str(tmp_path / "o2")],
        ["tile", str(plain), str(tmp_path / "o3")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("histomarker tile")
        assert not Path(argv[2]).exists()
    assert "mpp" in err[0]


def test_a_failed_run_leaves_nothing_that_looks_finished(slide: Path, tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri())

    def fail_after_two(done: int, total: int) -> None:
        if done == 2:
            raise RuntimeError("disk pulled out")

    with open_slide(slide) as reader, pytest.raises(RuntimeError):
        tile_slide(reader, "s1", store, "tiles/s1/x", TileParams(), progress=fail_after_two)
    assert [info.key for info in store.list("tiles/")] == []


def test_a_reused_tiling_is_judged_again_under_other_qc_thresholds(
    slide: Path, tmp_path: Path
) -> None:
    # QC thresholds judge a slide; they change nothing tiling writes, so other
    # thresholds reuse the tiling (same folder, nothing recomputed) with a new verdict.
    from services.slide.qc import QcThresholds

    strict, lenient = QcThresholds(min_usable_mm2=0.5), QcThresholds(min_usable_mm2=0.01)
    with open_store(f"file://{tmp_path / 'store'}") as store, open_slide(slide) as reader:
        first = tile_slide(reader, "s", store, "tiles/s", TileParams(qc=strict))
        tile_json = store.get_bytes("tiles/s/tile.json")
        again = tile_slide(reader, "s", store, "tiles/s", TileParams(qc=lenient))
        assert store.get_bytes("tiles/s/tile.json") == tile_json  # nothing rewritten
    assert again.reused and again.params_hash == first.params_hash
    assert first.qc["verdict"] == "fail"
    assert any("under 0.5 mm²" in reason for reason in first.qc["reasons"])
    assert again.qc["verdict"] in ("pass", "warn")
    assert not any("mm²" in reason for reason in again.qc["reasons"])
    # The measurements are the stored ones; only the judgement changed.
    for key in ("tissue_area_mm2", "usable_area_mm2", "usable_fraction", "artifact_fractions"):
        assert again.qc[key] == first.qc[key]
