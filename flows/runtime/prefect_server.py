"""An embedded Prefect server: one local process on 127.0.0.1, telemetry off.

Prefect's own "ephemeral" server (what a client starts when no ``PREFECT_API_URL``
is set) leaves its background services out, the scheduler among them, so scheduled
deployments would never get a run. This one is Prefect's API application under
uvicorn like ``prefect server start``, with every service, in a single process of its
own session (stopped as a group), its database in ``PREFECT_HOME``, and no UI.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from services.common.errors import Unavailable
from services.common.processes import free_ports, stop_group

LOOPBACK = "127.0.0.1"
#: Telemetry switches, for the server and every process that talks to it.
TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def api_healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``{api_url}/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout_s) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class EmbeddedPrefectServer:
    """Start with :meth:`start` (or ``with``), stop with :meth:`stop`.

    Args:
        home: ``PREFECT_HOME`` of the server (its database); the current one when None.
        log_path: Where the server's output goes; ``{home}/embedded-server.log``.
        port: The port; a free one when None.
    """

    def __init__(
        self, home: Path | None = None, log_path: Path | None = None, port: int | None = None
    ) -> None:
        from prefect.settings import PREFECT_HOME

        self.home = Path(home) if home is not None else Path(PREFECT_HOME.value())
        self.log_path = log_path or self.home / "embedded-server.log"
        self.port = port or free_ports(1, LOOPBACK)[0]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/api"

    def start(self, timeout_s: float = 180.0) -> EmbeddedPrefectServer:
        """Start the server and wait until its API is healthy.

        Raises:
            Unavailable: It exited, or was not healthy within ``timeout_s``.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **TELEMETRY_OFF,
            "PREFECT_HOME": str(self.home),
            "PREFECT_UI_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--lifespan",
            "on",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stopped whole, not by our signals
            )
        deadline = time.monotonic() + timeout_s
        while not api_healthy(self.api_url):
            if self.process.poll() is not None:
                self.process = None
                raise Unavailable(f"the embedded Prefect server exited; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise Unavailable(
                    f"the embedded Prefect server was not ready in {timeout_s:g} s; "
                    f"see {self.log_path}"
                )
            time.sleep(0.25)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``timeout_s``."""
        process, self.process = self.process, None
        if process is None:
            return
        # The whole group: the server's own children too, even if it has exited.
        stop_group(process.pid, None, timeout_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10.0)

    def __enter__(self) -> EmbeddedPrefectServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
