"""Run TorchServe from Python: configure, start, register models, predict, stop.

``TorchServe(config)`` is a context manager around one TorchServe instance bound to
loopback. It writes a ``config.properties`` from :class:`TorchServeConfig` into its
own working folder, starts ``torchserve --foreground`` in a new process group with
its own temp folder (TorchServe names its worker sockets ``.ts.sock.9000``... in the
temp folder, so two instances sharing one would collide), waits until ``/ping``
says Healthy, and on stop terminates that process group and waits until the Java
frontend and its Python workers are gone.

Token authorization stays on unless ``TorchServeConfig.token_auth`` is set False
explicitly; TorchServe then writes ``key_file.json`` into the working folder and the
helpers here send its inference or management key as ``Authorization: Bearer``.
``TorchServeGrpcClient`` talks to TorchServe's own gRPC inference API through the
stubs ``services.common.protogen`` generates from the ``.proto`` files in its jar.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from services.common.errors import (
    FailedPrecondition,
    HistomarkerError,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.common.processes import free_ports, group_members, stop_group

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: Name of the key file token-authorized TorchServe writes into its working folder.
KEY_FILE = "key_file.json"
#: HTTP statuses of TorchServe's APIs and the errors they become.
_HTTP_ERRORS: dict[int, type[HistomarkerError]] = {
    400: InvalidInput,
    401: Unauthenticated,
    403: Unauthenticated,
    404: NotFound,
    409: FailedPrecondition,
    413: ResourceExhausted,
    503: Unavailable,
    507: ResourceExhausted,
}


@dataclass(frozen=True)
class TorchServeConfig:
    """How one TorchServe instance is configured.

    Attributes:
        model_store: Folder of the ``.mar`` archives it may register.
        work_dir: Its working folder: ``config.properties``, logs, the key file and
            its private temp folder.
        host: Address every API binds to (loopback unless told otherwise).
        inference_port: REST inference API port.
        management_port: REST management API port.
        metrics_port: Metrics API port.
        grpc_inference_port: gRPC inference API port.
        grpc_management_port: gRPC management API port.
        token_auth: Require the key file's tokens; set False only explicitly (local
            tests), which passes ``--disable-token-auth``.
        workers_per_model: Default workers of a registered model.
        max_request_size: Largest request body, bytes.
        max_response_size: Largest response body, bytes.
        job_queue_size: Requests a model queues before refusing more.
        default_response_timeout_s: Seconds a worker may take for one batch.
        extra_properties: More ``config.properties`` entries, verbatim.
    """

    model_store: Path
    work_dir: Path
    host: str = LOOPBACK
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    token_auth: bool = True
    workers_per_model: int = 1
    max_request_size: int = 64 * 1024 * 1024
    max_response_size: int = 64 * 1024 * 1024
    job_queue_size: int = 256
    default_response_timeout_s: int = 120
    extra_properties: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ports = self.ports
        if len(set(ports.values())) != len(ports):
            raise InvalidInput(f"TorchServe ports must differ, got {ports}")
        for name, port in ports.items():
            if not 1 <= port <= 65535:
                raise InvalidInput(f"{name} must be within 1-65535, got {port}")
        if self.workers_per_model < 1:
            raise InvalidInput("workers_per_model must be >= 1")

    @property
    def ports(self) -> dict[str, int]:
        """Every port by its attribute name."""
        return {
            "inference_port": self.inference_port,
            "management_port": self.management_port,
            "metrics_port": self.metrics_port,
            "grpc_inference_port": self.grpc_inference_port,
            "grpc_management_port": self.grpc_management_port,
        }

    @classmethod
    def with_free_ports(cls, model_store: Path, work_dir: Path, **kwargs: Any) -> TorchServeConfig:
        """A config whose five ports are free on ``host`` right now."""
        inference, management, metrics, grpc_inference, grpc_management = free_ports(
            5, kwargs.get("host", LOOPBACK)
        )
        return cls(
            Path(model_store),
            Path(work_dir),
            inference_port=inference,
            management_port=management,
            metrics_port=metrics,
            grpc_inference_port=grpc_inference,
            grpc_management_port=grpc_management,
            **kwargs,
        )

    @property
    def temp_dir(self) -> Path:
        """The instance's private temp folder (worker sockets, pid file)."""
        return self.work_dir / "tmp"

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def config_path(self) -> Path:
        return self.work_dir / "config.properties"


def config_properties(config: TorchServeConfig) -> dict[str, str]:
    """The ``config.properties`` entries of ``config``, in file order."""
    host = config.host
    properties = {
        "inference_address": f"http://{host}:{config.inference_port}",
        "management_address": f"http://{host}:{config.management_port}",
        "metrics_address": f"http://{host}:{config.metrics_port}",
        "grpc_inference_address": host,
        "grpc_inference_port": str(config.grpc_inference_port),
        "grpc_management_address": host,
        "grpc_management_port": str(config.grpc_management_port),
        "model_store": str(config.model_store.resolve()),
        # Models are registered through the management API, never at start-up.
        "load_models": "",
        "enable_model_api": "true",
        "disable_token_authorization": "false" if config.token_auth else "true",
        "default_workers_per_model": str(config.workers_per_model),
        "max_request_size": str(config.max_request_size),
        "max_response_size": str(config.max_response_size),
        "job_queue_size": str(config.job_queue_size),
        "default_response_timeout": str(config.default_response_timeout_s),
        # The workers' Unix sockets go to java.io.tmpdir: keep them per instance.
        "vmargs": f"-Djava.io.tmpdir={config.temp_dir.resolve()}",
        # System metrics start a Python process every minute; nothing reads them.
        "disable_system_metrics": "true",
        "install_py_dep_per_model": "false",
    }
    properties.update(config.extra_properties)
    return properties


def write_config_properties(config: TorchServeConfig, path: Path | None = None) -> Path:
    """Write ``config.properties`` (to ``config.config_path`` by default); returns it."""
    path = path or config.config_path
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Generated by services.inference.torchserve; edits are overwritten."]
    lines += [f"{key}={value}" for key, value in config_properties(config).items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class TokenKeys:
    """Keys of a token-authorized TorchServe.

    Attributes:
        inference: Key of the inference APIs (REST and gRPC).
        management: Key of the management APIs.
    """

    inference: str
    management: str


def read_key_file(path: Path) -> TokenKeys:
    """The keys in TorchServe's ``key_file.json``.

    Raises:
        NotFound: No key file (token auth off, or TorchServe not started).
        FailedPrecondition: The file is not in the expected form.
    """
    if not path.is_file():
        raise NotFound(f"no TorchServe key file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return TokenKeys(
            inference=str(data["inference"]["key"]),
            management=str(data["management"]["key"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FailedPrecondition(f"TorchServe key file {path} is malformed: {exc}") from exc


#: A key, or a function giving the key to send now (keys that change, see KeyFile).
Token = str | Callable[[], str] | None


def token_now(token: Token) -> str | None:
    """The key to send with a request now."""
    return token() if callable(token) else token


class KeyFile:
    """TorchServe's ``key_file.json``, read again whenever it changes.

    TorchServe writes new keys at every start, so a client that outlives a TorchServe
    restart (the PredictionService of a local stack) asks this for the key of each
    request: :meth:`inference` and :meth:`management` are :data:`Token` functions.
    A file caught half-written, or gone while TorchServe restarts, keeps the last
    keys read.

    Args:
        path: The key file.

    Raises:
        NotFound: No key file at ``path`` when the first keys are read.
        FailedPrecondition: The first file read is malformed.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = self._stamp_now()
        self._keys = read_key_file(self.path)

    def keys(self) -> TokenKeys:
        """The current keys (the file read again when its size or mtime changed)."""
        with self._lock:
            try:
                stamp = self._stamp_now()
                if stamp != self._stamp:
                    self._keys = read_key_file(self.path)
                    self._stamp = stamp
            except (NotFound, FailedPrecondition) as exc:
                log.warning("keeping TorchServe's last keys: %s", exc)
            return self._keys

    def inference(self) -> str:
        return self.keys().inference

    def management(self) -> str:
        return self.keys().management

    def _stamp_now(self) -> tuple[int, int]:
        try:
            status = self.path.stat()
        except OSError:
            raise NotFound(f"no TorchServe key file at {self.path}") from None
        return status.st_mtime_ns, status.st_size


class RestClient:
    """Keep-alive HTTP/1.1 to one TorchServe API, one connection per thread."""

    def __init__(self, host: str, port: int, token: Token = None, timeout_s: float = 120.0):
        self.host = host
        self.port = port
        self.token = token
        self.timeout_s = timeout_s
        self._local = threading.local()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        authorize: bool = True,
    ) -> tuple[int, bytes]:
        """Send one request; returns (status, body). Retries once on a stale connection.

        Raises:
            Unavailable: TorchServe cannot be reached.
        """
        sent = dict(headers or {})
        token = token_now(self.token) if authorize else None
        if token:
            sent["Authorization"] = f"Bearer {token}"
        while True:
            connection, reused = self._connection()
            try:
                connection.request(method, path, body=body, headers=sent)
                response = connection.getresponse()
                return response.status, response.read()
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                connection.close()
                self._local.connection = None
                # Only a kept-alive connection the server closed meanwhile is retried.
                if not reused or isinstance(exc, TimeoutError):
                    raise Unavailable(
                        f"TorchServe at {self.host}:{self.port} is unreachable: {exc}"
                    ) from exc

    def json(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Send one request and parse the JSON answer; HTTP errors become typed ones."""
        status, data = self.request(method, path, body, headers)
        if status >= 400:
            raise http_error(status, data)
        try:
            return json.loads(data) if data else None
        except ValueError as exc:
            raise Unavailable(f"TorchServe answered {path} with non-JSON: {data[:200]!r}") from exc

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it served a request before."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            return connection, True
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        self._local.connection = connection
        return connection, False


def http_error(status: int, body: bytes) -> HistomarkerError:
    """The typed error of a TorchServe HTTP error answer.

    TorchServe refuses a missing or wrong token with 400 ``InvalidKeyException``:
    that becomes Unauthenticated; the handler's own error bodies keep their code.
    """
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("type") == "InvalidKeyException":
        return Unauthenticated(f"TorchServe refused the token: {data.get('message')}")
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return error_from_output(data)
    message = data.get("message", text) if isinstance(data, dict) else text
    kind = _HTTP_ERRORS.get(status, Unavailable if status >= 500 else InvalidInput)
    return kind(f"TorchServe answered {status}: {str(message).strip()[:500]}")


def error_from_output(output: Mapping[str, Any]) -> HistomarkerError:
    """The typed error of a handler's ``{"error": ..., "code": ...}`` answer."""
    kinds = {kind.status_name: kind for kind in _HTTP_ERRORS.values()}
    kind = kinds.get(str(output.get("code")), InvalidInput)
    return kind(str(output.get("error")))


class TorchServeGrpcClient:
    """Client of TorchServe's gRPC inference API (``InferenceAPIsService``)."""

    def __init__(self, target: str, token: Token = None, timeout_s: float = 120.0):
        import grpc

        from services.common.stubs.torchserve import inference_pb2, inference_pb2_grpc

        self._grpc = grpc
        self._messages = inference_pb2
        self.timeout_s = timeout_s
        self.token = token
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)

    def ping(self) -> str:
        """TorchServe's health string ("Healthy" when up)."""
        from google.protobuf import empty_pb2

        response = self._call(self._stub.Ping, empty_pb2.Empty())
        return str(json.loads(response.health).get("status", response.health))

    def predict(self, model_name: str, data: bytes, model_version: str = "") -> Any:
        """One prediction: ``data`` goes in as the request's ``data`` input.

        Returns:
            The handler's answer, parsed from JSON: a list of patch outputs.

        Raises:
            InvalidInput: The handler rejected the payload.
            Unauthenticated: Missing or wrong token.
            Unavailable: TorchServe is down or failed.
        """
        answer = json.loads(self.predict_raw(model_name, data, model_version))
        # gRPC answers a request the handler rejected with OK and the error body.
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            raise error_from_output(answer)
        return answer

    def predict_raw(self, model_name: str, data: bytes, model_version: str = "") -> bytes:
        """One prediction, its answer as TorchServe sent it (an encoder answers
        ``.npy`` bytes, not JSON). Raises as :meth:`predict`."""
        request = self._messages.PredictionsRequest(
            model_name=model_name, model_version=model_version, input={"data": data}
        )
        return bytes(self._call(self._stub.Predictions, request).prediction)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TorchServeGrpcClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        grpc = self._grpc
        try:
            token = token_now(self.token)
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            return method(request, timeout=self.timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            kinds: dict[Any, type[HistomarkerError]] = {
                grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
                grpc.StatusCode.NOT_FOUND: NotFound,
                grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
                grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
                grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
            }
            kind = kinds.get(code, Unavailable)
            raise kind(f"TorchServe gRPC {code.name}: {details}") from exc


class TorchServe:
    """One TorchServe instance: ``with TorchServe(config) as ts: ts.register(...)``.

    Args:
        config: Ports, folders, authorization.
        startup_timeout_s: Seconds to wait for ``/ping`` to say Healthy.
        env: Extra environment variables of the TorchServe processes.
    """

    def __init__(
        self,
        config: TorchServeConfig,
        *,
        startup_timeout_s: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self._env = dict(env or {})
        self._process: subprocess.Popen[bytes] | None = None
        self._keys: TokenKeys | None = None
        self.inference = RestClient(config.host, config.inference_port)
        self.management = RestClient(config.host, config.management_port)

    # Lifecycle.

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """PID (and process group) of the launcher, None when not running."""
        return self._process.pid if self._process is not None else None

    def start(self) -> TorchServe:
        """Start TorchServe and wait until it is healthy (and its key file written).

        Raises:
            FailedPrecondition: Already started, or TorchServe/Java not installed.
            Unavailable: It exited or did not become healthy in time (the message
                ends with its log).
        """
        if self._process is not None:
            raise FailedPrecondition("this TorchServe is already started")
        config = self.config
        for folder in (config.work_dir, config.temp_dir, config.log_dir, config.model_store):
            folder.mkdir(parents=True, exist_ok=True)
        (config.work_dir / KEY_FILE).unlink(missing_ok=True)
        write_config_properties(config)
        command = [
            _torchserve_executable(),
            "--start",
            "--foreground",
            "--ts-config",
            str(config.config_path.resolve()),
            "--model-store",
            str(config.model_store.resolve()),
            "--ncs",
            "--enable-model-api",
        ]
        if not config.token_auth:
            command.append("--disable-token-auth")
        temp = str(config.temp_dir.resolve())
        env = {
            **os.environ,
            # TEMP: the launcher passes it on as java.io.tmpdir; TMPDIR: its pid
            # file and the Python workers' temp files.
            "TEMP": temp,
            "TMPDIR": temp,
            "LOG_LOCATION": str(config.log_dir.resolve()),
            "METRICS_LOCATION": str(config.log_dir.resolve()),
            **self._env,
        }
        output = (config.work_dir / "torchserve.out").open("wb")
        try:
            self._process = subprocess.Popen(
                command,
                cwd=config.work_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends it whole
            )
        except OSError as exc:
            raise FailedPrecondition(f"cannot start TorchServe: {exc}") from exc
        finally:
            output.close()
        try:
            if config.token_auth:
                # Written at start-up, before the APIs listen; /ping needs it too.
                self._keys = self._wait_keys()
                self.inference.token = self._keys.inference
                self.management.token = self._keys.management
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop TorchServe and wait until every process it started is gone.

        SIGTERM to its process group (launcher, Java frontend, Python workers), then
        SIGKILL to whatever is left after ``timeout_s``.
        """
        process = self._process
        if process is None:
            return
        self.inference.close()
        self.management.close()
        stop_group(process.pid, None, timeout_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10.0)
        self._process = None
        self._keys = None
        self.inference.token = self.management.token = None

    def processes(self) -> list[int]:
        """PIDs of the live processes this instance started (its process group)."""
        return group_members(self._process.pid) if self._process is not None else []

    @property
    def keys(self) -> TokenKeys | None:
        """The token keys, None when token authorization is off."""
        return self._keys

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of TorchServe's console output."""
        path = self.config.work_dir / "torchserve.out"
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # Addresses.

    @property
    def inference_url(self) -> str:
        return f"http://{self.config.host}:{self.config.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://{self.config.host}:{self.config.management_port}"

    @property
    def grpc_inference_target(self) -> str:
        return f"{self.config.host}:{self.config.grpc_inference_port}"

    # Management API.

    def ping(self) -> bool:
        """True when ``/ping`` answers Healthy."""
        try:
            status, body = self.inference.request("GET", "/ping")
        except Unavailable:
            return False
        if status != 200:
            return False
        try:
            return json.loads(body).get("status") == "Healthy"
        except ValueError:
            return False

    def register(
        self,
        mar: Path | str,
        *,
        model_name: str | None = None,
        batch_size: int = 1,
        max_batch_delay_ms: int = 100,
        initial_workers: int = 1,
        response_timeout_s: int | None = None,
        synchronous: bool = True,
        ready_timeout_s: float = 300.0,
    ) -> str:
        """Register a ``.mar`` and wait until its workers are READY.

        Args:
            mar: A ``.mar`` in the model store (path or file name), or a URL.
            model_name: Name to register under; the archive's by default.
            batch_size: Most requests TorchServe batches into one handler call.
            max_batch_delay_ms: Longest wait for a batch to fill, ms.
            initial_workers: Worker processes to start (>= 1 to serve at once).
            response_timeout_s: Seconds a worker may take; TorchServe's default.
            synchronous: Answer only after the workers started.
            ready_timeout_s: Seconds to wait for READY workers.

        Returns:
            The registered model's name.

        Raises:
            InvalidInput: Bad batching parameters, or a path outside the model store.
            FailedPrecondition: The model is registered already.
            Unavailable: TorchServe is down or the workers did not get READY.
        """
        if batch_size < 1 or max_batch_delay_ms < 0 or initial_workers < 0:
            raise InvalidInput("need batch_size >= 1, max_batch_delay_ms >= 0, workers >= 0")
        url = self._mar_url(mar)
        query = {
            "url": url,
            "batch_size": batch_size,
            "max_batch_delay": max_batch_delay_ms,
            "initial_workers": initial_workers,
            "synchronous": str(synchronous).lower(),
        }
        if model_name:
            query["model_name"] = model_name
        if response_timeout_s is not None:
            query["response_timeout"] = response_timeout_s
        answer = self.management.json("POST", "/models?" + urllib.parse.urlencode(query))
        # 'Model "cancer_detector" Version: 1 registered with 1 initial workers'
        found = re.search(r'Model "([^"]+)"', str((answer or {}).get("status", "")))
        name = found.group(1) if found else model_name or Path(url).stem
        if initial_workers:
            self.wait_ready(name, timeout_s=ready_timeout_s)
        return name

    def wait_ready(self, model_name: str, timeout_s: float = 300.0) -> dict[str, Any]:
        """Wait until every worker of the model is READY; returns its description.

        Raises:
            Unavailable: Not READY within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        description: dict[str, Any] = {}
        while time.monotonic() < deadline:
            description = self.describe(model_name)
            workers = description.get("workers") or []
            if workers and all(w.get("status") == "READY" for w in workers):
                return description
            self._check_alive()
            time.sleep(0.2)
        raise Unavailable(
            f"model {model_name} has no READY workers after {timeout_s:.0f} s: "
            f"{description.get('workers')}\n{self.log_tail()}"
        )

    def describe(self, model_name: str, version: str | None = None) -> dict[str, Any]:
        """TorchServe's description of a model (batchSize, maxBatchDelay, workers...)."""
        path = f"/models/{urllib.parse.quote(model_name)}"
        if version:
            path += f"/{urllib.parse.quote(version)}"
        answer = self.management.json("GET", path)
        return dict(answer[0]) if isinstance(answer, list) and answer else {}

    def models(self) -> list[dict[str, Any]]:
        """The registered models: ``[{"modelName": ..., "modelUrl": ...}]``."""
        answer = self.management.json("GET", "/models?limit=1000")
        return list(answer.get("models", [])) if isinstance(answer, dict) else []

    def unregister(self, model_name: str, version: str | None = None) -> None:
        """Unregister a model (its default version, or ``version``) and stop its workers.

        Raises:
            NotFound: No such model.
        """
        path = f"/models/{urllib.parse.quote(model_name)}"
        if version:
            path += f"/{urllib.parse.quote(version)}"
        self.management.json("DELETE", path)

    # Inference.

    def predict_rest(
        self, model_name: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> Any:
        """One prediction through the REST inference API; the handler's JSON answer."""
        return self.inference.json(
            "POST",
            f"/predictions/{urllib.parse.quote(model_name)}",
            data,
            {"Content-Type": content_type},
        )

    def grpc_client(self, timeout_s: float = 120.0) -> TorchServeGrpcClient:
        """A client of this instance's gRPC inference API, with the inference key."""
        token = self._keys.inference if self._keys else None
        return TorchServeGrpcClient(self.grpc_inference_target, token, timeout_s)

    # Internals.

    def _mar_url(self, mar: Path | str) -> str:
        text = str(mar)
        if "://" in text:
            return text
        path = Path(text)
        store = self.config.model_store.resolve()
        if path.is_absolute() or len(path.parts) > 1:
            resolved = path.resolve()
            if resolved.parent != store:
                raise InvalidInput(f"{path} is not in the model store {store}: copy it there")
            return resolved.name
        return text

    def _check_alive(self) -> None:
        if self._process is None or self._process.poll() is not None:
            code = None if self._process is None else self._process.returncode
            raise Unavailable(f"TorchServe exited (code {code}):\n{self.log_tail()}")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if self.ping():
                return
            time.sleep(0.25)
        raise Unavailable(
            f"TorchServe was not healthy after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def _wait_keys(self) -> TokenKeys:
        path = self.config.work_dir / KEY_FILE
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                return read_key_file(path)
            except (NotFound, FailedPrecondition):
                # Not written yet, or caught half-written.
                time.sleep(0.1)
        raise Unavailable(
            f"TorchServe wrote no {KEY_FILE} in {self.startup_timeout_s:.0f} s:\n{self.log_tail()}"
        )


def _torchserve_executable() -> str:
    beside = Path(sys.executable).parent / "torchserve"
    if beside.is_file():
        return str(beside)
    found = shutil.which("torchserve")
    if found is None:
        raise FailedPrecondition("the torchserve command is not installed (run `make install`)")
    return found


__all__ = [
    "KEY_FILE",
    "RestClient",
    "TokenKeys",
    "TorchServe",
    "TorchServeConfig",
    "TorchServeGrpcClient",
    "config_properties",
    "free_ports",
    "read_key_file",
    "write_config_properties",
]
