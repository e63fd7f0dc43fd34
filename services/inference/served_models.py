"""Serving stored model versions on TorchServe, and getting them back after a restart.

One code path registers a version, whoever asks (the training flows'
``register_model``, ``histomarker up``, the compose entrypoint, ``histomarker
models``): the archive ``models/{name}/{version}/{name}.mar`` is copied from the
store into TorchServe's model store folder as ``{name}-{version}.mar`` (skipped when
an identical copy is there), registered through the management API with one worker,
synchronously, made the model's default version, waited for until its workers are
READY, and then the model's other versions are unregistered. A version registered
already is only made default and waited for, so registering is idempotent.

What is deployed is recorded in the store (``serving_records``): :func:`deploy_version`
and :func:`rollback_model` write the record after the version is READY, and
:func:`restore_served` registers exactly the recorded versions on a TorchServe that
just started. Talks to TorchServe's REST management API only (no gRPC).
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from services.common.errors import HistomarkerError, InvalidInput, NotFound, Unavailable
from services.common.objectstore import ObjectStore
from services.common.objectstore.integrity import file_sha256
from services.common.settings import ServiceSettings
from services.inference.registry import archive_key, stored_models, stored_versions
from services.inference.serving_records import (
    ServingRecord,
    by_model,
    deployed,
    read_record,
    read_records,
    record_key,
    rolled_back,
    write_record,
)
from services.inference.torchserve import RestClient, read_key_file

#: Seconds to wait for a registered version's workers to be READY.
READY_TIMEOUT_S = 300.0
#: Versions registered at once by a restore (each starts a worker process).
RESTORE_PARALLELISM = 4
#: Bytes read at a time when comparing an archive with its stored checksum.

log = logging.getLogger(__name__)


class ServingSettings(ServiceSettings):
    """Where the models are stored and where TorchServe's management API is.

    The store settings are the services' own; the TorchServe ones are read from
    ``HISTOMARKER_TORCHSERVE_MANAGEMENT_URL``, ``..._MANAGEMENT_TOKEN``,
    ``..._KEY_FILE`` and ``..._MODEL_STORE`` (the flows' settings derive from these).
    """

    service_name: str = "models"
    #: TorchServe's REST management API.
    torchserve_management_url: str = "http://127.0.0.1:8081"
    #: Key of TorchServe's management API; from the environment only.
    torchserve_management_token: SecretStr | None = None
    #: TorchServe's ``key_file.json``, read for the management key when no token is set.
    torchserve_key_file: Path | None = None
    #: TorchServe's model store folder: registered archives are copied there.
    torchserve_model_store: Path = Path("model-store")

    def management_address(self) -> tuple[str, int]:
        """Host and port of the management URL (InvalidInput when malformed)."""
        parsed = urllib.parse.urlsplit(self.torchserve_management_url)
        if parsed.scheme != "http" or not parsed.hostname or parsed.port is None:
            raise InvalidInput(
                f"torchserve_management_url {self.torchserve_management_url!r} must look "
                "like http://HOST:PORT"
            )
        return parsed.hostname, parsed.port

    def secret(self, name: str) -> str | None:
        """The plain value of a secret setting, None when unset."""
        value = getattr(self, name)
        return value.get_secret_value() if value is not None else None

    def management_token(self) -> str | None:
        """The management key: the token setting, else the key file's, else None.

        Raises:
            NotFound: ``torchserve_key_file`` is set but there is no such file.
        """
        token = self.secret("torchserve_management_token")
        if token is None and self.torchserve_key_file is not None:
            token = read_key_file(self.torchserve_key_file).management
        return token

    def management_client(self, timeout_s: float = 120.0) -> RestClient:
        """A client of TorchServe's management API, with its key."""
        host, port = self.management_address()
        return RestClient(host, port, token=self.management_token(), timeout_s=timeout_s)


# TorchServe's side.


def registered_versions(client: RestClient, name: str) -> dict[str, list[dict[str, Any]]]:
    """Version -> workers of every registered version of a model ({} when none)."""
    try:
        answer = client.json("GET", f"/models/{urllib.parse.quote(name)}/all")
    except NotFound:
        return {}
    return {
        str(entry.get("modelVersion")): list(entry.get("workers") or [])
        for entry in answer or []
        if isinstance(entry, dict)
    }


def default_version(client: RestClient, name: str) -> str | None:
    """The version TorchServe answers ``/predictions/{name}`` with, None when unregistered."""
    try:
        answer = client.json("GET", f"/models/{urllib.parse.quote(name)}")
    except NotFound:
        return None
    if isinstance(answer, list) and answer and isinstance(answer[0], dict):
        return str(answer[0].get("modelVersion", "")) or None
    return None


def wait_ready(client: RestClient, name: str, version: str, timeout_s: float) -> int:
    """Wait until every worker of the version is READY; returns their count.

    Raises:
        Unavailable: Not READY in time.
    """
    deadline = time.monotonic() + timeout_s
    workers: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        workers = registered_versions(client, name).get(version, [])
        if workers and all(w.get("status") == "READY" for w in workers):
            return len(workers)
        time.sleep(0.5)
    raise Unavailable(f"{name} {version} has no READY workers after {timeout_s:.0f} s: {workers}")


def archive_file(name: str, version: str) -> str:
    """File name of a version's archive in TorchServe's model store."""
    return f"{name}-{version}.mar"


def fetch_archive(store: ObjectStore, key: str, destination: Path) -> bool:
    """Copy an archive from the store to ``destination`` unless an identical copy is
    there; returns whether it copied.

    Raises:
        NotFound: No such archive in the store.
        IntegrityError: The stored bytes do not match their checksum.
    """
    expected = store.stat(key).sha256
    if expected and destination.is_file() and file_sha256(destination) == expected:
        return False
    destination.parent.mkdir(parents=True, exist_ok=True)
    store.get_file(key, destination)
    return True


def register_version(
    client: RestClient,
    store: ObjectStore,
    model_store: Path,
    name: str,
    version: str,
    key: str,
    *,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> int:
    """Serve a stored version as the model's only version; returns its READY workers.

    Args:
        client: TorchServe's management API.
        store: The object store holding the archive.
        model_store: TorchServe's model store folder (as this process sees it).
        name: Model name.
        version: Model version (the archive's).
        key: Store key of the archive.
        ready_timeout_s: Seconds to wait for READY workers.

    Raises:
        NotFound: The archive is not in the store.
        Unavailable: TorchServe is unreachable or the workers were not READY in time.
    """
    quoted = urllib.parse.quote(name)
    if version not in registered_versions(client, name):
        archive = archive_file(name, version)
        fetch_archive(store, key, Path(model_store) / archive)
        query = urllib.parse.urlencode(
            {"url": archive, "model_name": name, "initial_workers": 1, "synchronous": "true"}
        )
        client.json("POST", f"/models?{query}")
    client.json("PUT", f"/models/{quoted}/{urllib.parse.quote(version)}/set-default")
    ready = wait_ready(client, name, version, ready_timeout_s)
    for other in registered_versions(client, name):
        if other != version:
            client.json("DELETE", f"/models/{quoted}/{urllib.parse.quote(other)}")
    return ready


def served_on_torchserve(client: RestClient) -> dict[str, dict[str, Any]]:
    """What TorchServe serves: ``{name: {"default": version, "versions": {version:
    READY workers}}}``.

    Raises:
        Unavailable: TorchServe is unreachable.
    """
    answer = client.json("GET", "/models?limit=1000")
    listed = answer.get("models", []) if isinstance(answer, dict) else []
    served: dict[str, dict[str, Any]] = {}
    for entry in listed:
        name = str(entry.get("modelName", ""))
        if not name:
            continue
        versions = {
            version: sum(1 for w in workers if w.get("status") == "READY")
            for version, workers in registered_versions(client, name).items()
        }
        served[name] = {"default": default_version(client, name), "versions": versions}
    return dict(sorted(served.items()))


# Deployments, recorded.


def require_stored(store: ObjectStore, name: str, version: str) -> str:
    """The archive key of a complete stored version.

    Raises:
        NotFound: No such model, no such version, or no archive (the message lists
            what is stored).
    """
    record_key(name)  # the name's syntax
    versions = stored_versions(store, name)
    if not versions:
        known = ", ".join(stored_models(store)) or "none"
        raise NotFound(f"no model {name!r} in the store {store.url} (stored models: {known})")
    if version not in versions:
        raise NotFound(
            f"{name} has no version {version!r} in the store (stored: {', '.join(versions)})"
        )
    key = archive_key(name, version)
    if not store.exists(key):
        raise NotFound(f"{name} {version} has no archive {key} in the store")
    return key


def record_deployment(
    store: ObjectStore, name: str, version: str, key: str, *, source: str
) -> ServingRecord:
    """Record that ``version`` of ``name`` serves now (call once it is READY)."""
    before = read_record(store, name)
    after = deployed(before, name, version, key, source=source)
    if after != before:
        write_record(store, after)
    return after


def deploy_version(
    client: RestClient,
    store: ObjectStore,
    model_store: Path,
    name: str,
    version: str,
    *,
    source: str,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> ServingRecord:
    """Serve a stored version and record it (the current one goes to history).

    Raises:
        NotFound: No such model or version in the store.
        Unavailable: TorchServe is unreachable or the version did not get READY; the
            record is left as it was.
    """
    key = require_stored(store, name, version)
    register_version(
        client, store, model_store, name, version, key, ready_timeout_s=ready_timeout_s
    )
    return record_deployment(store, name, version, key, source=source)


def rollback_model(
    client: RestClient,
    store: ObjectStore,
    model_store: Path,
    name: str,
    *,
    source: str,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> ServingRecord:
    """Serve the version a model served before its current one, and record it.

    Raises:
        NotFound: The model has no serving record, or the previous archive is gone.
        FailedPrecondition: Its record has no previous version.
        Unavailable: TorchServe is unreachable or the version did not get READY.
    """
    record = read_record(store, name)
    if record is None:
        known = ", ".join(r.model for r in read_records(store)[0]) or "none"
        raise NotFound(f"{name!r} has no serving record {record_key(name)} (recorded: {known})")
    after = rolled_back(record, source=source)
    current = after.current
    if not store.exists(current.archive_key):
        raise NotFound(
            f"cannot roll {name} back to {current.version}: its archive "
            f"{current.archive_key} is not in the store"
        )
    register_version(
        client,
        store,
        model_store,
        name,
        current.version,
        current.archive_key,
        ready_timeout_s=ready_timeout_s,
    )
    write_record(store, after)
    return after


@dataclass(frozen=True)
class RestoredModel:
    """A recorded version TorchServe serves again."""

    name: str
    version: str
    ready_workers: int


@dataclass
class RestoreReport:
    """What a restore did.

    Attributes:
        restored: The versions registered and READY, in record order.
        problems: One readable line per record that could not be served (missing
            archive, unreadable record, TorchServe refusing it); the others serve.
    """

    restored: list[RestoredModel] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "restored": [
                {"name": m.name, "version": m.version, "ready_workers": m.ready_workers}
                for m in self.restored
            ],
            "problems": list(self.problems),
        }


def restore_served(
    client: RestClient,
    store: ObjectStore,
    model_store: Path,
    *,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> RestoreReport:
    """Register every recorded version on TorchServe (after it started).

    A record that cannot be served (its archive missing from the store, say) is
    logged as a warning naming it and reported in ``problems``; the others are
    registered all the same.

    Raises:
        Unavailable: The store cannot be listed.
    """
    records, problems = read_records(store)
    for problem in problems:
        log.warning("serving record skipped: %s", problem)

    def restore(record: ServingRecord) -> RestoredModel | str:
        current = record.current
        try:
            if not store.exists(current.archive_key):
                return (
                    f"{record.key}: {record.model} {current.version} is not served: its "
                    f"archive {current.archive_key} is not in the store {store.url}"
                )
            ready = register_version(
                client,
                store,
                model_store,
                record.model,
                current.version,
                current.archive_key,
                ready_timeout_s=ready_timeout_s,
            )
            return RestoredModel(record.model, current.version, ready)
        except HistomarkerError as exc:
            return f"{record.key}: {record.model} {current.version} is not served: {exc}"
        finally:
            client.close()  # this thread's connection

    report = RestoreReport(problems=list(problems))
    if not records:
        return report
    with ThreadPoolExecutor(min(RESTORE_PARALLELISM, len(records))) as pool:
        outcomes = list(pool.map(restore, records))
    for outcome in outcomes:
        if isinstance(outcome, RestoredModel):
            report.restored.append(outcome)
            log.info("restored %s %s", outcome.name, outcome.version)
        else:
            report.problems.append(outcome)
            log.warning("%s", outcome)
    return report


def models_overview(
    store: ObjectStore, served: dict[str, dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """One entry per model that is stored, recorded or served: its recorded version
    and history, its stored versions and, given ``served``, what TorchServe serves.

    Raises:
        Unavailable: The store cannot be reached.
    """
    records = by_model(read_records(store)[0])
    stored = stored_models(store)
    names = sorted({*records, *stored, *(served or {})})
    overview = []
    for name in names:
        record = records.get(name)
        entry: dict[str, Any] = {
            "name": name,
            "recorded": record.version if record else None,
            "deployed_at": record.current.deployed_at if record else None,
            "source": record.current.source if record else None,
            "history": [old.version for old in record.history] if record else [],
            "stored_versions": stored.get(name, []),
        }
        if served is not None:
            on = served.get(name)
            entry["served"] = on["default"] if on else None
            entry["served_versions"] = on["versions"] if on else {}
            entry["in_sync"] = (
                record is not None
                and on is not None
                and list(on["versions"]) == [record.version]
                and on["versions"][record.version] > 0
            )
        overview.append(entry)
    return overview


__all__ = [
    "READY_TIMEOUT_S",
    "RestoreReport",
    "RestoredModel",
    "ServingSettings",
    "archive_file",
    "default_version",
    "deploy_version",
    "fetch_archive",
    "models_overview",
    "record_deployment",
    "register_version",
    "registered_versions",
    "require_stored",
    "restore_served",
    "rollback_model",
    "served_on_torchserve",
    "wait_ready",
]
