"""``histomarker up`` / ``down`` for real: every component on 127.0.0.1, then none left.

Every process of a stack runs in the stack's folder (its working directory), so
"no process has its cwd under the folder" after ``down`` means no orphan escaped,
not even one that left its process group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.apps.local_stack.stack import GRPC_SERVICES
from services.common.processes import group_members

pytestmark = pytest.mark.slow

HISTOMARKER = str(Path(sys.executable).with_name("histomarker"))
#: Bound on each component's readiness (Prefect's first start is the slow one).
READY_TIMEOUT_S = 90


def _needs_java() -> None:
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17 (`make system-deps` installs it)")


def _up_command(directory: Path, *extra: str) -> list[str]:
    return [
        HISTOMARKER,
        "up",
        "--dir",
        str(directory / "stack"),
        "--free-ports",
        "--store-url",
        (directory / "store").as_uri(),
        "--model-store",
        str(directory / "model-store"),
        "--timeout",
        str(READY_TIMEOUT_S),
        *extra,
    ]


def _down(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HISTOMARKER, "down", "--dir", str(directory / "stack"), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _processes_under(directory: Path) -> list[str]:
    """Live processes whose working directory is inside ``directory``."""
    found = []
    root = str(directory.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2] != "Z" and cwd.startswith(root):
            found.append(f"{entry.name} {(entry / 'cmdline').read_bytes()[:120]!r}")
    return found


def _state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "stack" / "state.json").read_text())


def _serving(port: int, service: str) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def _get(url: str, token: str | None = None) -> bytes:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return bytes(response.read())


def _assert_all_gone(directory: Path, state: dict[str, Any]) -> None:
    for component in state["components"]:
        assert group_members(component["pid"]) == [], component["name"]
    assert _processes_under(directory) == []
    assert not (directory / "stack" / "state.json").exists()


def test_up_detach_then_down_leaves_nothing(tmp_path: Path) -> None:
    _needs_java()
    started = time.monotonic()
    try:
        up = subprocess.run(
            [*_up_command(tmp_path, "--skip", "flows"), "--detach", "--json"],
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT_S * 4,
        )
        assert up.returncode == 0, up.stderr
        summary = json.loads(up.stdout)
        state = _state(tmp_path)
        names = [c["name"] for c in state["components"]]
        assert names == ["prefect", "torchserve", *GRPC_SERVICES]
        assert all(c["ready"] for c in state["components"])
        print(f"up --detach: {time.monotonic() - started:.1f} s")

        for name, service in GRPC_SERVICES.items():
            port = summary["components"][name]["ports"]["grpc"]
            assert _serving(port, service), name
        keys = json.loads((tmp_path / "stack" / "torchserve" / "key_file.json").read_text())
        ping = _get(
            f"{summary['endpoints']['torchserve_inference']}/ping", keys["inference"]["key"]
        )
        assert json.loads(ping)["status"] == "Healthy"
        assert json.loads(_get(f"{summary['endpoints']['prefect_api']}/health")) is True
        for component in state["components"]:
            assert Path(component["log"]).exists(), component["name"]

        # A second `up` on the same folder refuses while the first stack runs.
        again = subprocess.run(
            [*_up_command(tmp_path), "--detach"], capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 2 and "already running" in again.stderr
    finally:
        stopping = time.monotonic()
        down = _down(tmp_path)
        print(f"down: {time.monotonic() - stopping:.1f} s")
    assert down.returncode == 0, down.stderr
    assert sorted(json.loads(down.stdout)["stopped"]) == sorted(names)
    _assert_all_gone(tmp_path, state)

    second = _down(tmp_path)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["stopped"] == []


def test_sigint_stops_a_foreground_up(tmp_path: Path) -> None:
    _needs_java()
    process = subprocess.Popen(
        [*_up_command(tmp_path, "--skip", "flows"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    state: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S * 4
        while time.monotonic() < deadline and process.poll() is None:
            try:
                state = _state(tmp_path)
            except (OSError, ValueError):
                state = {}
            components = state.get("components", [])
            if len(components) == 6 and all(c["ready"] for c in components):
                break
            time.sleep(0.5)
        assert process.poll() is None, process.communicate()[1]
        assert len(state.get("components", [])) == 6, "the stack did not get ready"

        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:  # the test failed: leave nothing behind
            _down(tmp_path)
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    result = json.loads(out)
    assert result["reason"] == "interrupted"
    assert result["stopped"] == [
        "prediction",
        "analysis",
        "nuclei",
        "tiling",
        "torchserve",
        "prefect",
    ]
    _assert_all_gone(tmp_path, state)
