"""Registering a stored model version on TorchServe.

The archive is copied from the store into TorchServe's model store folder as
``{name}-{version}.mar`` and registered through the management API with one
worker; the new version becomes the default, and once its workers are READY the
model's other versions are unregistered (their workers stopped). Registering a
version that is registered already only waits for it to be READY, so the task is
idempotent; it is not cached, because its effect lives in TorchServe, which may
have restarted since.
"""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

from prefect import get_run_logger

from flows.clients import torchserve_management
from flows.policy import pipeline_task
from flows.records import ModelRef, Registration
from flows.settings import FlowSettings
from services.common.errors import NotFound, Unavailable
from services.inference.torchserve import RestClient

#: Seconds to wait for a registered version's workers to be READY.
READY_TIMEOUT_S = 300.0


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


@pipeline_task(cached=False, task_run_name="register-{model.name}")
def register_model(model: ModelRef) -> Registration:
    """Serve a stored model version on TorchServe as the model's default version."""
    settings = FlowSettings()
    client = torchserve_management(settings)
    name, version = model.name, model.version
    quoted = urllib.parse.quote(name)
    try:
        if version not in registered_versions(client, name):
            archive = f"{name}-{version}.mar"
            folder = settings.torchserve_model_store
            folder.mkdir(parents=True, exist_ok=True)
            with settings.open_store() as store:
                store.get_file(model.archive_key, folder / archive)
            query = urllib.parse.urlencode(
                {
                    "url": archive,
                    "model_name": name,
                    "initial_workers": 1,
                    "synchronous": "true",
                }
            )
            client.json("POST", f"/models?{query}")
        client.json("PUT", f"/models/{quoted}/{urllib.parse.quote(version)}/set-default")
        ready = wait_ready(client, name, version, READY_TIMEOUT_S)
        for other in registered_versions(client, name):
            if other != version:
                client.json("DELETE", f"/models/{quoted}/{urllib.parse.quote(other)}")
    finally:
        client.close()
    get_run_logger().info("%s %s serves with %d READY worker(s)", name, version, ready)
    return Registration(name=name, version=version, ready_workers=ready)
