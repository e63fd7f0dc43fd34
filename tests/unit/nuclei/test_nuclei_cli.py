"""``histomarker nuclei IMAGE``: JSON and readable output, the label TIFF, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from services.cli import main
from services.nuclei.cli_nuclei import write_labels
from services.nuclei.features import FEATURE_NAMES
from services.nuclei.pipeline import decode_labels_tiff, encode_labels_tiff, labels_dtype


def _patch(count: int = 12, seed: int = 0, side: int = 192) -> np.ndarray:
    """Pink background with ``count`` dark purple, nucleus-sized ellipses (40x)."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((side, side, 3), np.uint8)
    rgb[:] = (235, 190, 215)
    for _ in range(count):
        centre = (int(rng.integers(16, side - 16)), int(rng.integers(16, side - 16)))
        axes = (int(rng.integers(10, 14)), int(rng.integers(8, 11)))
        cv2.ellipse(rgb, centre, axes, float(rng.uniform(0, 180)), 0, 360, (70, 40, 120), -1)
    return cv2.GaussianBlur(rgb, (0, 0), 1.0)


def _write_png(path: Path, rgb: np.ndarray) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_has_the_count_flag_and_the_75_named_features(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _write_png(tmp_path / "patch.png", _patch())
    labels = tmp_path / "labels.tif"

    code, out, err = _run(["nuclei", str(image), "--labels", str(labels), "--json"], capsys)

    assert code == 0, err
    result = json.loads(out)
    assert list(result["features"]) == list(FEATURE_NAMES)
    assert all(np.isfinite(v) for v in result["features"].values())
    assert result["nuclei"] >= 5 and result["few_nuclei"] is False
    assert result["mpp"] == 0.25 and result["labels_dtype"] == "uint16"
    written = tifffile.imread(labels)
    assert written.dtype == np.uint16 and written.shape == (192, 192)
    assert len(np.unique(written[written > 0])) == result["nuclei"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif", "patch.png"]


def test_mpp_scales_the_physical_features(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _write_png(tmp_path / "patch.png", _patch())
    _, at_40x, _ = _run(["nuclei", str(image), "--json"], capsys)
    code, at_finer, err = _run(["nuclei", str(image), "--mpp", "0.2", "--json"], capsys)
    assert code == 0, err
    coarse, fine = json.loads(at_40x), json.loads(at_finer)
    assert fine["mpp"] == 0.2
    assert fine["features"]["morph.area.mean"] < coarse["features"]["morph.area.mean"]


def test_readable_summary_is_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = _write_png(tmp_path / "patch.png", _patch())
    code, out, _ = _run(["nuclei", str(image)], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("nuclei: ") and len(lines) < 10
    assert any(line.startswith("morph.area.mean: ") for line in lines)


def test_an_image_without_nuclei_is_flagged_not_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blank = np.full((128, 128, 3), (235, 190, 215), np.uint8)
    image = _write_png(tmp_path / "blank.png", blank)
    labels = tmp_path / "blank.tif"
    code, out, err = _run(["nuclei", str(image), "--labels", str(labels), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["nuclei"] == 0 and result["few_nuclei"] is True
    assert set(result["features"].values()) == {0.0}
    assert not tifffile.imread(labels).any()


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--mpp", "0"], "--mpp"),
        (["--mpp", "nan"], "--mpp"),
        (["--mpp", "5"], "0.05-2.0"),
        (["--labels", "out.png"], ".tif"),
        (["--labels", "no/such/folder/out.tif"], "does not exist"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], reason: str
) -> None:
    image = _write_png(tmp_path / "patch.png", _patch(3))
    argv = ["nuclei", str(image), *[a.replace("no/", f"{tmp_path}/no/") for a in extra]]
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("histomarker nuclei: ")
    assert reason in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch.png"]


def test_bad_images_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    for name in ("missing.png", "notes.png"):
        code, out, err = _run(["nuclei", str(tmp_path / name), "--json"], capsys)
        assert code == 2 and out == "", name
        assert len(err.strip().splitlines()) == 1 and name in err


def test_labels_are_uint16_when_they_fit_else_uint32(tmp_path: Path) -> None:
    small = np.arange(64 * 64, dtype=np.int32).reshape(64, 64)
    assert labels_dtype(small) is np.uint16
    big = small.copy()
    big[0, 0] = 70_000
    assert labels_dtype(big) is np.uint32
    for labels, dtype in ((small, np.uint16), (big, np.uint32)):
        path = tmp_path / f"{dtype.__name__}.tif"
        write_labels(path, encode_labels_tiff(labels, mpp=0.25))
        back = decode_labels_tiff(path.read_bytes())
        assert back.dtype == dtype and np.array_equal(back, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uint16.tif", "uint32.tif"]
