"""``histomarker up`` / ``down``: the compose topology as local processes on 127.0.0.1.

Components, in start order (``down`` stops them in reverse):

- object store: ``file://`` by default, or the S3 endpoint ``HISTOMARKER_STORE_URL``
  names (with ``HISTOMARKER_S3_*`` credentials); checked, not started;
- ``prefect``: ``prefect server start`` with its own ``PREFECT_HOME``;
- ``torchserve``: token authorization on, its key file in ``<dir>/torchserve``; once
  healthy it gets back the model versions the store's serving records name
  (``services.inference.served_models.restore_served``) before it counts as ready;
- ``tiling``, ``nuclei``, ``analysis``, ``prediction``: ``histomarker serve NAME``;
- ``flows``: ``histomarker flows serve`` against the embedded Prefect server.

Each component runs in its own session (its PID is its process group id), writes to
``<dir>/logs/NAME.log`` and must pass a readiness check before the next one that
depends on it starts: gRPC health SERVING, TorchServe ``/ping`` Healthy, Prefect
``/api/health``. ``<dir>/state.json`` records PIDs and ports after every start.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from services.apps.local_stack.state import (
    STATE_FILE,
    ComponentRecord,
    StackState,
    read_state,
    remove_state,
    write_state,
)
from services.common.errors import FailedPrecondition, HistomarkerError, InvalidInput, Unavailable
from services.common.processes import (
    interruptible,
    is_our_group,
    is_same_process,
    reap,
    start_ticks,
    stop_group,
)
from services.common.settings import DEFAULT_PORTS, ServiceSettings

if TYPE_CHECKING:
    from services.inference.served_models import ServingSettings
    from services.inference.torchserve import RestClient

LOOPBACK = "127.0.0.1"
#: gRPC services in start order, with the name their health status is kept under.
GRPC_SERVICES = {
    "tiling": "histomarker.v1.TilingService",
    "nuclei": "histomarker.v1.NucleiService",
    "analysis": "histomarker.v1.AnalysisService",
    "prediction": "histomarker.v1.PredictionService",
}
#: Components that ``--skip`` may leave out (the four services always run).
OPTIONAL_COMPONENTS = ("prefect", "torchserve", "flows")
DEFAULT_PREFECT_PORT = 4200
DEFAULT_TORCHSERVE_PORTS = {
    "inference_port": 8080,
    "management_port": 8081,
    "metrics_port": 8082,
    "grpc_inference_port": 7070,
    "grpc_management_port": 7071,
}
#: TorchServe's inference key expires after this many minutes (its default is 60,
#: shorter than a working day; the services read the key once at start-up).
TOKEN_EXPIRATION_MIN = 7 * 24 * 60
#: Seconds ``flows serve`` must stay up to count as started (it has no port).
FLOWS_SETTLE_S = 5.0

Report = Callable[[str], None]


def default_directory() -> Path:
    """Where a stack keeps its state, logs and working folders by default."""
    return Path.home() / ".histomarker" / "stack"


def default_model_store(directory: Path) -> Path:
    """``./model-store`` when the current folder has one (a checkout), else in ``directory``."""
    here = Path.cwd() / "model-store"
    return here if here.is_dir() else directory / "model-store"


@dataclass(frozen=True)
class StackOptions:
    """How ``histomarker up`` runs the stack.

    Attributes:
        directory: State file, logs and working folders.
        store_url: Object store of the services (``file://`` or ``s3://``).
        model_store: TorchServe's model store folder.
        free_ports: Pick free ports instead of the defaults (several stacks, tests).
        skip: Optional components not to start (``prefect``, ``torchserve``, ``flows``).
        ready_timeout_s: Seconds each component may take to become ready.
        stop_timeout_s: Seconds each component gets after SIGTERM before SIGKILL.
    """

    directory: Path
    store_url: str
    model_store: Path
    free_ports: bool = False
    skip: frozenset[str] = frozenset()
    ready_timeout_s: float = 180.0
    stop_timeout_s: float = 30.0


@dataclass(frozen=True)
class StackPorts:
    """Every port of a stack on 127.0.0.1."""

    prefect: int
    torchserve: dict[str, int]
    services: dict[str, int]

    def by_owner(self) -> Iterator[tuple[str, int]]:
        yield "prefect", self.prefect
        for role, port in self.torchserve.items():
            yield f"torchserve {role}", port
        for name, port in self.services.items():
            yield name, port


def plan_ports(free: bool) -> StackPorts:
    """The defaults of compose and the services, or ports free right now."""
    if not free:
        return StackPorts(
            DEFAULT_PREFECT_PORT,
            dict(DEFAULT_TORCHSERVE_PORTS),
            {name: DEFAULT_PORTS[name] for name in GRPC_SERVICES},
        )
    from services.common.processes import free_ports

    ports = free_ports(1 + len(DEFAULT_TORCHSERVE_PORTS) + len(GRPC_SERVICES), LOOPBACK)
    torchserve = dict(zip(DEFAULT_TORCHSERVE_PORTS, ports[1:6], strict=True))
    services = dict(zip(GRPC_SERVICES, ports[6:], strict=True))
    return StackPorts(ports[0], torchserve, services)


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FailedPrecondition(f"the {name} command is not installed (run `make install`)")
    return found


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


# Readiness probes: each returns True when ready, False when not yet.


def grpc_serving(target: str, service: str, tls_ca_file: str | None = None) -> bool:
    """Whether the server at ``target`` reports ``service`` SERVING (grpc.health.v1)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.grpc_client import open_channel

    channel = open_channel(
        target, tls_ca_file=tls_ca_file, tls_server_name="localhost" if tls_ca_file else None
    )
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
    except grpc.RpcError:
        return False
    finally:
        channel.close()
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def http_ok(port: int, path: str) -> bool:
    """Whether ``GET http://127.0.0.1:PORT/PATH`` answers 200."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=2.0)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


@dataclass
class _Running:
    record: ComponentRecord
    process: subprocess.Popen[bytes] | None = None

    def exit_code(self) -> int | None:
        """The exit code if the component's main process has ended, else None."""
        if self.process is not None:
            return self.process.poll()
        alive = is_same_process(self.record.pid, self.record.start_ticks)
        return None if alive else -1


@dataclass
class LocalStack:
    """The components of one stack, started by this process."""

    options: StackOptions
    detached: bool = False
    report: Report = lambda _line: None
    ports: StackPorts = field(init=False)
    state: StackState = field(init=False)
    flows_note: str = field(init=False, default="")
    _running: list[_Running] = field(init=False, default_factory=list)
    _torchserve_keys: Any = field(init=False, default=None)
    #: What the restore of the serving records did (``RestoreReport.to_json()``).
    restored_models: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.ports = plan_ports(self.options.free_ports)
        pid = os.getpid()
        self.state = StackState(
            pid,
            start_ticks(pid),
            self.detached,
            self.options.store_url,
            model_store=str(self.options.model_store),
        )

    @property
    def directory(self) -> Path:
        return self.options.directory

    @property
    def log_dir(self) -> Path:
        return self.directory / "logs"

    def wanted(self, name: str) -> bool:
        return name not in self.options.skip

    # Start.

    def start(self) -> None:
        """Start every component and wait until each is ready.

        Raises:
            FailedPrecondition: A port is taken, or a program is missing.
            Unavailable: The store is unreachable, or a component exited or was not
                ready in time (the message names its log). What had started is
                stopped again.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._check_ports()
            self._check_store()
            if self.wanted("prefect"):
                self._launch_prefect()  # slow to start: it gets ready meanwhile
            if self.wanted("torchserve"):
                self._start_torchserve()
            for name in GRPC_SERVICES:
                self._launch_service(name)
            for name in GRPC_SERVICES:
                self._wait_ready(name, self._service_probe(name))
            if self.wanted("prefect"):
                self._wait_ready("prefect", lambda: http_ok(self.ports.prefect, "/api/health"))
            self._start_flows()
        except BaseException:
            self.stop()
            raise

    def _check_ports(self) -> None:
        wanted = [
            (owner, port) for owner, port in self.ports.by_owner() if self.wanted(owner.split()[0])
        ]
        busy = [f"{port} ({owner})" for owner, port in wanted if _port_in_use(port)]
        if busy:
            raise FailedPrecondition(
                f"ports in use on {LOOPBACK}: {', '.join(busy)}; stop what holds them, "
                "or run `histomarker up --free-ports`"
            )

    def _check_store(self) -> None:
        try:
            with ServiceSettings(store_url=self.options.store_url).open_store() as store:
                store.exists("runs/stack-check")
        except HistomarkerError as exc:
            raise Unavailable(f"object store {self.options.store_url}: {exc}") from exc
        self.report(f"object store   {self.options.store_url}")

    def _launch(
        self, name: str, command: list[str], env: dict[str, str], ports: dict[str, int]
    ) -> _Running:
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as output:
            try:
                process = subprocess.Popen(
                    command,
                    cwd=self.directory,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stopped whole
                )
            except OSError as exc:
                raise FailedPrecondition(f"cannot start {name}: {exc}") from exc
        record = ComponentRecord(name, process.pid, start_ticks(process.pid), ports, str(log))
        return self._add(_Running(record, process))

    def _add(self, running: _Running) -> _Running:
        self._running.append(running)
        write_state(self.directory, self.state_snapshot())
        return running

    def state_snapshot(self) -> StackState:
        self.state.components = [running.record for running in self._running]
        return self.state

    def _find(self, name: str) -> _Running:
        return next(running for running in self._running if running.record.name == name)

    def _wait_ready(self, name: str, probe: Callable[[], bool]) -> None:
        running = self._find(name)
        deadline = time.monotonic() + self.options.ready_timeout_s
        while time.monotonic() < deadline:
            code = running.exit_code()
            if code is not None:
                raise Unavailable(
                    f"{name} exited (code {code}) before it was ready; see "
                    f"{running.record.log}: {_log_tail(Path(running.record.log))}"
                )
            if probe():
                running.record.ready = True
                write_state(self.directory, self.state_snapshot())
                ports = ", ".join(f"{role} {port}" for role, port in running.record.ports.items())
                self.report(f"{name:<14} ready (pid {running.record.pid}; {ports})")
                return
            time.sleep(0.25)
        raise Unavailable(
            f"{name} was not ready after {self.options.ready_timeout_s:.0f} s; see "
            f"{running.record.log}: {_log_tail(Path(running.record.log))}"
        )

    def _prefect_env(self) -> dict[str, str]:
        return {
            "PREFECT_HOME": str(self.directory / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }

    @property
    def prefect_api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.prefect}/api"

    def _launch_prefect(self) -> None:
        command = [
            _executable("prefect"),
            "server",
            "start",
            "--host",
            LOOPBACK,
            "--port",
            str(self.ports.prefect),
        ]
        self._launch("prefect", command, self._prefect_env(), {"api": self.ports.prefect})

    def _start_torchserve(self) -> None:
        from services.inference.torchserve import TorchServe, TorchServeConfig

        ports = self.ports.torchserve
        config = TorchServeConfig(
            model_store=self.options.model_store,
            work_dir=self.directory / "torchserve",
            inference_port=ports["inference_port"],
            management_port=ports["management_port"],
            metrics_port=ports["metrics_port"],
            grpc_inference_port=ports["grpc_inference_port"],
            grpc_management_port=ports["grpc_management_port"],
            token_auth=True,
            extra_properties={"token_expiration_min": str(TOKEN_EXPIRATION_MIN)},
        )
        server = TorchServe(config, startup_timeout_s=self.options.ready_timeout_s)
        server.start()  # waits for the key file and /ping Healthy; stops itself on failure
        pid = server.pid
        assert pid is not None
        log = self.log_dir / "torchserve.log"
        log.unlink(missing_ok=True)
        log.symlink_to(config.work_dir.resolve() / "torchserve.out")
        record = ComponentRecord("torchserve", pid, start_ticks(pid), config.ports, str(log))
        # Recorded before the restore, so that a failure or Ctrl-C meanwhile stops it.
        self._add(_Running(record))
        self._torchserve_keys = server.keys
        self._restore_models(server.management)
        record.ready = True
        write_state(self.directory, self.state_snapshot())
        listed = ", ".join(f"{role} {port}" for role, port in config.ports.items())
        self.report(f"{'torchserve':<14} ready (pid {pid}; {listed})")

    def _restore_models(self, management: RestClient) -> None:
        """Serve the versions the store's serving records name (before ``ready``)."""
        from services.inference.served_models import restore_served

        with ServiceSettings(store_url=self.options.store_url).open_store() as store:
            report = restore_served(
                management,
                store,
                self.options.model_store,
                ready_timeout_s=self.options.ready_timeout_s,
            )
        management.close()
        self.restored_models = report.to_json()
        served = ", ".join(f"{m.name} {m.version}" for m in report.restored)
        self.report(
            f"{'torchserve':<14} restored {len(report.restored)} model(s) from the serving "
            f"records{': ' + served if served else ''}"
        )
        for problem in report.problems:
            self.report(f"{'torchserve':<14} WARNING {problem}")

    @property
    def torchserve_key_file(self) -> Path:
        from services.inference.torchserve import KEY_FILE

        return self.directory / "torchserve" / KEY_FILE

    def _torchserve_env(self) -> dict[str, str]:
        ports = self.ports.torchserve
        return {
            "HISTOMARKER_TORCHSERVE_GRPC_TARGET": f"{LOOPBACK}:{ports['grpc_inference_port']}",
            "HISTOMARKER_TORCHSERVE_MANAGEMENT_URL": (
                f"http://{LOOPBACK}:{ports['management_port']}"
            ),
        }

    def _service_env(self, name: str) -> dict[str, str]:
        env = {
            "HISTOMARKER_HOST": LOOPBACK,
            "HISTOMARKER_PORT": str(self.ports.services[name]),
            "HISTOMARKER_STORE_URL": self.options.store_url,
        }
        if name == "prediction":
            env.update(self._torchserve_env())
            if self.wanted("torchserve"):
                env["HISTOMARKER_TORCHSERVE_KEY_FILE"] = str(self.torchserve_key_file)
        return env

    def _launch_service(self, name: str) -> None:
        command = [sys.executable, "-m", "services.cli", "serve", name]
        self._launch(name, command, self._service_env(name), {"grpc": self.ports.services[name]})

    def _service_probe(self, name: str) -> Callable[[], bool]:
        target = f"{LOOPBACK}:{self.ports.services[name]}"
        tls_ca = os.environ.get("HISTOMARKER_TLS_CERT_FILE")
        return lambda: grpc_serving(target, GRPC_SERVICES[name], tls_ca)

    def _start_flows(self) -> None:
        if not self.wanted("flows"):
            self.flows_note = "skipped (--skip flows)"
            return
        if not self.wanted("prefect"):
            self.flows_note = "not started: it needs the Prefect server (--skip prefect)"
            return
        env = {
            **self._prefect_env(),
            **self._torchserve_env(),
            "PREFECT_API_URL": self.prefect_api_url,
            "HISTOMARKER_STORE_URL": self.options.store_url,
            "HISTOMARKER_TILING_TARGET": f"{LOOPBACK}:{self.ports.services['tiling']}",
            "HISTOMARKER_NUCLEI_TARGET": f"{LOOPBACK}:{self.ports.services['nuclei']}",
            "HISTOMARKER_ANALYSIS_TARGET": f"{LOOPBACK}:{self.ports.services['analysis']}",
            "HISTOMARKER_PREDICTION_TARGET": f"{LOOPBACK}:{self.ports.services['prediction']}",
            "HISTOMARKER_TORCHSERVE_MODEL_STORE": str(self.options.model_store),
            "HISTOMARKER_WORK_DIR": str(self.directory / "flows"),
        }
        keys = self._torchserve_keys
        if keys is not None:
            env["HISTOMARKER_TORCHSERVE_INFERENCE_TOKEN"] = keys.inference
            env["HISTOMARKER_TORCHSERVE_MANAGEMENT_TOKEN"] = keys.management
        command = [sys.executable, "-m", "services.cli", "flows", "serve"]
        settled = time.monotonic() + FLOWS_SETTLE_S
        self._launch("flows", command, env, {})
        self._wait_ready("flows", lambda: time.monotonic() >= settled)
        self.flows_note = "started"

    # Watch and stop.

    def watch(self) -> _Running:
        """Block until a component's main process exits; returns it."""
        while True:
            for running in self._running:
                if running.exit_code() is not None:
                    return running
            time.sleep(0.5)

    def stop(self) -> list[str]:
        """Stop every started component in reverse order; returns the names stopped.

        Each process group gets SIGTERM, then SIGKILL after ``stop_timeout_s``; this
        returns when no process of any group is left, and removes the state file.
        """
        stopped = []
        with _signals_ignored():
            for running in reversed(self._running):
                record = running.record
                if stop_group(record.pid, record.start_ticks, self.options.stop_timeout_s):
                    stopped.append(record.name)
                if running.process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        running.process.wait(timeout=5.0)
                reap(record.pid)
            self._running.clear()
            remove_state(self.directory)
        return stopped

    def summary(self) -> dict[str, Any]:
        components = {
            running.record.name: {
                "pid": running.record.pid,
                "ports": running.record.ports,
                "log": running.record.log,
            }
            for running in self._running
        }
        endpoints = {name: f"{LOOPBACK}:{port}" for name, port in self.ports.services.items()}
        if self.wanted("prefect"):
            endpoints["prefect_api"] = self.prefect_api_url
        if self.wanted("torchserve"):
            ts = self.ports.torchserve
            endpoints["torchserve_inference"] = f"http://{LOOPBACK}:{ts['inference_port']}"
            endpoints["torchserve_management"] = f"http://{LOOPBACK}:{ts['management_port']}"
            endpoints["torchserve_grpc"] = f"{LOOPBACK}:{ts['grpc_inference_port']}"
        return {
            "ok": True,
            "dir": str(self.directory),
            "state_file": str(self.directory / STATE_FILE),
            "store_url": self.options.store_url,
            "model_store": str(self.options.model_store),
            "detached": self.detached,
            "endpoints": endpoints,
            "components": components,
            "flows": self.flows_note,
            "models": self.restored_models,
        }


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM meanwhile: a second Ctrl-C must not leave orphans."""
    previous = {
        signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _lock(directory: Path) -> IO[str]:
    """Hold ``<dir>/up.lock``: one ``up`` at a time per folder (released at exit)."""
    handle = (directory / "up.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise FailedPrecondition(f"another `histomarker up` is running in {directory}") from exc
    return handle


def _live_components(state: StackState) -> list[str]:
    return [c.name for c in state.components if is_our_group(c.pid, c.start_ticks)]


def run_up(options: StackOptions, *, detach: bool, report: Report) -> dict[str, Any]:
    """Start the stack; with ``detach`` return once ready, else run until interrupted.

    In the foreground, Ctrl-C, SIGTERM (``histomarker down``) or any component
    exiting stops every component in reverse order before this returns.

    Raises:
        FailedPrecondition: A stack already runs in ``options.directory``, a port is
            taken, or a program is missing.
        Unavailable: A component did not become ready (everything is stopped).
    """
    options.directory.mkdir(parents=True, exist_ok=True)
    lock = _lock(options.directory)
    try:
        existing = read_state(options.directory)
        if existing is not None:
            live = _live_components(existing)
            if live:
                raise FailedPrecondition(
                    f"a stack is already running in {options.directory} ({', '.join(live)}); "
                    f"`histomarker down --dir {options.directory}` stops it"
                )
            remove_state(options.directory)  # left by a stack that is gone
        stack = LocalStack(options, detached=detach, report=report)
        with interruptible():
            try:
                stack.start()
            except KeyboardInterrupt:
                return {"ok": True, "dir": str(options.directory), "stopped": "interrupted"}
            summary = stack.summary()
            if detach:
                return summary
            report(f"stack ready in {options.directory}; Ctrl-C or `histomarker down` stops it")
            reason, ok = "interrupted", True
            try:
                ended = stack.watch()
                code = ended.exit_code()
                reason = f"{ended.record.name} exited (code {code}); see {ended.record.log}"
                ok = False
            except KeyboardInterrupt:
                pass
            finally:
                stopped = stack.stop()
        return {**summary, "ok": ok, "stopped": stopped, "reason": reason}
    finally:
        lock.close()


def _running_state(directory: Path) -> tuple[StackState, list[str]]:
    """The state of the stack running in ``directory`` and its live components.

    Raises:
        FailedPrecondition: No stack runs there.
    """
    state = read_state(directory) if (directory / STATE_FILE).is_file() else None
    live = _live_components(state) if state is not None else []
    if state is None or not live:
        raise FailedPrecondition(
            f"no stack runs in {directory}; `histomarker up --dir {directory}` starts one"
        )
    return state, live


def stack_serving_settings(directory: Path) -> ServingSettings:
    """The ``ServingSettings`` of the stack running in ``directory``: its store, its
    TorchServe's management URL and key file, its model store folder.

    Raises:
        FailedPrecondition: No stack runs in ``directory``, or it runs without
            TorchServe.
    """
    from services.inference.served_models import ServingSettings
    from services.inference.torchserve import KEY_FILE

    state, live = _running_state(directory)
    torchserve = next((c for c in state.components if c.name == "torchserve"), None)
    if torchserve is None or "torchserve" not in live:
        raise FailedPrecondition(f"the stack in {directory} runs without TorchServe")
    model_store = Path(state.model_store) if state.model_store else None
    return ServingSettings(
        store_url=state.store_url,
        torchserve_management_url=f"http://{LOOPBACK}:{torchserve.ports['management_port']}",
        # The stack's own key, whatever token the environment holds.
        torchserve_management_token=None,
        torchserve_key_file=directory / "torchserve" / KEY_FILE,
        torchserve_model_store=model_store or default_model_store(directory),
    )


#: Components ``histomarker restart`` can restart under a running stack.
RESTARTABLE = ("torchserve",)


def run_restart(
    directory: Path,
    component: str,
    *,
    report: Report,
    ready_timeout_s: float = 180.0,
    stop_timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Restart one component of the detached stack in ``directory``, the rest running.

    TorchServe is stopped (its recorded process group), started again on the same
    ports with the same model store, and gets the recorded model versions back
    before this returns; it writes new keys, which the PredictionService reads again
    by itself (``services.inference.torchserve.KeyFile``).

    Raises:
        InvalidInput: A component that cannot be restarted alone.
        FailedPrecondition: No stack runs there, it runs without that component, or
            it runs in the foreground (whose ``up`` stops the stack when a part exits).
        Unavailable: The component did not come back (the stack is left without it;
            ``histomarker down`` then ``up`` starts everything again).
    """
    if component not in RESTARTABLE:
        raise InvalidInput(
            f"cannot restart {component!r} alone; restartable: {', '.join(RESTARTABLE)}"
        )
    _running_state(directory)  # before the lock, which would create the folder
    lock = _lock(directory)
    try:
        state, _ = _running_state(directory)
        if not state.detached and is_same_process(state.up_pid, state.up_start_ticks):
            raise FailedPrecondition(
                f"the stack in {directory} runs in the foreground (`up` without --detach), "
                "which stops everything when a part exits; restart it whole instead"
            )
        old = next((c for c in state.components if c.name == component), None)
        if old is None:
            raise FailedPrecondition(f"the stack in {directory} runs without {component}")
        options = StackOptions(
            directory=directory,
            store_url=state.store_url,
            model_store=Path(state.model_store)
            if state.model_store
            else default_model_store(directory),
            free_ports=True,
            ready_timeout_s=ready_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )
        stack = LocalStack(options, detached=True, report=report)
        stack.state = state
        stack.ports.torchserve.update(old.ports)
        others = [_Running(c) for c in state.components if c.name != component]
        stack._running = others
        stop_group(old.pid, old.start_ticks, stop_timeout_s)
        reap(old.pid)
        report(f"{component:<14} stopped (pid {old.pid})")
        order = [c.name for c in state.components]
        stack._start_torchserve()
        stack._running.sort(key=lambda running: order.index(running.record.name))
        write_state(directory, stack.state_snapshot())
        return {
            "ok": True,
            "dir": str(directory),
            "restarted": component,
            "pid": stack._find(component).record.pid,
            "models": stack.restored_models,
        }
    finally:
        lock.close()


def run_down(directory: Path, *, stop_timeout_s: float = 30.0) -> dict[str, Any]:
    """Stop the stack recorded in ``directory``: exactly its processes, never others.

    A foreground ``up`` gets SIGTERM first and stops its components itself; then
    every recorded process group still alive gets SIGTERM and, after
    ``stop_timeout_s``, SIGKILL, in reverse start order. Harmless when nothing runs.

    Raises:
        Unavailable: Some recorded process could not be stopped.
    """
    state = read_state(directory)
    if state is None:
        return {"ok": True, "dir": str(directory), "stopped": [], "note": "no stack was running"}
    live = _live_components(state)
    up_pid = state.up_pid
    if up_pid != os.getpid() and is_same_process(up_pid, state.up_start_ticks):
        with contextlib.suppress(ProcessLookupError):
            os.kill(up_pid, signal.SIGTERM)
        deadline = time.monotonic() + stop_timeout_s * (len(state.components) + 1) + 10.0
        while time.monotonic() < deadline and is_same_process(up_pid, state.up_start_ticks):
            time.sleep(0.1)
    for record in reversed(state.components):
        stop_group(record.pid, record.start_ticks, stop_timeout_s)
    left = _live_components(state)
    if left:
        raise Unavailable(f"could not stop {', '.join(left)} of the stack in {directory}")
    remove_state(directory)
    return {"ok": True, "dir": str(directory), "stopped": live}
