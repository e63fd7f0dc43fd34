"""``histomarker models`` without TorchServe: the records, and its bad input.

The commands that reach TorchServe are tested against a real one in
tests/integration/deploy/test_served_models.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import main
from services.common.objectstore import ObjectStore, open_store
from services.inference.registry import COMPLETE_MARKER, archive_key
from services.inference.serving_records import deployed, read_record, write_record


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    """A file:// store with biomarker_er 1 recorded; no stack, no TorchServe settings."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no stack in the default folder
    for name in ("MANAGEMENT_URL", "MANAGEMENT_TOKEN", "KEY_FILE", "MODEL_STORE"):
        monkeypatch.delenv(f"HISTOMARKER_TORCHSERVE_{name}", raising=False)
    store = open_store((tmp_path / "store").as_uri())
    for version in ("1", "2"):
        store.put_bytes(archive_key("biomarker_er", version), b"mar")
        store.put_bytes(f"models/biomarker_er/{version}/{COMPLETE_MARKER}", b"{}")
    key = archive_key("biomarker_er", "1")
    write_record(store, deployed(None, "biomarker_er", "1", key, source="test"))
    return store


def _run(
    capsys: pytest.CaptureFixture[str], store: ObjectStore, *argv: str
) -> tuple[int, str, str]:
    code = main(["models", *argv, "--store-url", store.url])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_the_records_without_torchserve(
    store: ObjectStore, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, store, "list", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["torchserve"] is None
    (model,) = result["models"]
    assert model["name"] == "biomarker_er" and model["recorded"] == "1"
    assert model["stored_versions"] == ["1", "2"] and "served" not in model

    code, out, _ = _run(capsys, store, "list")
    assert code == 0
    assert "torchserve: none given" in out
    assert any(line.split()[:2] == ["biomarker_er", "1"] for line in out.splitlines())


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["deploy", "biomarker_nope", "1"], "no model 'biomarker_nope'"),
        (["deploy", "biomarker_er", "9"], "no version '9'"),
        (["deploy", "../x", "1"], "model name"),
        (["rollback", "biomarker_er"], "no previous version"),
        (["rollback", "cancer_detector"], "has no serving record"),
    ],
)
def test_bad_models_exit_2_with_one_line(
    store: ObjectStore, capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    # TorchServe's address is given but nothing listens there: the input is refused first.
    code, out, err = _run(capsys, store, *argv, "--management-url", "http://127.0.0.1:9")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("histomarker models: ") and words in lines[0]
    record = read_record(store, "biomarker_er")
    assert record is not None and record.version == "1"  # unchanged


def test_a_stack_folder_without_a_stack_exits_2(
    store: ObjectStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, store, "list", "--dir", str(tmp_path / "nothing"))
    assert code == 2 and "no stack runs in" in err


def test_torchserve_down_is_a_failure_not_bad_input(
    store: ObjectStore, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, store, "deploy", "biomarker_er", "2")
    assert code == 1 and out == ""
    assert "unreachable" in err and "--dir" in err and len(err.strip().splitlines()) == 1
    code, out, _ = _run(capsys, store, "list", "--json", "--management-url", "http://127.0.0.1:9")
    assert code == 1
    result = json.loads(out)
    assert "unreachable" in result["torchserve_error"]
    assert result["models"][0]["recorded"] == "1"
