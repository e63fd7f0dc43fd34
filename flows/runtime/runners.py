"""What runs a flow's per-slide fan-out: threads, or a Dask cluster.

A flow's task runner is fixed when it is decorated; the flows that fan out per slide
(``preprocess``, ``predict_slides``) keep threads there, and their callers wrap them
with :func:`with_fanout_runner` at run time, so the choice is a setting
(``HISTOMARKER_TASK_RUNNER``, ``HISTOMARKER_DASK_ADDRESS``) that ``flows serve``
hands to every flow run through the environment.

On Dask, each task runs in a worker process (cloudpickled by reference to its
module, so the workers need this package installed) and reports its state to the
same Prefect API; a local cluster's workers inherit the flow run's environment,
while a remote cluster's workers need the ``HISTOMARKER_*`` settings themselves.
"""

from __future__ import annotations

from typing import Any, ParamSpec, TypeVar

from prefect import Flow
from prefect.task_runners import TaskRunner

from flows.runtime.settings import FlowSettings

P = ParamSpec("P")
R = TypeVar("R")

#: Local clusters bind the loopback interface only and serve no dashboard.
LOCAL_CLUSTER_HOST = "127.0.0.1"


def fanout_task_runner(settings: FlowSettings) -> TaskRunner[Any] | None:
    """The Dask task runner the settings ask for; None for threads (the flow's own).

    A local cluster has ``dask_workers`` worker processes with one thread each, on
    127.0.0.1; with ``dask_address`` the runner connects to that scheduler instead.
    """
    if settings.task_runner == "thread":
        return None
    from prefect_dask import DaskTaskRunner  # heavy: imported only when asked for

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": settings.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": LOCAL_CLUSTER_HOST,
            "dashboard_address": None,
        }
    )


def with_fanout_runner(flow: Flow[P, R], settings: FlowSettings | None = None) -> Flow[P, R]:
    """``flow`` on the fan-out task runner of the settings (itself for threads)."""
    runner = fanout_task_runner(settings or FlowSettings())
    if runner is None:
        return flow
    return flow.with_options(task_runner=runner)
