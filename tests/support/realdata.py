"""Where the real annotated data are: ``../shared/realdata`` beside the repository
(CI always has it; a user's clone may not, and the tests that need it then skip,
saying why)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REALDATA = Path(
    os.environ.get(
        "HISTOMARKER_REALDATA", Path(__file__).resolve().parents[2].parent / "shared" / "realdata"
    )
)


def realdata(sub: str) -> Path:
    """The folder ``sub`` of the real data, or skip the test with the reason."""
    folder = REALDATA / sub
    if not (folder / "index.csv").is_file() and not folder.is_dir():
        pytest.skip(f"real data absent: no {folder} (set HISTOMARKER_REALDATA to the folder)")
    return folder
