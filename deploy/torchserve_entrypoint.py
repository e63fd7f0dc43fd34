"""The torchserve container's entrypoint: TorchServe, then the served models back.

TorchServe forgets its models when it stops; the versions to serve are recorded in
the object store (``serving/{model}.json``). This starts TorchServe in the
foreground, waits until ``/ping`` says Healthy, runs ``histomarker models restore``
(the store and management settings come from the ``HISTOMARKER_*`` environment)
and only then writes the "restored" marker file that ``healthcheck.py torchserve``
requires: the container is healthy, and prediction and flows start, once exactly
the recorded versions are READY. A record whose archive is missing is a warning of
the restore, not a failure; a restore that fails outright (store unreachable) is
retried, then TorchServe is stopped and the container exits 1 (compose restarts it).
SIGTERM/SIGINT stop TorchServe's whole process group.

Settings (the image's defaults):
    TORCHSERVE_CONFIG        /opt/histomarker/config.properties
    TORCHSERVE_MODEL_STORE   /model-store
    TORCHSERVE_KEY_FILE      /var/lib/torchserve/keys/key_file.json (TorchServe writes
                             it into its working folder, this file's folder)
    TORCHSERVE_RESTORED_FILE /var/lib/torchserve/tmp/restored
    TORCHSERVE_INFERENCE_PORT 8080
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType

CONFIG = "/opt/histomarker/config.properties"
MODEL_STORE = "/model-store"
KEY_FILE = "/var/lib/torchserve/keys/key_file.json"
RESTORED_FILE = "/var/lib/torchserve/tmp/restored"
#: Seconds TorchServe may take to answer /ping Healthy.
HEALTHY_TIMEOUT_S = 300.0
#: Seconds TorchServe's processes get after SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 30.0
#: Seconds before each new attempt of a restore that failed outright.
RESTORE_RETRY_DELAYS_S = (5.0, 10.0, 20.0, 40.0)

_children: list[subprocess.Popen[bytes]] = []
_stopping = False


def _say(message: str) -> None:
    print(f"torchserve-entrypoint: {message}", file=sys.stderr, flush=True)


def _torchserve() -> str:
    beside = Path(sys.executable).parent / "torchserve"
    if beside.is_file():
        return str(beside)
    return shutil.which("torchserve") or "torchserve"


def _terminate() -> None:
    """SIGTERM to the process group of every child (the launcher may be gone while
    Java and the workers of its group still run)."""
    for child in list(_children):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_group(server: subprocess.Popen[bytes]) -> int:
    """Wait until TorchServe's launcher exits, then until its whole group is gone
    (SIGTERM, SIGKILL to what is left after STOP_TIMEOUT_S); the launcher's code."""
    code = server.wait()
    _terminate()  # the launcher is gone: Java and the workers follow it
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _group_alive(server.pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
        time.sleep(0.2)
    return code


def _stop(_signum: int, _frame: FrameType | None) -> None:
    global _stopping
    _stopping = True
    _terminate()


def _healthy(port: str, key_file: Path) -> bool:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/ping")
    try:
        key = json.loads(key_file.read_text(encoding="utf-8"))["inference"]["key"]
        request.add_header("Authorization", f"Bearer {key}")
    except (OSError, KeyError, TypeError, ValueError):
        return False  # token auth is on: no key file yet means not started yet
    try:
        with urllib.request.urlopen(request, timeout=4.0) as response:
            return bool(json.load(response).get("status") == "Healthy")
    except (OSError, ValueError):
        return False


def _wait_healthy(server: subprocess.Popen[bytes], port: str, key_file: Path) -> bool:
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    while time.monotonic() < deadline and not _stopping:
        if server.poll() is not None:
            return False
        if _healthy(port, key_file):
            return True
        time.sleep(0.5)
    return False


def _restore(key_file: Path) -> bool:
    command = [sys.executable, "-m", "services.cli", "models", "restore", "--json"]
    env = {**os.environ, "HISTOMARKER_TORCHSERVE_KEY_FILE": str(key_file)}
    for delay_s in (*RESTORE_RETRY_DELAYS_S, None):
        process = subprocess.Popen(command, env=env, start_new_session=True)
        _children.append(process)
        code = process.wait()
        _children.remove(process)
        if code == 0:
            return True
        if _stopping or delay_s is None:
            return False
        _say(f"restore failed (exit {code}); again in {delay_s:.0f} s")
        time.sleep(delay_s)
    return False


def main() -> int:
    config = os.environ.get("TORCHSERVE_CONFIG", CONFIG)
    model_store = os.environ.get("TORCHSERVE_MODEL_STORE", MODEL_STORE)
    key_file = Path(os.environ.get("TORCHSERVE_KEY_FILE", KEY_FILE))
    restored = Path(os.environ.get("TORCHSERVE_RESTORED_FILE", RESTORED_FILE))
    port = os.environ.get("TORCHSERVE_INFERENCE_PORT", "8080")
    # A restarted container keeps its files: neither may speak of the last start.
    restored.unlink(missing_ok=True)
    key_file.unlink(missing_ok=True)
    restored.parent.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    command = [
        _torchserve(),
        "--start",
        "--foreground",
        "--ts-config",
        config,
        "--model-store",
        model_store,
        "--ncs",
        "--enable-model-api",
    ]
    server = subprocess.Popen(command, cwd=key_file.parent, start_new_session=True)
    _children.append(server)
    if not _wait_healthy(server, port, key_file):
        if _stopping:
            _wait_group(server)
            return 0
        _say(f"TorchServe did not become healthy (exit code {server.poll()}); stopping")
        _terminate()
        _wait_group(server)
        return 1
    _say("TorchServe is healthy; restoring the recorded model versions")
    if not _restore(key_file):
        if not _stopping:
            _say("could not restore the recorded model versions; stopping TorchServe")
        _terminate()
        _wait_group(server)
        return 0 if _stopping else 1
    restored.write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n", encoding="utf-8")
    _say("restored; TorchServe serves")
    code = _wait_group(server)
    if _stopping:
        return 0
    _say(f"TorchServe exited (code {code})")
    return code or 1


if __name__ == "__main__":
    sys.exit(main())
