"""The scheduled deployments: schedules, parameters, options and the command."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.runtime.deployments import (
    PREDICT_DEPLOYMENT,
    TRAIN_DEPLOYMENT,
    build_deployments,
    describe,
    serve_options,
)
from flows.runtime.runners import fanout_task_runner, with_fanout_runner
from flows.runtime.settings import FlowSettings
from services import cli
from services.common.errors import InvalidInput


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text("slide_id\n")
    return path


def test_defaults_are_weekly_training_unscheduled_and_ten_minute_batches() -> None:
    options = serve_options(FlowSettings())
    assert (options.cron, options.interval_s, options.task_runner) == ("0 3 * * 0", 600.0, "thread")
    train, predict = build_deployments(options)
    assert (train.flow_name, train.name) == ("train_pipeline", TRAIN_DEPLOYMENT)
    assert not train.schedules and train.parameters == {}
    assert (predict.flow_name, predict.name) == ("predict_batch", PREDICT_DEPLOYMENT)
    assert describe([predict])[0]["schedules"] == ["every 600 s"]
    assert predict.parameters == {"inbox_prefix": "inbox/"}
    assert predict.entrypoint == "flows.batch.predict.predict_batch"
    assert train.entrypoint == "flows.training.pipeline.train_pipeline"


def test_training_on_its_cron_with_the_cohort_parameters(manifest: Path) -> None:
    options = serve_options(
        FlowSettings(),
        cron="0 4 * * 1",
        interval_s=30,
        manifest_path=str(manifest),
        cohort_name="tiny",
    )
    train, predict = build_deployments(options)
    assert describe([train])[0]["schedules"] == ["cron 0 4 * * 1"]
    assert train.parameters == {"manifest_path": str(manifest.resolve()), "cohort_name": "tiny"}
    assert describe([predict])[0]["schedules"] == ["every 30 s"]


def test_settings_supply_what_the_command_line_leaves_out(manifest: Path) -> None:
    settings = FlowSettings(
        train_cron="5 1 * * *",
        train_manifest=manifest,
        train_cohort="c",
        predict_interval_s=45,
        predict_inbox_prefix="new/",
        task_runner="dask",
        dask_address="tcp://127.0.0.1:8786",
    )
    options = serve_options(settings)
    assert (options.cron, options.interval_s, options.cohort_name) == ("5 1 * * *", 45.0, "c")
    assert options.inbox_prefix == "new/"
    assert options.environment() == {
        "HISTOMARKER_TASK_RUNNER": "dask",
        "HISTOMARKER_DASK_ADDRESS": "tcp://127.0.0.1:8786",
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cron": "every sunday"},
        {"interval_s": 0},
        {"manifest_path": "manifest.csv"},
        {"cohort_name": "tiny"},
        {"manifest_path": "/no/such/manifest.csv", "cohort_name": "tiny"},
        {"task_runner": "ray"},
        {"dask_address": "tcp://127.0.0.1:8786"},
    ],
)
def test_bad_options_are_invalid_input(kwargs: dict) -> None:
    with pytest.raises(InvalidInput):
        serve_options(FlowSettings(), **kwargs)


def test_the_fanout_runner_is_threads_or_dask() -> None:
    from prefect_dask import DaskTaskRunner

    from flows.batch.predict import predict_slides

    assert fanout_task_runner(FlowSettings()) is None
    assert with_fanout_runner(predict_slides, FlowSettings()) is predict_slides
    local = fanout_task_runner(FlowSettings(task_runner="dask", dask_workers=3))
    assert isinstance(local, DaskTaskRunner)
    assert local.cluster_kwargs["n_workers"] == 3
    assert local.cluster_kwargs["host"] == "127.0.0.1"
    remote = fanout_task_runner(FlowSettings(task_runner="dask", dask_address="tcp://h:1"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://h:1"
    wrapped = with_fanout_runner(predict_slides, FlowSettings(task_runner="dask"))
    assert isinstance(wrapped.task_runner, DaskTaskRunner)


def test_flows_serve_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["flows", "serve", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--cron", "--interval-s", "--manifest", "--cohort", "--task-runner"):
        assert option in text
    assert "--dask-address" in text and "--json" in text


def test_flows_serve_bad_input_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["flows", "serve", "--cron", "nope"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("histomarker flows:") and "cron" in err and "\n" not in err
