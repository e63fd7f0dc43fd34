"""Served model versions survive TorchServe restarts: the serving records for real.

A file:// store holds two tiny trained models (``cancer_detector`` 1,
``biomarker_er`` 1 and 2) and their serving records (cancer_detector 1,
biomarker_er 1, and a ``biomarker_tp53`` record whose archive is missing). Then:

- the compose path: ``deploy/torchserve_entrypoint.py`` starts a real TorchServe
  (its own folder and free ports), restores the records, and ``healthcheck.py
  torchserve`` passes only once they are READY; stopped and started again (``docker
  compose restart torchserve``), it serves the same versions;
- the local stack: ``histomarker up`` (without Prefect and flows) serves the recorded
  versions before it reports ready and warns about the missing archive;
  ``histomarker models list|deploy|rollback`` against it; ``histomarker restart
  torchserve`` under the running stack, then ``down`` and ``up`` again, give the
  same models, the same ListModels and the same prediction of a slide.

Everything binds 127.0.0.1; what the tests start is stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from tiny_models import CANCER_DETECTOR, publish_models, train_tiny, training_cohort

from services.common.objectstore import ObjectStore, open_store
from services.common.processes import group_members, stop_group
from services.inference.registry import archive_key, publish_bundle
from services.inference.served_models import served_on_torchserve
from services.inference.serving_records import deployed, read_record, write_record
from services.inference.torchserve import (
    KEY_FILE,
    RestClient,
    TorchServeConfig,
    read_key_file,
    write_config_properties,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17"),
]

ROOT = Path(__file__).resolve().parents[3]
HISTOMARKER = str(Path(sys.executable).with_name("histomarker"))
MODELS = (CANCER_DETECTOR, "biomarker_er")
#: The recorded versions, as the training flow leaves them.
RECORDED = {CANCER_DETECTOR: "1", "biomarker_er": "1"}
#: A record whose archive is not in the store.
MISSING = "biomarker_tp53"
READY_TIMEOUT_S = 120
#: Keeps every 20x tissue patch as cancer (the tiny detector never saw these slides).
KEEP_ALL = 0.0


@dataclass
class Models:
    root: Path
    store: ObjectStore
    slide_key: str


def _served(management_url: str, key_file: Path) -> dict[str, dict[str, Any]]:
    host, port = management_url.removeprefix("http://").split(":")
    client = RestClient(host, int(port), token=read_key_file(key_file).management)
    try:
        return served_on_torchserve(client)
    finally:
        client.close()


def _versions(served: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    return {name: entry["versions"] for name, entry in served.items()}


def _expected(versions: dict[str, str]) -> dict[str, dict[str, int]]:
    """What TorchServe serves for ``versions``: each with one READY worker."""
    return {name: {version: 1} for name, version in sorted(versions.items())}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    from services.inference.archive import build_mar
    from services.inference.bundle import CONFIG_FILE, load_config
    from services.synth.cohort import generate_cohort

    root = tmp_path_factory.mktemp("served-models")
    store = open_store((root / "store").as_uri())
    manifest = training_cohort(store, 4)
    bundles = {name: train_tiny(store, manifest, name, root / "train" / name) for name in MODELS}
    # Built outside every TorchServe model store: what serves is copied from the store.
    publish_models(store, bundles, root / "mars")
    # biomarker_er 2: the same weights under another version.
    second = root / "bundle-er-2"
    shutil.copytree(bundles["biomarker_er"], second)
    config = replace(load_config(second), version="2")
    (second / CONFIG_FILE).write_text(config.to_json())
    publish_bundle(store, second, build_mar(second, root / "mars-2"))
    for name, version in RECORDED.items():
        key = archive_key(name, version)
        write_record(store, deployed(None, name, version, key, source="train_pipeline"))
    gone = archive_key(MISSING, "1")
    write_record(store, deployed(None, MISSING, "1", gone, source="train_pipeline"))

    cohort = root / "cohort"
    generate_cohort(cohort, 2, seed=5, preset="tiny", truth_crops=0)
    table = pd.read_csv(cohort / "manifest.csv")
    slide = cohort / table[table["kind"] == "cancer"].iloc[0]["slide_path"]
    slide_key = f"slides/{slide.name}"
    store.put_file(slide_key, slide)
    return Models(root, store, slide_key)


def _eventually(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.5)


# The compose path: the torchserve container's entrypoint and health check.


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(child) for child in path.read_text().split()]
    except OSError:
        return []


def _healthy(env: dict[str, str]) -> bool:
    check = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "healthcheck.py"), "torchserve"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    return check.returncode == 0


def _container_start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "deploy" / "torchserve_entrypoint.py")],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_the_compose_entrypoint_restores_before_it_is_healthy(models: Models) -> None:
    work = models.root / "container"
    config = TorchServeConfig.with_free_ports(work / "model-store", work / "keys")
    write_config_properties(config)
    for folder in (config.work_dir, config.temp_dir, config.log_dir, config.model_store):
        folder.mkdir(parents=True, exist_ok=True)
    management_url = f"http://127.0.0.1:{config.management_port}"
    key_file = config.work_dir / KEY_FILE
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HISTOMARKER_", "TORCHSERVE_"))
    }
    env.update(
        {
            # The image's settings, at this test's folders and ports.
            "TORCHSERVE_CONFIG": str(config.config_path),
            "TORCHSERVE_MODEL_STORE": str(config.model_store),
            "TORCHSERVE_KEY_FILE": str(key_file),
            "TORCHSERVE_RESTORED_FILE": str(config.temp_dir / "restored"),
            "TORCHSERVE_INFERENCE_PORT": str(config.inference_port),
            "TEMP": str(config.temp_dir),
            "TMPDIR": str(config.temp_dir),
            "LOG_LOCATION": str(config.log_dir),
            "METRICS_LOCATION": str(config.log_dir),
            # docker-compose.yml's torchserve environment.
            "HISTOMARKER_STORE_URL": models.store.url,
            "HISTOMARKER_TORCHSERVE_MANAGEMENT_URL": management_url,
            "HISTOMARKER_TORCHSERVE_KEY_FILE": str(key_file),
            "HISTOMARKER_TORCHSERVE_MODEL_STORE": str(config.model_store),
        }
    )
    log = work / "container.log"
    started: list[int] = []  # TorchServe's process groups, for the cleanup
    entrypoint: subprocess.Popen[bytes] | None = None
    try:
        for start in ("first start", "restart"):
            assert not _healthy(env), f"{start}: healthy before it started"
            entrypoint = _container_start(env, log)
            deadline = time.monotonic() + READY_TIMEOUT_S * 2
            while not _healthy(env):
                assert entrypoint.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"{start}: never healthy\n{log.read_text()}"
                started.extend(p for p in _children(entrypoint.pid) if p not in started)
                time.sleep(0.5)
            started.extend(p for p in _children(entrypoint.pid) if p not in started)
            # Healthy means the recorded versions serve already, and only they.
            assert _versions(_served(management_url, key_file)) == _expected(RECORDED), start
            for name, version in RECORDED.items():
                assert (config.model_store / f"{name}-{version}.mar").is_file()
            text = log.read_text()
            assert MISSING in text and "is not in the store" in text, text

            entrypoint.send_signal(signal.SIGTERM)  # docker stop
            assert entrypoint.wait(timeout=120) == 0, log.read_text()
            for group in started:
                assert group_members(group) == [], f"{start}: TorchServe left processes"
            entrypoint = None
    finally:
        if entrypoint is not None and entrypoint.poll() is None:
            entrypoint.send_signal(signal.SIGTERM)
            try:
                entrypoint.wait(timeout=120)
            except subprocess.TimeoutExpired:
                entrypoint.kill()
                entrypoint.wait()
        for group in started:
            stop_group(group, None, 30.0)


# The local stack: `histomarker up` / `down` and `histomarker models`.


@dataclass
class Stack:
    root: Path
    store_url: str
    summary: dict[str, Any] = field(default_factory=dict)
    stderr: str = ""
    answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return self.root / "stack"

    @property
    def management_url(self) -> str:
        return str(self.summary["endpoints"]["torchserve_management"])

    @property
    def key_file(self) -> Path:
        return self.directory / "torchserve" / KEY_FILE

    @property
    def prediction_target(self) -> str:
        return str(self.summary["endpoints"]["prediction"])

    def up(self) -> None:
        command = [
            HISTOMARKER,
            "up",
            "--detach",
            "--json",
            "--dir",
            str(self.directory),
            "--free-ports",
            "--store-url",
            self.store_url,
            "--model-store",
            str(self.root / "model-store"),
            "--skip",
            "prefect",
            "--skip",
            "flows",
            "--timeout",
            str(READY_TIMEOUT_S),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=READY_TIMEOUT_S * 4)
        assert done.returncode == 0, done.stderr
        self.summary, self.stderr = json.loads(done.stdout), done.stderr

    def down(self) -> None:
        done = subprocess.run(
            [HISTOMARKER, "down", "--dir", str(self.directory), "--json"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr

    def models(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [HISTOMARKER, "models", *argv, "--dir", str(self.directory)],
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT_S * 2,
        )

    def served(self) -> dict[str, dict[str, int]]:
        return _versions(_served(self.management_url, self.key_file))

    def listed(self) -> dict[str, tuple[str, bool]]:
        """ListModels of the stack's PredictionService: name -> (version, serving)."""
        from services.prediction.client import PredictionClient

        with PredictionClient(self.prediction_target, timeout_s=60) as client:
            return {m.name: (m.version, m.serving) for m in client.list_models()}

    def predict(self, slide_key: str) -> dict[str, Any]:
        from services.prediction.client import PredictionClient, options_of, to_dict

        options = options_of(("er",), skip_heatmaps=True, cancer_confidence=KEEP_ALL)
        with PredictionClient(self.prediction_target, timeout_s=300) as client:
            answer = to_dict(client.predict_stored(slide_key, options=options))
        return {
            "status": answer["status"],
            "tissue": int(answer["tissue_patch_count"]),
            "cancer": int(answer["cancer_patch_count"]),
            "biomarkers": {
                b["biomarker"]: (
                    float(b["probability"]),
                    b["call"],
                    int(b["patch_count"]),
                    b["model_version"],
                )
                for b in answer["biomarkers"]
            },
        }


@pytest.fixture(scope="module")
def stack(models: Models) -> Iterator[Stack]:
    running = Stack(models.root / "local", models.store.url)
    try:
        running.up()
        yield running
    finally:
        running.down()


def test_up_serves_the_recorded_versions_before_it_is_ready(stack: Stack, models: Models) -> None:
    assert "restored 2 model(s)" in stack.stderr, stack.stderr
    warning = next(line for line in stack.stderr.splitlines() if "WARNING" in line)
    assert MISSING in warning and archive_key(MISSING, "1") in warning
    restored = stack.summary["models"]["restored"]
    assert {m["name"]: m["version"] for m in restored} == RECORDED
    assert stack.served() == _expected(RECORDED)
    assert stack.listed() == {name: (version, True) for name, version in RECORDED.items()}
    stack.answers.append(stack.predict(models.slide_key))
    assert stack.answers[0]["status"] == "PREDICTION_STATUS_OK"
    assert stack.answers[0]["cancer"] > 0 and "BIOMARKER_ER" in stack.answers[0]["biomarkers"]


def test_models_list_deploy_and_rollback(stack: Stack, models: Models) -> None:
    listed = stack.models("list", "--json")
    assert listed.returncode == 0, listed.stderr
    result = json.loads(listed.stdout)
    assert result["store_url"] == models.store.url
    rows = {m["name"]: m for m in result["models"]}
    for name, version in RECORDED.items():
        assert rows[name]["recorded"] == rows[name]["served"] == version
        assert rows[name]["in_sync"], rows[name]
    assert rows["biomarker_er"]["stored_versions"] == ["1", "2"]
    assert rows[MISSING]["served"] is None and not rows[MISSING]["in_sync"]
    table = stack.models("list")
    assert table.returncode == 0 and "biomarker_er" in table.stdout

    deploy = stack.models("deploy", "biomarker_er", "2", "--json")
    assert deploy.returncode == 0, deploy.stderr
    answer = json.loads(deploy.stdout)
    assert answer["version"] == "2" and answer["previous"] == "1"
    assert answer["history"] == ["1"] and answer["torchserve_versions"] == ["2"]
    assert stack.served() == _expected({**RECORDED, "biomarker_er": "2"})
    record = read_record(models.store, "biomarker_er")
    assert record is not None and record.version == "2"
    assert record.current.source == "models deploy"
    # The PredictionService caches what TorchServe serves for model_cache_s (5 s).
    _eventually(lambda: stack.listed()["biomarker_er"] == ("2", True))

    for argv, words in [
        (("deploy", "biomarker_er", "9"), "no version '9'"),
        (("deploy", "biomarker_nope", "1"), "no model 'biomarker_nope'"),
    ]:
        refused = stack.models(*argv)
        assert refused.returncode == 2 and words in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1

    rollback = stack.models("rollback", "biomarker_er", "--json")
    assert rollback.returncode == 0, rollback.stderr
    assert json.loads(rollback.stdout)["version"] == "1"
    assert stack.served() == _expected(RECORDED)
    record = read_record(models.store, "biomarker_er")
    assert record is not None and record.version == "1" and record.history == ()
    again = stack.models("rollback", "biomarker_er")
    assert again.returncode == 2 and "no previous version" in again.stderr
    assert stack.served() == _expected(RECORDED)
    _eventually(lambda: stack.listed()["biomarker_er"] == ("1", True))


def test_torchserve_restarts_under_the_running_stack(stack: Stack, models: Models) -> None:
    """``histomarker restart torchserve``: a new TorchServe with new keys on the same
    ports, the recorded versions back, and the PredictionService that kept running
    answers exactly as before (it reads the new keys by itself)."""
    components = {
        c["name"]: c["pid"]
        for c in json.loads((stack.directory / "state.json").read_text())["components"]
    }
    keys_before = read_key_file(stack.key_file)
    before = stack.listed()
    done = subprocess.run(
        [HISTOMARKER, "restart", "torchserve", "--dir", str(stack.directory), "--json"],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S * 4,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "restored 2 model(s)" in done.stderr, done.stderr
    assert result["restarted"] == "torchserve" and result["pid"] != components["torchserve"]
    state = json.loads((stack.directory / "state.json").read_text())
    after = {c["name"]: c["pid"] for c in state["components"]}
    assert list(after) == list(components)  # the same parts, in start order
    assert {k: v for k, v in after.items() if k != "torchserve"} == {
        k: v for k, v in components.items() if k != "torchserve"
    }
    assert read_key_file(stack.key_file) != keys_before
    assert stack.served() == _expected(RECORDED)
    assert stack.listed() == before
    assert stack.predict(models.slide_key) == stack.answers[0]

    refused = subprocess.run(
        [HISTOMARKER, "restart", "torchserve", "--dir", str(stack.root / "nothing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "no stack runs in" in refused.stderr, refused.stderr


def test_down_and_up_again_serve_the_same_models_and_answers(stack: Stack, models: Models) -> None:
    before = stack.listed()
    stack.down()
    stack.up()
    assert "restored 2 model(s)" in stack.stderr, stack.stderr
    assert stack.served() == _expected(RECORDED)
    assert stack.listed() == before
    answer = stack.predict(models.slide_key)
    first = stack.answers[0]
    assert (answer["status"], answer["tissue"], answer["cancer"]) == (
        first["status"],
        first["tissue"],
        first["cancer"],
    )
    # The same probabilities to the bit, calls, patches and model versions.
    assert answer["biomarkers"] == first["biomarkers"]
