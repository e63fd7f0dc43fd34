"""TorchServe's key file, read again when TorchServe writes new keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from services.common.errors import NotFound
from services.inference.torchserve import KeyFile, token_now


def _write(path: Path, inference: str, management: str, mtime_ns: int) -> None:
    keys = {"inference": {"key": inference}, "management": {"key": management}}
    path.write_text(json.dumps(keys))
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_new_keys_are_read_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "key_file.json"
    _write(path, "inf-1", "man-1", 1_000_000_000)
    keys = KeyFile(path)
    assert (token_now(keys.inference), token_now(keys.management)) == ("inf-1", "man-1")
    _write(path, "inf-2", "man-2", 2_000_000_000)  # TorchServe restarted
    assert (token_now(keys.inference), token_now(keys.management)) == ("inf-2", "man-2")


def test_a_half_written_or_missing_file_keeps_the_last_keys(tmp_path: Path) -> None:
    path = tmp_path / "key_file.json"
    _write(path, "inf-1", "man-1", 1_000_000_000)
    keys = KeyFile(path)
    path.write_text('{"inference": ')
    assert keys.inference() == "inf-1"
    path.unlink()
    assert keys.management() == "man-1"
    _write(path, "inf-3", "man-3", 3_000_000_000)
    assert keys.inference() == "inf-3"


def test_no_key_file_at_first_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no TorchServe key file"):
        KeyFile(tmp_path / "key_file.json")


def test_a_plain_key_is_sent_as_it_is() -> None:
    assert token_now("abc") == "abc" and token_now(None) is None
