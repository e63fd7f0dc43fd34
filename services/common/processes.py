"""Process groups we start (the local stack, TorchServe, the embedded Prefect
server): identify them exactly, stop them whole.

Every such process starts in its own session, so its PID is also its process group
id and every process it spawns (TorchServe's Java frontend and Python workers, the
Prefect server's workers) belongs to that group. A PID alone may be reused after the
process exits; the kernel's start time (``/proc/PID/stat`` field 22, clock ticks
since boot) makes (PID, start time) unique, so a stale state file never leads us to
signal a stranger.

Also the two contexts the commands that start them share: :func:`interruptible`
(SIGTERM as Ctrl-C, so a ``finally`` stops what was started) and :func:`environment`
(variables every child inherits, restored after).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state first), or None."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    """Start time of a live process in clock ticks since boot; None when gone."""
    fields = _stat_fields(pid)
    # Field 22 of stat is the 20th after the command name; a zombie is gone for us.
    if fields is None or len(fields) < 20 or fields[0] == "Z":
        return None
    return int(fields[19])


def is_same_process(pid: int, ticks: int | None) -> bool:
    """Whether ``pid`` is alive and is the process that started at ``ticks``."""
    now = start_ticks(pid)
    return now is not None and (ticks is None or now == ticks)


def group_members(group: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``group``."""
    if not _PROC.is_dir():  # not Linux: only the leader can be checked
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [group]
    members = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == group:
            members.append(int(entry.name))
    return members


def is_our_group(group: int, leader_ticks: int | None) -> bool:
    """Whether the group ``group`` still holds processes of the leader we started.

    The leader alive with another start time means the PID was reused: not ours. The
    leader gone but members left means our orphans (a group id is not reused while
    the group has members).
    """
    now = start_ticks(group)
    if now is not None:
        return leader_ticks is None or now == leader_ticks
    return bool(group_members(group))


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


def wait_group_gone(group: int, timeout_s: float) -> bool:
    """Wait until no live process of ``group`` remains; True if none does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not group_members(group):
            return True
        time.sleep(0.1)
    return not group_members(group)


def reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is our child (no zombie left)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_group(group: int, leader_ticks: int | None, timeout_s: float) -> bool:
    """SIGTERM a process group of ours, SIGKILL what is left after ``timeout_s``.

    Args:
        group: Process group id (the PID of the leader we started).
        leader_ticks: The leader's start time, from :func:`start_ticks`.
        timeout_s: Seconds the group gets to exit after SIGTERM.

    Returns:
        True if the group was ours and was signalled, False if nothing of it was left
        (or the PID now belongs to another process, which is left alone).
    """
    if not is_our_group(group, leader_ticks):
        reap(group)
        return False
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reap(group)
        if not group_members(group):
            return True
        time.sleep(0.1)
    _signal_group(group, signal.SIGKILL)
    wait_group_gone(group, 10.0)
    reap(group)
    return True


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM raise KeyboardInterrupt inside the block, so
    whatever the block started is stopped by its ``finally``.

    SIGINT is set explicitly: a shell without job control starts background
    commands with it ignored.
    """
    previous = {
        signum: signal.signal(signum, signal.default_int_handler)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def environment(updates: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``updates`` (inherited by every child), restored on exit."""
    saved = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` (bound at once, then released),
    for servers the tests and local stacks start."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
