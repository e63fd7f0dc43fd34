"""benchmarks/speed/load_test.py and benchmarks/quality/reliability.py run end to end with
tiny counts.

The figures are the benchmark's business (docs/RELIABILITY.md); this only proves the
scripts work: servers start and stop, every level is reported, nothing is left
running.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.processes import group_members

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17")
def test_load_test_reports_every_level_and_stops_its_servers(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    command = [
        sys.executable,
        "benchmarks/speed/load_test.py",
        "--levels",
        "1,2",
        "--predict-requests",
        "2",
        "--normalize-requests",
        "2",
        "--patches",
        "2",
        "--slides",
        "1",
        "--backbone",
        "tiny",
        "--input-px",
        "32",
        "--max-concurrent-predictions",
        "1",
        "--max-queued-predictions",
        "0",
        "--backoff-s",
        "0.2",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    levels = json.loads(out.read_text())["levels"]
    assert [(row["target"], row["clients"]) for row in levels] == [
        ("NormalizePatches", 1),
        ("NormalizePatches", 2),
        ("PredictSlide", 1),
        ("PredictSlide", 2),
    ]
    for row in levels:
        assert row["ok"] == row["requests"] == 2 and not row["errors"] and row["server_alive"]
        assert row["rss_peak_mb"] >= row["rss_before_mb"] > 0
    assert levels[0]["patches_per_s"] > 0
    assert "| PredictSlide | 2 |" in done.stdout
    groups = json.loads(out.read_text())["process_groups"]
    assert len(groups) == 3  # tiling, TorchServe, prediction
    assert not [g for g in groups if group_members(g)], "the load test left a server running"


def test_reliability_writes_the_document_without_running_anything(tmp_path: Path) -> None:
    doc = tmp_path / "RELIABILITY.md"
    command = [
        sys.executable,
        "benchmarks/quality/reliability.py",
        "--skip-tests",
        "--skip-load",
        "--out",
        str(doc),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = doc.read_text()
    assert "benchmarks/quality/reliability.py --skip-tests --skip-load" in text
    assert "## 1. Bad inputs and fuzzing" in text and "## 2. Faults" in text
    assert "## 3. Load" in text and "Not run (`--skip-load`)" in text
