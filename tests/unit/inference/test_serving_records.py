"""Serving records: their format, deploy/rollback transitions and store I/O (file:// store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition, InvalidInput, NotFound
from services.common.objectstore import ObjectStore, open_store
from services.inference.registry import (
    COMPLETE_MARKER,
    archive_key,
    stored_models,
    stored_versions,
)
from services.inference.served_models import (
    ServingSettings,
    models_overview,
    record_deployment,
    require_stored,
)
from services.inference.serving_records import (
    HISTORY_LIMIT,
    ServedVersion,
    ServingRecord,
    deployed,
    read_record,
    read_records,
    record_key,
    rolled_back,
    write_record,
)

AT = "2025-05-01T10:00:00+00:00"


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return open_store((tmp_path / "store").as_uri())


def _stored(store: ObjectStore, name: str, *versions: str) -> None:
    """Complete stored versions: an archive and ``model.json`` each."""
    for version in versions:
        store.put_bytes(archive_key(name, version), b"mar " + version.encode())
        store.put_bytes(f"models/{name}/{version}/{COMPLETE_MARKER}", b"{}")


def _record(*versions: str) -> ServingRecord:
    """The record after deploying ``versions`` in order."""
    record = None
    for version in versions:
        record = deployed(
            record, "biomarker_er", version, archive_key("biomarker_er", version), source="t"
        )
    assert record is not None
    return record


def test_key_is_serving_model_json() -> None:
    assert record_key("biomarker_er") == "serving/biomarker_er.json"
    for bad in ("", "a/b", "../x", "x\n"):
        with pytest.raises(InvalidInput):
            record_key(bad)


def test_first_deployment_has_no_history() -> None:
    record = deployed(None, "cancer_detector", "v1", "models/cancer_detector/v1/x.mar", source="s")
    assert record.model == "cancer_detector" and record.version == "v1"
    assert record.current.archive_key == "models/cancer_detector/v1/x.mar"
    assert record.current.source == "s" and record.current.deployed_at.endswith("+00:00")
    assert record.history == ()


def test_deploying_pushes_the_current_version_onto_history() -> None:
    record = _record("1", "2", "3")
    assert record.version == "3"
    assert [old.version for old in record.history] == ["2", "1"]


def test_redeploying_the_current_version_changes_nothing() -> None:
    record = _record("1", "2")
    assert deployed(record, "biomarker_er", "2", "k", source="again") is record


def test_a_version_deployed_again_is_in_history_once() -> None:
    record = _record("1", "2", "1")
    assert record.version == "1"
    assert [old.version for old in record.history] == ["2"]


def test_history_is_bounded() -> None:
    record = _record(*[str(v) for v in range(HISTORY_LIMIT + 5)])
    assert len(record.history) == HISTORY_LIMIT
    assert record.history[0].version == str(HISTORY_LIMIT + 3)


def test_rollback_pops_the_previous_version() -> None:
    record = rolled_back(_record("1", "2", "3"), source="models rollback", at=AT)
    assert record.version == "2" and record.current.deployed_at == AT
    assert record.current.source == "models rollback"
    assert [old.version for old in record.history] == ["1"]
    again = rolled_back(record, source="r")
    assert again.version == "1" and again.history == ()
    with pytest.raises(FailedPrecondition, match="no previous version"):
        rolled_back(again, source="r")


def test_another_models_record_cannot_deploy() -> None:
    with pytest.raises(FailedPrecondition):
        deployed(_record("1"), "cancer_detector", "1", "k", source="s")


def test_json_round_trip_and_format() -> None:
    record = _record("1", "2")
    data = json.loads(record.encode())
    assert data["schema"] == 1 and data["model"] == "biomarker_er"
    assert set(data["current"]) == {"version", "archive_key", "deployed_at", "source"}
    assert [entry["version"] for entry in data["history"]] == ["1"]
    assert ServingRecord.decode(record.encode(), record.key) == record


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"schema": 2, "model": "m", "current": {}}',
        b'{"schema": 1, "model": "m"}',
        b'{"schema": 1, "model": "m", "current": {"version": "", "archive_key": "k"}}',
        b'{"schema": 1, "model": "m", "current": {"version": "1", "archive_key": "../k"}}',
        b'{"schema": 1, "model": "m", "current": {"version": "1", "archive_key": "k"}, '
        b'"history": {}}',
    ],
)
def test_malformed_records_are_refused_naming_the_key(data: bytes) -> None:
    with pytest.raises(FailedPrecondition, match=r"serving/m\.json"):
        ServingRecord.decode(data, "serving/m.json")


def test_a_record_under_another_models_key_is_refused() -> None:
    with pytest.raises(FailedPrecondition, match="another model"):
        ServingRecord.decode(_record("1").encode(), "serving/cancer_detector.json")


def test_records_in_the_store(store: ObjectStore) -> None:
    assert read_record(store, "biomarker_er") is None
    assert read_records(store) == ([], [])
    record = _record("1", "2")
    assert write_record(store, record) == "serving/biomarker_er.json"
    assert read_record(store, "biomarker_er") == record
    store.put_bytes("serving/broken.json", b"{")
    store.put_bytes("serving/notes.txt", b"not a record")
    store.put_bytes("serving/nested/x.json", b"{}")
    records, problems = read_records(store)
    assert records == [record]
    assert len(problems) == 1 and "serving/broken.json" in problems[0]


def test_record_deployment_writes_only_changes(store: ObjectStore) -> None:
    first = record_deployment(
        store, "biomarker_er", "1", archive_key("biomarker_er", "1"), source="a"
    )
    modified = store.stat(first.key).etag
    again = record_deployment(
        store, "biomarker_er", "1", archive_key("biomarker_er", "1"), source="b"
    )
    assert again == first and store.stat(first.key).etag == modified
    second = record_deployment(
        store, "biomarker_er", "2", archive_key("biomarker_er", "2"), source="c"
    )
    assert read_record(store, "biomarker_er") == second
    assert [old.version for old in second.history] == ["1"]


def test_stored_versions(store: ObjectStore) -> None:
    from services.inference.bundle import CONFIG_FILE

    assert COMPLETE_MARKER == CONFIG_FILE
    _stored(store, "biomarker_er", "2", "1")
    _stored(store, "cancer_detector", "a")
    store.put_bytes(archive_key("biomarker_er", "3"), b"no model.json: incomplete")
    assert stored_versions(store, "biomarker_er") == ["1", "2"]
    assert stored_versions(store, "biomarker_e") == []
    assert stored_models(store) == {"biomarker_er": ["1", "2"], "cancer_detector": ["a"]}
    assert archive_key("biomarker_er", "2") == "models/biomarker_er/2/biomarker_er.mar"


def test_require_stored_names_what_is_there(store: ObjectStore) -> None:
    _stored(store, "biomarker_er", "1")
    assert require_stored(store, "biomarker_er", "1") == archive_key("biomarker_er", "1")
    with pytest.raises(NotFound, match=r"no model 'nope' .*stored models: biomarker_er"):
        require_stored(store, "nope", "1")
    with pytest.raises(NotFound, match=r"no version '9' .*stored: 1"):
        require_stored(store, "biomarker_er", "9")
    store.put_bytes("models/biomarker_er/2/model.json", b"{}")
    with pytest.raises(NotFound, match="no archive"):
        require_stored(store, "biomarker_er", "2")
    with pytest.raises(InvalidInput):
        require_stored(store, "../x", "1")


def test_overview_joins_records_store_and_torchserve(store: ObjectStore) -> None:
    _stored(store, "biomarker_er", "1", "2")
    _stored(store, "cancer_detector", "1")
    write_record(store, _record("1", "2"))
    without = {m["name"]: m for m in models_overview(store, None)}
    assert without["biomarker_er"]["recorded"] == "2"
    assert without["biomarker_er"]["history"] == ["1"]
    assert without["biomarker_er"]["stored_versions"] == ["1", "2"]
    assert without["cancer_detector"]["recorded"] is None
    assert "served" not in without["biomarker_er"]
    served = {
        "biomarker_er": {"default": "2", "versions": {"2": 1}},
        "other": {"default": "x", "versions": {"x": 0}},
    }
    overview = {m["name"]: m for m in models_overview(store, served)}
    assert overview["biomarker_er"]["served"] == "2" and overview["biomarker_er"]["in_sync"]
    assert overview["cancer_detector"]["served"] is None
    assert not overview["cancer_detector"]["in_sync"]
    assert overview["other"]["recorded"] is None and not overview["other"]["in_sync"]


def test_served_version_refuses_bad_archive_keys() -> None:
    with pytest.raises(InvalidInput):
        ServedVersion.from_json({"version": "1", "archive_key": "/abs"})


def test_settings_read_the_management_key_from_the_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MANAGEMENT_URL", "MANAGEMENT_TOKEN", "KEY_FILE", "MODEL_STORE"):
        monkeypatch.delenv(f"HISTOMARKER_TORCHSERVE_{name}", raising=False)
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "i"}, "management": {"key": "m"}}))
    settings = ServingSettings(torchserve_key_file=key_file)
    assert settings.management_token() == "m"
    assert settings.management_address() == ("127.0.0.1", 8081)
    monkeypatch.setenv("HISTOMARKER_TORCHSERVE_MANAGEMENT_TOKEN", "from-env")
    assert ServingSettings(torchserve_key_file=key_file).management_token() == "from-env"
    with pytest.raises(InvalidInput):
        ServingSettings(torchserve_management_url="localhost:8081").management_address()
    with pytest.raises(NotFound):
        ServingSettings(
            torchserve_management_token=None, torchserve_key_file=tmp_path / "none.json"
        ).management_token()
