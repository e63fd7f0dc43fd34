"""`histomarker demo` from the installed command, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_runs_the_stages_that_exist_and_lists_the_rest(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("histomarker")
    result = subprocess.run(
        [str(exe), "demo", "--json", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is one JSON document, nothing else
    assert report["ok"] is True
    assert report["ran"]["object store"]["round_trip"] is True
    cohort = report["ran"]["synthetic cohort"]
    assert cohort["slides"] == 4 and cohort["cancer"] >= 1 and cohort["normal"] >= 1
    assert Path(cohort["manifest"]).is_file()
    assert len(list((tmp_path / "out" / "cohort" / "slides").glob("*.tiff"))) == 4
    tiling = report["ran"]["tiling"]
    assert tiling["status"] == "ok" and tiling["patches"] > 0
    assert (tmp_path / "out" / "store" / tiling["grid"]).is_file()
    assert tiling["patches_40x"] == 4 * min(4, tiling["patches"])
    assert tiling["source_40x"] == "native"  # the synthetic slides have a 40x level
    assert tiling["nuclei_40x"]["nuclei"] > 0
    health = report["ran"]["gRPC services (health)"]
    assert set(health) == {
        f"histomarker.v1.{name}Service" for name in ("Tiling", "Nuclei", "Analysis", "Prediction")
    }
    assert set(health.values()) == {"SERVING"}
    assert all("issue #" in item for item in report["missing"])
    # The demo cleans up its check object: the store holds nothing under runs/.
    assert not any((tmp_path / "out" / "store" / "runs").rglob("*.txt"))
