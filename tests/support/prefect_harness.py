"""A Prefect API for flow tests: Prefect's test harness, once per session.

The integration conftest imports :func:`prefect_home` to offer it as a fixture
(``from prefect_harness import prefect_home``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Prefect's test harness with its home, results and database in a temp folder."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PREFECT_HOME", str(home))
        env.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        env.setenv("DO_NOT_TRACK", "1")
        updates: dict[Any, Any] = {
            PREFECT_HOME: home,
            PREFECT_LOCAL_STORAGE_PATH: home / "storage",
            PREFECT_SERVER_ANALYTICS_ENABLED: False,
        }
        with temporary_settings(updates=updates), prefect_test_harness(server_startup_timeout=180):
            yield home


def latest_artifacts(keys: list[str]) -> dict[str, Any]:
    """The data of the newest artifact under each key the harness's API holds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))
        )
    return {a.key: a.data for a in found if a.key is not None}
