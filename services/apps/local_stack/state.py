"""The state file of a local stack: which processes ``histomarker up`` started.

``<dir>/state.json`` lists the ``up`` process itself and every component in start
order with its PID (= process group id), start time, ports and log file. ``up``
rewrites it after each start, atomically, so that ``histomarker down`` (another
process) can stop exactly those processes even while ``up`` is still starting.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition

STATE_FILE = "state.json"


@dataclass
class ComponentRecord:
    """One started component.

    Attributes:
        name: ``prefect``, ``torchserve``, ``tiling``, ... or ``flows``.
        pid: PID of the process started, also its process group id.
        start_ticks: The process's start time (see ``services.common.processes.start_ticks``).
        ports: Its TCP ports on 127.0.0.1 by role.
        log: Its log file.
        ready: Whether it passed its readiness check.
    """

    name: str
    pid: int
    start_ticks: int | None
    ports: dict[str, int]
    log: str
    ready: bool = False


@dataclass
class StackState:
    """What ``up`` started, for ``down``.

    Attributes:
        up_pid: PID of the ``histomarker up`` process (gone after ``--detach``).
        up_start_ticks: Its start time.
        detached: Whether ``up`` returned after readiness.
        store_url: The object store the services use.
        components: Started components in start order.
        model_store: TorchServe's model store folder ("" in state files written
            before it was recorded).
    """

    up_pid: int
    up_start_ticks: int | None
    detached: bool
    store_url: str
    components: list[ComponentRecord] = field(default_factory=list)
    model_store: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StackState:
        components = [ComponentRecord(**item) for item in data.get("components", [])]
        return cls(
            up_pid=int(data["up_pid"]),
            up_start_ticks=data.get("up_start_ticks"),
            detached=bool(data.get("detached", False)),
            store_url=str(data.get("store_url", "")),
            components=components,
            model_store=str(data.get("model_store", "")),
        )


def write_state(directory: Path, state: StackState) -> Path:
    """Write the state file atomically (a reader sees the old or the new one whole)."""
    path = directory / STATE_FILE
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(state.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def read_state(directory: Path) -> StackState | None:
    """The state of the stack in ``directory``, None when there is none.

    Raises:
        FailedPrecondition: The file exists but is not a state file.
    """
    path = directory / STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return StackState.from_json(json.loads(text))
    except (KeyError, TypeError, ValueError) as exc:
        raise FailedPrecondition(f"{path} is not a stack state file: {exc}") from exc


def remove_state(directory: Path) -> None:
    (directory / STATE_FILE).unlink(missing_ok=True)
