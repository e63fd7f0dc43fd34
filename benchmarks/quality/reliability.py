"""Regenerate docs/RELIABILITY.md: bad-input, fuzz and fault tests, and the load test.

One command gathers the figures of issue 12's items 1-3:

1. bad inputs and fuzzing: ``tests/integration/test_bad_inputs.py`` and
   ``tests/integration/*/test_*_fuzz.py``;
2. faults: every ``test_*.py`` under ``tests/integration/faults/``;
3. load: ``benchmarks/speed/load_test.py`` (its own processes on 127.0.0.1).

The tests run through pytest with a JUnit XML report and are tabulated per file
(cases, passed, failed, skipped, seconds); a group whose files are absent is written
as "not yet present". The document records the command, the date and the machine.

Run ``.venv/bin/python benchmarks/quality/reliability.py`` (``--help`` for options; the
load test's own options go after ``--``, e.g. ``-- --levels 1,2 --predict-requests 4``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "RELIABILITY.md"
COMMAND = ".venv/bin/python benchmarks/quality/reliability.py"


@dataclass(frozen=True)
class TestGroup:
    """Test files of one item of the issue, found by glob patterns under the repo."""

    title: str
    patterns: tuple[str, ...]

    def files(self) -> list[Path]:
        found = {path for pattern in self.patterns for path in ROOT.glob(pattern)}
        return sorted(path for path in found if path.is_file())


GROUPS = (
    TestGroup(
        "Bad inputs and fuzzing",
        ("tests/integration/test_bad_inputs.py", "tests/integration/*/test_*_fuzz.py"),
    ),
    TestGroup("Faults", ("tests/integration/faults/**/test_*.py",)),
)


@dataclass
class FileResult:
    """Test cases of one file, by outcome."""

    path: str
    cases: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _cases(report: Path) -> Iterator[ET.Element]:
    root = ET.parse(report).getroot()
    yield from root.iter("testcase")


def _file_of(case: ET.Element) -> str:
    """The test file of a JUnit case: its ``file`` attribute, else from ``classname``."""
    if case.get("file"):
        return str(case.get("file"))
    parts = str(case.get("classname", "")).split(".")
    # tests.integration.tiling.test_tiling_fuzz[.TestClass] -> .../test_tiling_fuzz.py
    for end in range(len(parts), 0, -1):
        candidate = Path(*parts[:end]).with_suffix(".py")
        if (ROOT / candidate).is_file():
            return candidate.as_posix()
    return ".".join(parts)


def tabulate_junit(report: Path, files: list[Path]) -> list[FileResult]:
    """Cases per file of a JUnit XML report; every file in ``files`` gets a row."""
    results = {
        path.relative_to(ROOT).as_posix(): FileResult(path.relative_to(ROOT).as_posix())
        for path in files
    }
    if report.is_file():
        for case in _cases(report):
            name = _file_of(case)
            result = results.setdefault(name, FileResult(name))
            result.cases += 1
            result.seconds += float(case.get("time") or 0.0)
            if case.find("failure") is not None or case.find("error") is not None:
                result.failed += 1
            elif case.find("skipped") is not None:
                result.skipped += 1
            else:
                result.passed += 1
    return sorted(results.values(), key=lambda r: r.path)


def run_group(group: TestGroup, scratch: Path, pytest_args: list[str]) -> dict[str, Any]:
    """Run a group's files under pytest; its table rows, exit code and wall time."""
    files = group.files()
    if not files:
        log(f"{group.title}: not yet present")
        return {"title": group.title, "present": False, "patterns": group.patterns}
    report = scratch / f"{group.title.split()[0].lower()}.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        *pytest_args,
        *(path.relative_to(ROOT).as_posix() for path in files),
    ]
    log(f"{group.title}: {len(files)} file(s): {shlex.join(command[1:])}")
    started = time.monotonic()
    # pytest's own output streams through: its progress dots are the progress here.
    code = subprocess.call(command, cwd=ROOT, stdout=sys.stderr)
    wall = time.monotonic() - started
    rows = tabulate_junit(report, files)
    log(f"{group.title}: exit {code} in {wall:.0f} s")
    return {
        "title": group.title,
        "present": True,
        "patterns": group.patterns,
        "exit_code": code,
        "wall_s": wall,
        "rows": [vars(row) for row in rows],
    }


def run_load(scratch: Path, load_args: list[str]) -> dict[str, Any]:
    """Run the load test; its JSON figures (with its exit code)."""
    out = scratch / "load.json"
    command = [sys.executable, "benchmarks/speed/load_test.py", "--json", str(out), *load_args]
    log(f"load test: {shlex.join(command[1:])}")
    code = subprocess.call(command, cwd=ROOT, stdout=sys.stderr)
    figures: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {"levels": []}
    figures["exit_code"] = code
    figures["command"] = shlex.join([".venv/bin/python", *command[1:2], *load_args])
    return figures


def machine() -> str:
    """A one-line description of this machine."""
    memory = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f", {int(line.split()[1]) / 1024 / 1024:.0f} GB RAM"
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f} at the start"
    return (
        f"{os.cpu_count()} CPUs ({cpu}){memory}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}{load}"
    )


# -- the document ----------------------------------------------------------------------


def _group_section(number: int, group: dict[str, Any]) -> list[str]:
    lines = [f"## {number}. {group['title']}", ""]
    patterns = ", ".join(f"`{p}`" for p in group["patterns"])
    if group.get("not_run"):
        return [*lines, "Not run (`--skip-tests`).", ""]
    if not group["present"]:
        return [*lines, f"Not yet present: no test file matches {patterns}.", ""]
    rows = [{**row, "path": f"`{row['path']}`"} for row in group["rows"]]
    total: dict[str, Any] = {"path": "**total**"}
    for key in ("cases", "passed", "failed", "skipped", "seconds"):
        total[key] = sum(row[key] for row in rows)
    lines += [
        f"Files: {patterns}; pytest exit code {group['exit_code']}, "
        f"{group['wall_s']:.0f} s wall (servers started once per module).",
        "",
        "| file | cases | passed | failed | skipped | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in [*rows, total]:
        lines.append(
            f"| {row['path']} | {row['cases']} | {row['passed']} | {row['failed']} | "
            f"{row['skipped']} | {row['seconds']:.1f} |"
        )
    return [*lines, ""]


def _load_section(load: dict[str, Any] | None) -> list[str]:
    lines = ["## 3. Load (PredictionService.PredictSlide, TilingService.NormalizePatches)", ""]
    if load is None:
        return [*lines, "Not run (`--skip-load`).", ""]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from load_test import table

    args = load.get("args", {})
    lines += [
        f"`{load['command']}` — exit code {load['exit_code']}, "
        f"{load.get('wall_s', 0.0) / 60:.1f} min, started {load.get('started', '?')}.",
        "",
        "Each service runs as its own process (`python -m services.cli serve NAME`) on "
        "127.0.0.1; per level, the clients (one channel each) share a fixed number of "
        f"requests sent back to back, with a {args.get('time_cap_s', '?')} s cap on "
        "starting new ones. Latency percentiles are over the successful requests; "
        "throughput is successful requests (patches) per second of the level's wall time. "
        "RSS is the service process alone: before the level, the peak of samples every "
        "50 ms during it, after it.",
        "",
        f"- PredictSlide: synthetic `tiny` slides ({args.get('slides', '?')}, cycled), "
        f"seven {args.get('backbone', '?')} models with random weights at "
        f"{args.get('input_px', '?')} px on a real TorchServe (one worker each), every "
        "tissue patch kept as cancer (the heaviest case); admission "
        f"{args.get('max_concurrent_predictions', '?')} running + "
        f"{args.get('max_queued_predictions', '?')} queued, so RESOURCE_EXHAUSTED is expected "
        f"when more clients than that call at once; a refused client retries after "
        f"{args.get('backoff_s', '?')} s. Refusals are not errors.",
        f"- NormalizePatches: one stream per request, one message of "
        f"{args.get('patches', '?')} 512 px PNG patches, Vahadane to the built-in reference "
        "with the slide's stain matrix given, PNG out.",
        "",
    ]
    if load["levels"]:
        lines += [table(load["levels"]), ""]
        for rpc in dict.fromkeys(row["target"] for row in load["levels"]):
            rows = [row for row in load["levels"] if row["target"] == rpc]
            lines.append(
                f"- {rpc} service memory: {rows[0]['rss_before_mb']:.0f} MB after the "
                f"warm-up, at most {max(r['rss_peak_mb'] for r in rows):.0f} MB during "
                f"{sum(r['requests'] for r in rows)} requests, {rows[-1]['rss_after_mb']:.0f} MB "
                "after the last level; "
                + (
                    "the server stayed up throughout."
                    if all(r["server_alive"] for r in rows)
                    else "**the server died**."
                )
            )
        lines.append("")
    else:
        lines += ["The load test produced no figures (see its exit code).", ""]
    return lines


def write_doc(
    path: Path, command: str, started: str, host: str, groups: list[dict[str, Any]], load: Any
) -> None:
    lines = [
        "# Reliability: bad input, faults, load",
        "",
        "Figures for issue 12 (items 1-3), generated — do not edit by hand. Regenerate with",
        "",
        "```",
        command,
        "```",
        "",
        f"Generated {started} on {host}. Speed and memory figures depend on the machine "
        "and on what else runs on it; compare rows of one run.",
        "",
    ]
    for number, group in enumerate(groups, start=1):
        lines += _group_section(number, group)
    lines += _load_section(load)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ours, load_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true", help="leave out items 1 and 2")
    parser.add_argument("--skip-load", action="store_true", help="leave out item 3")
    parser.add_argument("--pytest-arg", action="append", default=[], help="passed to pytest")
    parser.add_argument("--out", type=Path, default=DOC, help="the document to write")
    parser.add_argument(
        "--load-json",
        type=Path,
        help="take item 3's figures from this load-test --json file instead of running it",
    )
    args = parser.parse_args(ours)
    command = shlex.join([*shlex.split(COMMAND), *argv])
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    host = machine()
    groups: list[dict[str, Any]] = []
    load = None
    with tempfile.TemporaryDirectory(prefix="reliability-") as scratch:
        if not args.skip_tests:
            groups = [run_group(group, Path(scratch), args.pytest_arg) for group in GROUPS]
        else:
            groups = [{"title": g.title, "patterns": g.patterns, "not_run": True} for g in GROUPS]
        if args.load_json is not None:
            load = json.loads(args.load_json.read_text())
            load.setdefault("exit_code", 0)
            load.setdefault("command", ".venv/bin/python benchmarks/speed/load_test.py")
        elif not args.skip_load:
            load = run_load(Path(scratch), load_args)
    write_doc(args.out, command, started, host, groups, load)
    log(f"wrote {args.out}")
    failed = any(g.get("exit_code", 0) != 0 for g in groups)
    return 1 if failed or (load is not None and load["exit_code"] != 0) else 0


if __name__ == "__main__":
    sys.exit(main())
