"""A histomarker gRPC service as a child process a test can kill and start again.

``python -m services.cli serve NAME`` in its own session (its PID is its process
group), settings from the environment as ``histomarker up`` gives them, output to a
log file. :meth:`ServiceProcess.kill` is a crash (SIGKILL to the group);
:meth:`ServiceProcess.start` after it serves again on the same port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.apps.local_stack.stack import GRPC_SERVICES, LOOPBACK, grpc_serving
from services.common.processes import is_our_group, reap, start_ticks, stop_group

#: Seconds a service may take to report SERVING (imports are slow on a busy machine).
READY_TIMEOUT_S = 120.0


class ServiceProcess:
    """One service (``tiling``, ``nuclei``, ``analysis``, ``prediction``) on one port.

    Args:
        name: The service's name for ``histomarker serve``.
        port: Port on 127.0.0.1 (kept across restarts).
        env: ``HISTOMARKER_*`` settings on top of this process's environment.
        log: File the service's output is appended to.
    """

    def __init__(self, name: str, port: int, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.port = port
        self.env = env
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None
        self._ticks: int | None = None
        #: How often the service was started.
        self.starts = 0

    @property
    def target(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The running service's PID (its process group), None when not started."""
        return self._process.pid if self._process is not None else None

    def start(self) -> ServiceProcess:
        """Start the service and wait until it reports SERVING."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} is already running (pid {self._process.pid})")
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "HISTOMARKER_HOST": LOOPBACK,
            "HISTOMARKER_PORT": str(self.port),
            **self.env,
        }
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as output:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "serve", self.name],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._ticks = start_ticks(self._process.pid)
        self.starts += 1
        try:
            self._wait_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self) -> None:
        """Crash the service: SIGKILL to its process group, then reap it."""
        process = self._process
        if process is None:
            return
        if is_our_group(process.pid, self._ticks):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30.0)
        self._process = None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the service's group (SIGKILL after ``timeout_s``) and reap it."""
        process = self._process
        if process is None:
            return
        stop_group(process.pid, self._ticks, timeout_s)
        reap(process.pid)
        try:
            process.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10.0)
        self._process = None

    def _wait_serving(self) -> None:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            code = process.poll()
            if code is not None:
                tail = self.log.read_text(errors="replace").splitlines()[-10:]
                raise RuntimeError(f"{self.name} exited with {code}: " + " | ".join(tail))
            if grpc_serving(self.target, GRPC_SERVICES[self.name]):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not SERVING on {self.target} in {READY_TIMEOUT_S:.0f} s")

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
