"""`histomarker flows serve` as a process: embedded Prefect server on 127.0.0.1,
both deployments registered, a run of one executed, a clean stop on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

READY_TIMEOUT_S = 240.0
RUN_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


def _wait_for(condition, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_serve_registers_both_deployments_runs_them_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("slide_id\n")
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "HISTOMARKER_STORE_URL": (tmp_path / "store").as_uri(),
        "HISTOMARKER_WORK_DIR": str(tmp_path / "work"),
    }
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "services.cli", "flows", "serve", "--json"]
    command += ["--cron", "0 5 * * 1", "--interval-s", "3600"]
    command += ["--manifest", str(manifest), "--cohort", "tiny"]
    process = subprocess.Popen(
        command,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        ready = _wait_for(
            lambda: (
                process.poll() is not None
                or any("Ctrl-C or SIGTERM stops" in line for line in lines)
            ),
            READY_TIMEOUT_S,
            "flows serve to start",
        )
        assert ready and process.poll() is None, "".join(lines)
        url = next(m.group(1) for line in lines if (m := re.search(r"prefect api: (\S+)", line)))
        assert url.startswith("http://127.0.0.1:")

        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            deployments = {d.name: d for d in client.read_deployments()}
            assert set(deployments) == {"scheduled-training", "inbox-predictions"}
            train, predict = deployments["scheduled-training"], deployments["inbox-predictions"]
            assert [s.schedule.cron for s in train.schedules] == ["0 5 * * 1"]  # type: ignore[union-attr]
            assert train.parameters == {
                "manifest_path": str(manifest.resolve()),
                "cohort_name": "tiny",
            }
            assert [s.schedule.interval.total_seconds() for s in predict.schedules] == [3600]  # type: ignore[union-attr]
            # A run of the served batch deployment (an empty inbox) completes.
            run = client.create_flow_run_from_deployment(predict.id)
            final = _wait_for(
                lambda: (
                    (state := client.read_flow_run(run.id).state) is not None
                    and state.is_final()
                    and state
                ),
                RUN_TIMEOUT_S,
                "the predict_batch run",
            )
            assert final.is_completed(), final

        children = psutil.Process(process.pid).children(recursive=True)
        assert children, "the embedded server runs as a child"
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=STOP_TIMEOUT_S)
        assert process.returncode == 0, "".join(lines)
        assert '"stopped": true' in out
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
