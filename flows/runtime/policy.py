"""How pipeline tasks are cached and retried.

Caching: a task's cache key is a digest of its name, :data:`PIPELINE_VERSION`, the
object store it writes to, and its inputs in canonical JSON (pydantic models,
dataclasses, paths, numbers and text). Every input is a plain value — an object key,
a slide's sha256, a parameter — never a handle, so the same inputs give the same key
in any process, and a rerun of a crashed run finds the results of the tasks that
had finished (they are persisted) and runs only the rest. The tasks write their
outputs under keys derived from the same inputs, so running one again is harmless.

Retries: only when a dependency is down — a typed
:class:`~services.common.errors.Unavailable` or a gRPC ``UNAVAILABLE`` (also
``RESOURCE_EXHAUSTED``, which says "retry later") — with exponential back-off and
jitter. Bad input, a missing object or a bug fail at once: retrying cannot help.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from services.common.errors import ResourceExhausted, Unavailable

#: Bump when a task's outputs change meaning, so old cached results are not reused.
PIPELINE_VERSION = 1
#: Attempts after the first one, when a dependency is down.
RETRIES = 4
#: Seconds before the retries: 2, 4, 8, 16 (each +- 50 % jitter).
RETRY_DELAYS_S: list[float] = exponential_backoff(backoff_factor=2)(RETRIES)
RETRY_JITTER = 0.5
#: gRPC status names worth retrying.
RETRYABLE_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})

P = ParamSpec("P")
R = TypeVar("R")


def canonical(value: Any) -> Any:
    """``value`` as plain JSON values, the same for equal inputs in any process.

    Raises:
        TypeError: A value with no stable text form (a handle, a client, a lock).
    """
    if isinstance(value, BaseModel):
        return canonical(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(canonical(v) for v in value)
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return canonical(value.item())
    raise TypeError(f"{type(value).__name__} has no stable form for a cache key")


def input_digest(*values: Any) -> str:
    """Hex sha256 of the canonical JSON of ``values``."""
    text = json.dumps([canonical(v) for v in values], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(task_name: str, store_url: str, parameters: Mapping[str, Any]) -> str:
    """The cache key of one task call (see the module docstring)."""
    digest = input_digest(PIPELINE_VERSION, store_url, dict(parameters))
    return f"{task_name}-v{PIPELINE_VERSION}-{digest[:40]}"


def task_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn``: :func:`cache_key` with the store of the settings."""
    from flows.runtime.settings import FlowSettings

    return cache_key(context.task.name, FlowSettings().store_url, parameters)


def is_retryable(error: BaseException | None) -> bool:
    """Whether an error says a dependency is down (worth retrying later)."""
    if isinstance(error, Unavailable | ResourceExhausted):
        return True
    code = getattr(error, "code", None)
    if callable(code):  # grpc.RpcError
        try:
            name = getattr(code(), "name", "")
        except Exception:
            return False
        return name in RETRYABLE_CODES
    return False


def retry_on_unavailable(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retry only when :func:`is_retryable`."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as error:
        return is_retryable(error)
    return False


def pipeline_task(
    *, cached: bool = True, retries: int = RETRIES, **options: Any
) -> Callable[[Callable[P, R]], Task[P, R]]:
    """``@task`` with the pipeline's retry policy, and its cache unless ``cached=False``
    (for steps whose effect lives outside the store, e.g. registering on TorchServe)."""
    settings: dict[str, Any] = {
        "retries": retries,
        "retry_delay_seconds": RETRY_DELAYS_S[:retries] or 0,
        "retry_jitter_factor": RETRY_JITTER,
        "retry_condition_fn": retry_on_unavailable,
        **options,
    }
    if cached:
        settings.update(cache_key_fn=task_cache_key, persist_result=True)
    else:
        from prefect.cache_policies import NO_CACHE

        settings.update(cache_policy=NO_CACHE)

    def decorate(fn: Callable[P, R]) -> Task[P, R]:
        return task(**settings)(fn)

    return decorate
