"""Serving records: which stored version of each model TorchServe must serve.

TorchServe forgets its models when it stops, so the deployed version of each model
is state in the object store: one small JSON document per model at
``serving/{model_name}.json`` (:func:`record_key`), written whole (the store's puts
are atomic) each time a version is registered and READY. Whatever starts TorchServe
(``histomarker up``, the compose entrypoint, ``histomarker models restore``) reads
them back and registers exactly these versions.

A record::

    {
      "schema": 1,
      "model": "biomarker_er",
      "current": {"version": "3f2a...",
                  "archive_key": "models/biomarker_er/3f2a.../biomarker_er.mar",
                  "deployed_at": "2025-05-01T10:00:00+00:00", "source": "train_pipeline"},
      "history": [{"version": "91c0...", ...}, ...]
    }

``history`` holds the previously deployed versions, most recent first, at most
:data:`HISTORY_LIMIT`; deploying a version pushes the current one onto it, and a
rollback pops its first entry back into ``current`` (the version rolled back from is
dropped; it stays in the store and can be deployed again). Logic only: the store
is the one given, TorchServe is not touched here (see ``served_models``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from services.common.errors import FailedPrecondition, HistomarkerError, InvalidInput, NotFound
from services.common.objectstore import ObjectStore, validate_key

#: Store prefix of the serving records.
SERVING_PREFIX = "serving/"
#: Format version of a record.
SCHEMA = 1
#: Previous versions a record remembers for rollbacks.
HISTORY_LIMIT = 10
#: Content type the records are stored with.
CONTENT_TYPE = "application/json"


def record_key(model_name: str) -> str:
    """Store key of a model's serving record: ``serving/{model_name}.json``.

    Raises:
        InvalidInput: The name cannot be part of a key (``/``, ``..``, empty...).
    """
    if not model_name or "/" in model_name:
        raise InvalidInput(f"model name {model_name!r} cannot name a serving record")
    key = f"{SERVING_PREFIX}{model_name}.json"
    validate_key(key)
    return key


def now_utc() -> str:
    """The current time as an ISO 8601 string in UTC (seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ServedVersion:
    """One deployment of a model version.

    Attributes:
        version: The model version (``models/{name}/{version}/``).
        archive_key: Store key of its ``.mar``.
        deployed_at: When it was registered and READY, ISO 8601 UTC.
        source: What deployed it (``train_pipeline``, ``models deploy``,
            ``models rollback``...).
    """

    version: str
    archive_key: str
    deployed_at: str
    source: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "version": self.version,
            "archive_key": self.archive_key,
            "deployed_at": self.deployed_at,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: Any) -> ServedVersion:
        if not isinstance(data, dict):
            raise TypeError(f"a served version is an object, got {type(data).__name__}")
        version, archive_key = data["version"], data["archive_key"]
        if not isinstance(version, str) or not version:
            raise ValueError(f"bad version {version!r}")
        if not isinstance(archive_key, str):
            raise ValueError(f"bad archive_key {archive_key!r}")
        validate_key(archive_key)
        return cls(
            version=version,
            archive_key=archive_key,
            deployed_at=str(data.get("deployed_at", "")),
            source=str(data.get("source", "")),
        )


@dataclass(frozen=True)
class ServingRecord:
    """The version of one model TorchServe serves, and the ones it served before.

    Attributes:
        model: The model's TorchServe name (``cancer_detector``, ``biomarker_tp53``...).
        current: The version to serve.
        history: Previously served versions, most recent first.
    """

    model: str
    current: ServedVersion
    history: tuple[ServedVersion, ...] = field(default_factory=tuple)

    @property
    def key(self) -> str:
        return record_key(self.model)

    @property
    def version(self) -> str:
        return self.current.version

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "current": self.current.to_json(),
            "history": [entry.to_json() for entry in self.history],
        }

    def encode(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2) + "\n").encode("utf-8")

    @classmethod
    def decode(cls, data: bytes, key: str = "") -> ServingRecord:
        """Parse a stored record.

        Raises:
            FailedPrecondition: Not a serving record (the message names ``key``).
        """
        where = key or "serving record"
        try:
            parsed = json.loads(data)
            if not isinstance(parsed, dict):
                raise TypeError("not a JSON object")
            if parsed.get("schema") != SCHEMA:
                raise ValueError(f"unknown schema {parsed.get('schema')!r}")
            model = parsed["model"]
            if not isinstance(model, str) or not model:
                raise ValueError(f"bad model name {model!r}")
            history = parsed.get("history", [])
            if not isinstance(history, list):
                raise TypeError("history is not a list")
            record = cls(
                model=model,
                current=ServedVersion.from_json(parsed["current"]),
                history=tuple(ServedVersion.from_json(entry) for entry in history),
            )
        except (KeyError, TypeError, ValueError, HistomarkerError) as exc:
            raise FailedPrecondition(f"{where} is not a serving record: {exc}") from exc
        if key and key != record.key:
            raise FailedPrecondition(f"{key} holds the record of another model ({model})")
        return record


def deployed(
    record: ServingRecord | None,
    model: str,
    version: str,
    archive_key: str,
    *,
    source: str,
    at: str | None = None,
) -> ServingRecord:
    """The record once ``version`` is deployed: the current version goes to history.

    Deploying the version already current returns ``record`` unchanged (the flows
    re-register on every run). A version deployed again leaves the history only once.

    Args:
        record: The model's record, None when it has none yet.
        model: The model's name.
        version: The version now serving.
        archive_key: Store key of its ``.mar``.
        source: What deployed it.
        at: When, ISO 8601; now by default.
    """
    if record is not None and record.model != model:
        raise FailedPrecondition(f"the record of {record.model} cannot deploy {model}")
    entry = ServedVersion(version, archive_key, at or now_utc(), source)
    if record is None:
        return ServingRecord(model, entry)
    if record.current.version == version:
        return record
    earlier = [old for old in record.history if old.version != version]
    history = (record.current, *earlier)[:HISTORY_LIMIT]
    return ServingRecord(model, entry, history)


def rolled_back(record: ServingRecord, *, source: str, at: str | None = None) -> ServingRecord:
    """The record once the previous version serves again (popped from history).

    Raises:
        FailedPrecondition: The record has no previous version.
    """
    if not record.history:
        raise FailedPrecondition(
            f"{record.model} has no previous version to roll back to "
            f"(it serves {record.version}, its first recorded version)"
        )
    previous, *rest = record.history
    current = replace(previous, deployed_at=at or now_utc(), source=source)
    return ServingRecord(record.model, current, tuple(rest))


# The records in the store.


def read_record(store: ObjectStore, model: str) -> ServingRecord | None:
    """A model's record, None when it has none.

    Raises:
        FailedPrecondition: The stored object is not a serving record.
        Unavailable: The store cannot be reached.
    """
    key = record_key(model)
    try:
        data = store.get_bytes(key)
    except NotFound:
        return None
    return ServingRecord.decode(data, key)


def write_record(store: ObjectStore, record: ServingRecord) -> str:
    """Store a record (atomically: readers see the old one or the new one); its key."""
    store.put_bytes(record.key, record.encode(), content_type=CONTENT_TYPE)
    return record.key


def record_keys(store: ObjectStore) -> list[str]:
    """Keys of every serving record in the store, sorted."""
    return [
        info.key
        for info in store.list(SERVING_PREFIX, recursive=False)
        if info.key.endswith(".json")
    ]


def read_records(store: ObjectStore) -> tuple[list[ServingRecord], list[str]]:
    """Every serving record in the store, and a line per object that is not one.

    Raises:
        Unavailable: The store cannot be reached.
    """
    records: list[ServingRecord] = []
    problems: list[str] = []
    for key in record_keys(store):
        try:
            records.append(ServingRecord.decode(store.get_bytes(key), key))
        except NotFound:
            continue  # deleted since listed
        except HistomarkerError as exc:
            problems.append(str(exc))
    return records, problems


def by_model(records: Iterable[ServingRecord]) -> dict[str, ServingRecord]:
    """Records by model name."""
    return {record.model: record for record in records}


__all__ = [
    "HISTORY_LIMIT",
    "SERVING_PREFIX",
    "ServedVersion",
    "ServingRecord",
    "by_model",
    "deployed",
    "read_record",
    "read_records",
    "record_keys",
    "rolled_back",
    "write_record",
]
