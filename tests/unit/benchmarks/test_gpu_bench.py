"""benchmarks/gpu_bench.py: its slide arithmetic, its dihedral views, and a tiny CPU run."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.py"

EXPECTED = {
    "pipeline_s_per_slide": "s/slide",
    "pipeline_tta_patches_per_s": "patches/s",
    "encoder_mil_s_per_slide": "s/slide",
    "mil_s_per_bag": "s/bag",
    "encoder_patches_per_s": "patches/s",
    "train_patches_per_s": "patches/s",
}


@pytest.fixture(scope="module")
def gpu_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_standard_slide_has_720_tissue_patches_of_512_px_at_20x(
    gpu_bench: ModuleType,
) -> None:
    # 40960 x 30720 px at 0.25 um/px is 20480 x 15360 px at 0.5 um/px: 40 x 30 patches.
    assert gpu_bench.tissue_patch_count(512, tissue_fraction=1.0) == 40 * 30
    assert gpu_bench.STANDARD_SLIDE_PATCHES == 720
    assert gpu_bench.STANDARD_SLIDE_CANCER_PATCHES == 360
    assert gpu_bench.STANDARD_SLIDE_BIOMARKER_PATCHES == 4 * 360
    assert gpu_bench.STANDARD_SLIDE_PIPELINE_PATCHES == 720 + 6 * 1440


def test_the_encoder_tiles_the_same_tissue_area_in_224_px_patches(
    gpu_bench: ModuleType,
) -> None:
    assert gpu_bench.STANDARD_SLIDE_ENCODER_PATCHES == round(720 * (512 / 224) ** 2) == 3762
    # Reading at 40x instead quadruples the count.
    assert gpu_bench.tissue_patch_count(512, read_mpp=0.25) == 4 * 720


def test_the_eight_dihedral_views_are_distinct_and_include_the_identity(
    gpu_bench: ModuleType,
) -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = gpu_bench.dihedral_views(x, 8)
    assert len(views) == 8
    assert torch.equal(views[0], x)
    assert all(v.shape == x.shape for v in views)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert len(gpu_bench.dihedral_views(x, 3)) == 3
    with pytest.raises(ValueError):
        gpu_bench.dihedral_views(x, 9)


def test_the_mil_head_turns_a_bag_into_six_logits(gpu_bench: ModuleType) -> None:
    head = gpu_bench.GatedAttentionMIL(16).eval()
    with torch.inference_mode():
        logits = head(torch.randn(5, 16))
    assert logits.shape == (6,)


def test_the_tiny_mode_runs_on_the_cpu_and_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "tiny mode" in result.stdout
    assert "not the GPU figures" in result.stdout
    payload = json.loads(out.read_text())
    assert payload["tiny"] is True
    measurements = payload["measurements"]
    assert set(measurements) == set(EXPECTED)
    for key, unit in EXPECTED.items():
        value = measurements[key]["value"]
        assert measurements[key]["unit"] == unit
        assert math.isfinite(value) and value > 0, key
        assert measurements[key]["what"] in result.stdout


def test_a_bad_view_count_is_refused_with_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tta-views", "9"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "--tta-views" in result.stderr
