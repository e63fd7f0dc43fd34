"""``histomarker demo --scale quick`` from the installed command, as a user runs it:
the real local stack (Prefect server, TorchServe, the four gRPC services), the real
training pipeline and PredictionService, only smaller.

The first run is interrupted with Ctrl-C (SIGINT) while the pipeline trains: it
must stop every process of its stack. The second run reuses the cohort the first
one generated, finishes, writes the held-out table, predictions and report, and
leaves no process behind either.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17"),
]

EXE = Path(sys.executable).with_name("histomarker")


def _processes_in(folder: Path) -> list[str]:
    """Processes (pid and command) running in ``folder`` or naming it."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(folder)) or str(folder) in command:
            found.append(f"{proc.name}: {command[:200]}")
    return found


def _wait_for_line(process: subprocess.Popen[str], text: str, timeout_s: float) -> list[str]:
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} in the demo's output: {''.join(lines[-20:])}")


def test_quick_demo_stops_its_stack_on_ctrl_c_then_reruns_to_a_table(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    command = [str(EXE), "demo", "--scale", "quick", "--out", str(out)]

    # Run 1: Ctrl-C once the pipeline's first model trains.
    first = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        seen = _wait_for_line(first, "train-cancer_detector", timeout_s=400)
        first.send_signal(signal.SIGINT)
        _, rest = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0
    assert "stopped: prediction, analysis, nuclei, tiling, torchserve, prefect" in rest, (
        "".join(seen[-5:]) + rest[-2000:]
    )
    assert not _processes_in(out), _processes_in(out)
    assert (out / "cohort" / "manifest.csv").is_file()

    # Run 2: reuses the cohort, trains, predicts the held-out slides, stops.
    second = subprocess.run(
        [*command, "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert not _processes_in(out), _processes_in(out)
    result = json.loads(second.stdout)  # stdout is one JSON document
    assert result["ok"] is True
    assert result["cohort_reused"] is True

    manifest = pd.read_csv(out / "cohort" / "manifest.csv")
    train = pd.read_csv(out / "cohort" / "train.csv")
    predictions = pd.read_csv(result["predictions"])
    # Held out by patient: no patient is both trained on and predicted.
    assert not set(train["patient_id"]) & set(predictions["patient_id"])
    assert len(train) + len(predictions) == len(manifest)
    assert {"cancer", "normal"} <= set(predictions["kind"])
    assert not predictions["status"].str.contains("missing").any()
    assert predictions["cancer_score"].between(0, 1).all()

    # One row per task: cancer vs normal over every held-out slide, each trained
    # biomarker over the held-out cancer slides.
    tasks = {row["task"]: row for row in result["results"]}
    assert tasks["cancer"]["slides"] == len(predictions)
    trained = [t for t in tasks if t != "cancer"]
    assert trained and set(trained) | set(result["not_trained"]) == {
        "tp53",
        "pik3ca",
        "er",
        "pr",
        "her2",
        "basal",
    }
    cancer_slides = int((predictions["kind"] == "cancer").sum())
    for name in trained:
        assert tasks[name]["slides"] == cancer_slides
        assert predictions[f"{name}_probability"].loc[predictions["kind"] == "cancer"].notna().all()
    table = Path(result["results_md"]).read_text()
    assert "| cancer vs normal |" in table
    assert json.loads(Path(result["results_json"]).read_text())["results"] == result["results"]
    assert Path(result["report"]).read_text().startswith("<!DOCTYPE html>")
    assert (out / "stack" / "logs" / "prediction.log").is_file()
