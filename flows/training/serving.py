"""Registering a stored model version on TorchServe, and recording it.

The registration itself is ``services.inference.served_models.register_version`` (the
one code path ``histomarker up`` and ``histomarker models`` use too): the archive is
copied into TorchServe's model store folder as ``{name}-{version}.mar``, registered
with one worker, made the default version, and once READY the model's other versions
are unregistered. Then the version is recorded in the store's serving record
(``serving/{name}.json``), so that TorchServe gets it back after a restart.
Registering a version that is registered already only waits for it to be READY, so
the task is idempotent; it is not cached, because its effect lives in TorchServe,
which may have restarted since.
"""

from __future__ import annotations

from prefect import get_run_logger

from flows.runtime.clients import torchserve_management
from flows.runtime.policy import pipeline_task
from flows.runtime.records import ModelRef, Registration
from flows.runtime.settings import FlowSettings
from services.inference.served_models import (
    READY_TIMEOUT_S,
    record_deployment,
    register_version,
)

__all__ = ["READY_TIMEOUT_S", "register_and_record", "register_model"]

#: What the serving records name as having deployed a version registered here.
SOURCE = "train_pipeline"


@pipeline_task(cached=False, task_run_name="register-{model.name}")
def register_model(model: ModelRef) -> Registration:
    """Serve a stored model version on TorchServe as the model's default version,
    and record it as the model's deployed version."""
    return register_and_record(model.name, model.version, model.archive_key, SOURCE)


def register_and_record(name: str, version: str, archive_key: str, source: str) -> Registration:
    """Register a stored version on TorchServe as the model's default, wait for it to
    be READY, and record it as deployed by ``source`` (in a flow run: logs there)."""
    settings = FlowSettings()
    client = torchserve_management(settings)
    try:
        with settings.open_store() as store:
            ready = register_version(
                client,
                store,
                settings.torchserve_model_store,
                name,
                version,
                archive_key,
                ready_timeout_s=READY_TIMEOUT_S,
            )
            record = record_deployment(store, name, version, archive_key, source=source)
    finally:
        client.close()
    get_run_logger().info(
        "%s %s serves with %d READY worker(s); recorded in %s", name, version, ready, record.key
    )
    return Registration(name=name, version=version, ready_workers=ready)
