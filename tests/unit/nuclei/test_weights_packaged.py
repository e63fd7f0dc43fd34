"""The U-Net's weights ship inside the package (the service images install it with
pip), with their model card, and are the file the card names."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from services.common.objectstore.integrity import file_sha256
from services.nuclei.unet import WEIGHTS_PATH, NucleiNet

REPO = Path(__file__).resolve().parents[3]


def test_the_shipped_weights_load_and_match_their_record() -> None:
    record = json.loads(WEIGHTS_PATH.with_suffix(".json").read_text())
    assert record["sha256"] == file_sha256(WEIGHTS_PATH)
    assert WEIGHTS_PATH.stat().st_size <= 30 * 2**20
    card = (WEIGHTS_PATH.parent / "MODEL_CARD.md").read_text()
    assert record["sha256"] in card and "CC BY-NC-SA 4.0" in card
    assert NucleiNet(device="cpu").path == WEIGHTS_PATH


@pytest.mark.slow
def test_a_wheel_of_the_project_carries_the_weights(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("nuclei_unet.pt", "nuclei_unet.json", "MODEL_CARD.md"):
        assert f"services/nuclei/weights/{name}" in names
