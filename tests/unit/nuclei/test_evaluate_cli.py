"""``histomarker evaluate nuclei INDEX.csv``: scores per image and mean, JSON and
table, and bad rows named with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from services.cli import main


def _tile(seed: int, side: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Pink tissue with dark purple nuclei (40x sizes) and their instance labels."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((side, side, 3), np.uint8)
    rgb[:] = (235, 190, 215)
    labels = np.zeros((side, side), np.uint16)
    for index in range(1, 11):
        centre = (int(rng.integers(14, side - 14)), int(rng.integers(14, side - 14)))
        mask = np.zeros((side, side), np.uint8)
        cv2.ellipse(mask, centre, (11, 8), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        free = (mask > 0) & (labels == 0)
        labels[free] = index
        rgb[free] = (70, 40, 120)
    return cv2.GaussianBlur(rgb, (0, 0), 0.8), labels


def _index(folder: Path, rows: int = 2) -> Path:
    lines = ["name,organ,image,instances,binary,mpp"]
    for i in range(rows):
        rgb, labels = _tile(i)
        cv2.imwrite(str(folder / f"t{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / f"t{i}_labels.png"), labels)
        cv2.imwrite(str(folder / f"t{i}_mask.png"), (labels > 0).astype(np.uint8) * 255)
        lines.append(f"t{i},breast,t{i}.png,t{i}_labels.png,t{i}_mask.png,0.25")
    index = folder / "index.csv"
    index.write_text("\n".join(lines) + "\n")
    return index


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_has_every_score_per_image_and_their_means(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = _index(tmp_path)

    code, out, err = _run(
        ["evaluate", "nuclei", str(index), "--method", "phoulady", "--json"], capsys
    )

    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == "phoulady"
    assert [r["name"] for r in result["images"]] == ["t0", "t1"]
    for record in result["images"]:
        assert record["annotated"] == 10 and record["organ"] == "breast"
        assert 0.5 <= record["f1"] <= 1.0 and 0.4 <= record["aji"] <= 1.0
        assert record["dice_binary"] == pytest.approx(record["dice"])
    assert result["mean"]["f1"] == pytest.approx(np.mean([r["f1"] for r in result["images"]]))
    assert set(result["by_organ"]) == {"breast"}


def test_the_default_method_prints_a_table_with_a_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = _index(tmp_path, rows=1)

    code, out, err = _run(["evaluate", "nuclei", str(index)], capsys)

    assert code == 0, err
    assert "method unet" in out and "mean" in out.splitlines()[-1]
    assert "evaluate nuclei [" in err and "1/1 images" in err


def test_a_row_with_only_a_binary_mask_gets_dice_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = _index(tmp_path, rows=1)
    index.write_text(index.read_text().replace("t0_labels.png", ""))

    code, out, err = _run(["evaluate", "nuclei", str(index), "--method", "otsu", "--json"], capsys)

    assert code == 0, err
    record = json.loads(out)["images"][0]
    assert "dice" in record and "f1" not in record and "aji" not in record


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda text: text.replace("t1.png", "absent.png"), "row 2 ('t1'): the image file"),
        (lambda text: text.replace(",0.25\nt1", ",abc\nt1"), "row 1 ('t0'): mpp 'abc'"),
        (lambda text: text.replace("mpp", "resolution"), "lacks the column(s) mpp"),
        (lambda text: text.replace("t1_labels.png,t1_mask.png", ","), "neither instances"),
    ],
)
def test_a_bad_row_is_named_and_exits_2_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: object, message: str
) -> None:
    index = _index(tmp_path)
    index.write_text(change(index.read_text()))  # type: ignore[operator]

    code, out, err = _run(["evaluate", "nuclei", str(index)], capsys)

    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_size_mismatch_or_a_grey_image_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = _index(tmp_path)
    cv2.imwrite(str(tmp_path / "t1_labels.png"), np.zeros((50, 60), np.uint16))
    code, _, err = _run(["evaluate", "nuclei", str(index)], capsys)
    assert code == 2 and "row 2 ('t1'): instances is 60x50 px but the image is 160x160" in err

    index = _index(tmp_path)
    cv2.imwrite(str(tmp_path / "t0.png"), np.zeros((160, 160), np.uint8))
    code, _, err = _run(["evaluate", "nuclei", str(index)], capsys)
    assert code == 2 and "row 1 ('t0')" in err and "greyscale" in err


def test_an_unknown_method_or_index_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["evaluate", "nuclei", str(tmp_path / "none.csv")], capsys)
    assert code == 2 and "no index file" in err
    code, _, err = _run(["evaluate", "nuclei", "x.csv", "--method", "magic"], capsys)
    assert code == 2 and "magic" in err
