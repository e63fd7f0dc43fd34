from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services import __version__
from services.cli import build_parser, main

SUBCOMMANDS = [
    "synth",
    "tile",
    "normalize",
    "nuclei",
    "metrics",
    "cohort",
    "predict",
    "flows",
    "up",
    "down",
    "models",
    "serve",
    "demo",
]


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"    {name}" in out, name


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"histomarker {__version__}"


def _leaf_parsers():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    for name, child in sub.choices.items():
        nested = [a for a in child._actions if a.dest.endswith("_command")]
        if nested:
            for leaf_name, leaf in nested[0].choices.items():
                yield f"{name} {leaf_name}", leaf
        else:
            yield name, child


def test_every_subcommand_takes_json() -> None:
    for name, leaf in _leaf_parsers():
        assert "--json" in leaf._option_string_actions, name


@pytest.mark.parametrize(
    "argv",
    [
        ["tile"],
        ["synth", "out", "--slides", "many"],
        ["no-such-command"],
        ["serve", "gpu"],
        ["models", "deploy", "biomarker_er"],
        ["models", "dance"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("histomarker")


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_installed_entry_point_runs() -> None:
    exe = Path(sys.executable).with_name("histomarker")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert all(name in result.stdout for name in SUBCOMMANDS)
    result = subprocess.run(
        [str(exe), "nuclei", "x.png", "--json"], capture_output=True, text=True, timeout=60
    )
    # A missing image is bad input: exit 2, one line naming it, nothing on stdout.
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "x.png" in result.stderr
