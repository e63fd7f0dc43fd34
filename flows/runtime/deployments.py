"""The scheduled deployments and ``histomarker flows serve``.

Two deployments, served by one process (Prefect's ``serve``: the process polls the
API for scheduled runs and runs each in a subprocess):

- ``train_pipeline/scheduled-training``: on a cron schedule (weekly by default,
  Sunday 03:00), with the cohort's manifest path and name as parameters. Without a
  manifest and cohort it is registered with no schedule (run it by hand, giving
  them).
- ``predict_batch/inbox-predictions``: every ``interval_s`` seconds (10 minutes by
  default), over the inbox prefix of the settings.

Each runs one flow run at a time (a concurrency limit of 1): a long training run or
batch is not joined by the next scheduled one.

The API: ``PREFECT_API_URL`` when set (a Prefect server, e.g. compose's); otherwise
an embedded server, started here on 127.0.0.1 with a free port and its database in
``PREFECT_HOME``, with telemetry off, and stopped on the way out. SIGTERM or SIGINT
stops the runner (in-flight runs are cancelled, the schedules paused) and then the
embedded server: nothing is left running.

The fan-out runner (threads or Dask) is a setting handed to the flow runs through
the environment (see :mod:`flows.runtime.runners`).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

from flows.runtime.prefect_server import TELEMETRY_OFF, EmbeddedPrefectServer
from flows.runtime.settings import FlowSettings
from services.common.errors import InvalidInput
from services.common.processes import environment

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

TRAIN_DEPLOYMENT = "scheduled-training"
PREDICT_DEPLOYMENT = "inbox-predictions"

Report = Callable[[str], None]


@dataclass(frozen=True)
class ServeOptions:
    """What ``flows serve`` serves.

    Attributes:
        cron: Cron schedule of the training deployment.
        interval_s: Seconds between batch predictions.
        manifest_path: The cohort manifest to train on; None leaves training
            unscheduled.
        cohort_name: Its name in the store (given with ``manifest_path``).
        inbox_prefix: Where ``predict_batch`` looks for slides.
        task_runner: ``thread`` or ``dask``, for the per-slide fan-out.
        dask_address: A Dask scheduler; None starts a local cluster per flow run.
    """

    cron: str
    interval_s: float
    manifest_path: Path | None
    cohort_name: str | None
    inbox_prefix: str
    task_runner: str
    dask_address: str | None

    @property
    def train_scheduled(self) -> bool:
        return self.manifest_path is not None

    def environment(self) -> dict[str, str]:
        """The settings every flow run must see (the fan-out runner)."""
        env = {"HISTOMARKER_TASK_RUNNER": self.task_runner}
        if self.dask_address:
            env["HISTOMARKER_DASK_ADDRESS"] = self.dask_address
        return env


def serve_options(
    settings: FlowSettings | None = None,
    *,
    cron: str | None = None,
    interval_s: float | None = None,
    manifest_path: str | None = None,
    cohort_name: str | None = None,
    task_runner: str | None = None,
    dask_address: str | None = None,
) -> ServeOptions:
    """The options: each given value, else the settings' (``HISTOMARKER_*``).

    Raises:
        InvalidInput: A malformed cron, an interval <= 0, a manifest without a cohort
            (or the other way round), a missing manifest file, an unknown task runner,
            or a Dask address with the thread runner.
    """
    from prefect.client.schemas.schedules import CronSchedule

    settings = settings or FlowSettings()
    cron = cron if cron is not None else settings.train_cron
    try:
        CronSchedule(cron=cron)
    except ValueError as error:
        raise InvalidInput(f"cron {cron!r} is not a valid cron schedule") from error
    interval_s = interval_s if interval_s is not None else settings.predict_interval_s
    if not interval_s > 0:
        raise InvalidInput(f"the prediction interval must be > 0 s, got {interval_s}")
    manifest = manifest_path if manifest_path is not None else settings.train_manifest
    cohort = cohort_name if cohort_name is not None else settings.train_cohort
    if (manifest is None) != (cohort is None):
        raise InvalidInput("give the training manifest and the cohort name together")
    path = Path(manifest).expanduser().resolve() if manifest is not None else None
    if path is not None and not path.is_file():
        raise InvalidInput(f"no cohort manifest {str(path)!r}")
    runner = task_runner or settings.task_runner
    if runner not in {"thread", "dask"}:
        raise InvalidInput(f"task runner {runner!r}: use thread or dask")
    address = dask_address if dask_address is not None else settings.dask_address
    if address and runner != "dask":
        raise InvalidInput("a Dask address needs the dask task runner (--task-runner dask)")
    return ServeOptions(
        cron=cron,
        interval_s=float(interval_s),
        manifest_path=path,
        cohort_name=cohort,
        inbox_prefix=settings.predict_inbox_prefix,
        task_runner=runner,
        dask_address=address or None,
    )


def build_deployments(options: ServeOptions) -> list[RunnerDeployment]:
    """The training and batch-prediction deployments (not yet registered)."""
    from prefect.types.entrypoint import EntrypointType

    from flows.batch.predict import predict_batch
    from flows.training.pipeline import train_pipeline

    tags = ["histomarker"]
    # Module entrypoints: the runs import the installed package, wherever they start.
    if options.train_scheduled:
        train = train_pipeline.to_deployment(
            TRAIN_DEPLOYMENT,
            cron=options.cron,
            parameters={
                "manifest_path": str(options.manifest_path),
                "cohort_name": options.cohort_name,
            },
            concurrency_limit=1,
            description=f"Train and analyse cohort {options.cohort_name!r} on {options.cron!r}.",
            tags=[*tags, "training"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    else:
        train = train_pipeline.to_deployment(
            TRAIN_DEPLOYMENT,
            concurrency_limit=1,
            description="Train and analyse a cohort; no schedule (no manifest was given).",
            tags=[*tags, "training"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    predict = predict_batch.to_deployment(
        PREDICT_DEPLOYMENT,
        interval=timedelta(seconds=options.interval_s),
        parameters={"inbox_prefix": options.inbox_prefix},
        concurrency_limit=1,
        description=f"Predict new slides under {options.inbox_prefix!r}.",
        tags=[*tags, "prediction"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    # to_deployment dispatches sync/async; called from sync code it returns the object.
    return [cast("RunnerDeployment", train), cast("RunnerDeployment", predict)]


def describe(deployments: list[RunnerDeployment]) -> list[dict[str, Any]]:
    """Name, schedules and parameters of each deployment, as JSON values."""
    described = []
    for deployment in deployments:
        schedules = []
        for item in deployment.schedules or []:
            schedule = item.schedule
            if getattr(schedule, "cron", None):
                schedules.append(f"cron {schedule.cron}")  # type: ignore[union-attr]
            elif getattr(schedule, "interval", None):
                seconds = schedule.interval.total_seconds()  # type: ignore[union-attr]
                schedules.append(f"every {seconds:g} s")
        described.append(
            {
                "name": f"{deployment.flow_name}/{deployment.name}",
                "schedules": schedules,
                "parameters": dict(deployment.parameters),
            }
        )
    return described


@contextmanager
def prefect_api(report: Report) -> Iterator[tuple[str, bool]]:
    """The Prefect API to serve against: (URL, whether embedded).

    ``PREFECT_API_URL`` when set; else an :class:`EmbeddedPrefectServer` on
    127.0.0.1 (telemetry off), stopped on exit. Every child process started meanwhile
    (the flow runs) inherits the URL and the telemetry switches.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    configured = PREFECT_API_URL.value()
    if configured:
        yield str(configured), False
        return
    with environment(TELEMETRY_OFF), temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        server = EmbeddedPrefectServer()
        report(f"starting the embedded Prefect server on 127.0.0.1:{server.port} ...")
        with (
            server,
            environment({"PREFECT_API_URL": server.api_url}),
            temporary_settings({PREFECT_API_URL: server.api_url}),
        ):
            yield server.api_url, True


class _Stop(Exception):
    """SIGTERM before Prefect's runner took over the signal."""


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`_Stop` (the runner installs its own while it runs)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(options: ServeOptions, report: Report | None = None) -> dict[str, Any]:
    """Register both deployments and run their schedules until SIGTERM or SIGINT.

    Args:
        options: What to serve (see :func:`serve_options`).
        report: Called with progress lines (startup, the API, the deployments).

    Returns:
        The API, whether it was embedded, the deployments served, and the runner.
    """
    import asyncio

    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    say = report or (lambda _line: None)
    deployments = build_deployments(options)
    served = describe(deployments)
    result: dict[str, Any] = {
        "api_url": "",
        "embedded": False,
        "deployments": served,
        "task_runner": options.task_runner,
        "dask_address": options.dask_address,
        "stopped": False,
    }
    try:
        with (
            _stop_on_sigterm(),
            environment(options.environment()),
            prefect_api(say) as (url, embedded),
        ):
            result.update(api_url=url, embedded=embedded)
            say(f"prefect api: {url}{' (embedded)' if embedded else ''}")
            # What prefect.serve does, with a report once the deployments are registered.
            runner = Runner(pause_on_shutdown=True)
            for deployment, item in zip(deployments, served, strict=True):
                runner.add_deployment(deployment)
                schedules = ", ".join(item["schedules"]) or "no schedule"
                say(f"serving {item['name']}: {schedules}")
            say(f"fan-out task runner: {options.task_runner}; Ctrl-C or SIGTERM stops")
            asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal, _Stop):
        pass  # a requested stop; the context managers above cleaned up
    except SystemExit as exit_:  # the runner's SIGTERM handler before it started
        if exit_.code not in (0, None):
            raise
    result["stopped"] = True
    say("stopped")
    return result
