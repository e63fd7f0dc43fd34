"""What CI can check of the compose stack without a Docker engine.

``docker-compose config -q`` (Debian's docker-compose, no daemon needed), and the
consistency of docker-compose.yml with the settings classes, the Dockerfiles, the
TorchServe config and .env.example.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.settings import DEFAULT_PORTS

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
TLS = ROOT / "deploy" / "docker-compose.tls.yml"
ENV_EXAMPLE = ROOT / ".env.example"

#: The settings class each compose service is configured by.
SETTINGS = {
    "tiling": "services.tiling.server:TilingSettings",
    "nuclei": "services.nuclei.server:NucleiSettings",
    "analysis": "services.analysis.server:AnalysisSettings",
    "prediction": "services.prediction.server:PredictionSettings",
    "flows": "flows.runtime.settings:FlowSettings",
    # Its entrypoint's restore (`histomarker models restore`).
    "torchserve": "services.inference.served_models:ServingSettings",
}
GRPC_SERVICES = ("tiling", "nuclei", "analysis", "prediction")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER")
REQUIRED_VAR = re.compile(r"^\$\{([A-Z0-9_]+):\?[^}]*\}$")
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?([-?])([^}]*))?\}")


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _one_shot(service: dict[str, Any]) -> bool:
    return str(service.get("restart", "no")) == "no"


def _resolve(value: Any) -> str:
    """An environment value with ``${VAR:-default}`` -> default, ``${VAR:?}`` -> a dummy."""

    def replace(match: re.Match[str]) -> str:
        name, kind, word = match.groups()
        return word if kind == "-" else f"test-{name.lower()}"

    return INTERPOLATION.sub(replace, str(value))


# docker-compose config


def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing on CI (`make system-deps` installs it)")
        pytest.skip("docker-compose is not installed (`make system-deps` installs it)")
    return found


def _config(files: list[Path], env_file: Path, extra_env: dict[str, str] | None = None) -> Any:
    args = [_docker_compose(), "--env-file", str(env_file)]
    for path in files:
        args += ["-f", str(path)]
    # Nothing from the caller's environment: only the env file counts.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(extra_env or {})}
    return subprocess.run(
        [*args, "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("files", "extra_env"),
    [
        ([COMPOSE], {}),
        ([COMPOSE, GPU], {}),
        ([COMPOSE, TLS], {"PREDICTION_TLS_DIR": "/etc/histomarker/tls"}),
    ],
    ids=["base", "gpu", "tls"],
)
def test_compose_config_is_valid(files: list[Path], extra_env: dict[str, str]) -> None:
    result = _config(files, ENV_EXAMPLE, extra_env)
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = _config([COMPOSE], empty)
    assert result.returncode != 0
    assert "set " in result.stderr and "in .env" in result.stderr


# Environment against the settings classes


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_environment_keys_are_settings_fields(
    name: str, services: dict[str, dict[str, Any]]
) -> None:
    module_name, class_name = SETTINGS[name].split(":")
    settings_class = getattr(importlib.import_module(module_name), class_name)
    environment = services[name]["environment"]
    values = {}
    for key, value in environment.items():
        if not key.startswith("HISTOMARKER_"):
            continue
        field = key.removeprefix("HISTOMARKER_").lower()
        assert field in settings_class.model_fields, f"{name}: {key} is no {class_name} field"
        values[field] = _resolve(value)
    # The values parse, too (ports are ports, paths are paths...).
    settings = settings_class.model_validate(values)
    if name in GRPC_SERVICES:
        assert settings.host == "0.0.0.0"
        assert settings.port == DEFAULT_PORTS[name]
        assert settings.store_url.endswith("/" + settings.bucket)


# Dockerfiles


def _dockerfiles(services: dict[str, dict[str, Any]]) -> set[Path]:
    found = {
        ROOT / service["build"]["dockerfile"] for service in services.values() if "build" in service
    }
    assert found, "no service is built"
    return found


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(source: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        bare = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(source.rstrip("/"), bare) or source.startswith(bare + "/"):
            ignored = not negated
    return ignored


def test_every_dockerfile_copy_source_exists(services: dict[str, dict[str, Any]]) -> None:
    patterns = _dockerignore()
    for dockerfile in _dockerfiles(services):
        for word, args in _instructions(dockerfile):
            if word not in {"COPY", "ADD"} or "--from=" in args:
                continue
            parts = [part for part in args.split() if not part.startswith("--")]
            for source in parts[:-1]:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} is missing"
                assert not _ignored(source, patterns), f"{source} is in .dockerignore"


def test_dockerfiles_are_multi_stage_slim_non_root_with_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    for dockerfile in _dockerfiles(services):
        steps = _instructions(dockerfile)
        words = [word for word, _ in steps]
        assert words.count("FROM") >= 2, f"{dockerfile.name} is not multi-stage"
        base = next(args for word, args in steps if word == "ARG" and "PYTHON_IMAGE" in args)
        assert "python:3.11-slim" in base
        users = [args for word, args in steps if word == "USER"]
        assert users and users[-1] not in {"root", "0"}, f"{dockerfile.name} runs as root"
        healthcheck = [args for word, args in steps if word == "HEALTHCHECK"]
        assert healthcheck and "healthcheck.py" in healthcheck[0], dockerfile.name


def test_torchserve_keeps_token_auth_on() -> None:
    properties = (ROOT / "deploy" / "torchserve.properties").read_text()
    assert "disable_token_authorization=false" in properties
    dockerfile = (ROOT / "deploy" / "torchserve.Dockerfile").read_text()
    assert "--disable-token-auth" not in dockerfile
    assert "openjdk-17" in dockerfile


# Ports, health checks, dependencies, volumes, secrets


def test_only_prediction_is_published(services: dict[str, dict[str, Any]]) -> None:
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"prediction"}
    (mapping,) = services["prediction"]["ports"]
    container_port = str(mapping).rsplit(":", 1)[-1]
    assert container_port == str(DEFAULT_PORTS["prediction"])


def test_ports_agree_across_services(services: dict[str, dict[str, Any]]) -> None:
    for name in GRPC_SERVICES:
        port = str(services[name]["environment"]["HISTOMARKER_PORT"])
        assert port in [str(p) for p in services[name]["expose"]], name
    flows = services["flows"]["environment"]
    for name in ("tiling", "nuclei", "analysis", "prediction"):
        assert flows[f"HISTOMARKER_{name.upper()}_TARGET"] == f"{name}:{DEFAULT_PORTS[name]}"
    properties = (ROOT / "deploy" / "torchserve.properties").read_text()
    expose = [str(p) for p in services["torchserve"]["expose"]]
    for client in ("prediction", "flows"):
        environment = services[client]["environment"]
        grpc_port = environment["HISTOMARKER_TORCHSERVE_GRPC_TARGET"].split(":")[-1]
        management_port = environment["HISTOMARKER_TORCHSERVE_MANAGEMENT_URL"].split(":")[-1]
        assert f"grpc_inference_port={grpc_port}" in properties
        assert f"management_address=http://0.0.0.0:{management_port}" in properties
        assert grpc_port in expose and management_port in expose


def test_every_long_running_service_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if _one_shot(service):
            assert "healthcheck" not in service, name
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name} has no healthcheck"
        if name in GRPC_SERVICES:
            assert test[-1] == "grpc"


def test_dependencies_wait_for_health(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
        for target, rule in depends_on.items():
            wanted = (
                "service_completed_successfully"
                if _one_shot(services[target])
                else "service_healthy"
            )
            assert rule == {"condition": wanted}, f"{name} -> {target}: {rule}"
    for name in ("tiling", "nuclei", "analysis", "prediction", "flows", "torchserve"):
        assert {"minio", "minio-init"} <= set(services[name]["depends_on"]), name
    assert "torchserve" in services["prediction"]["depends_on"]
    assert {"prefect-server", "torchserve"} <= set(services["flows"]["depends_on"])
    assert "postgres" in services["prefect-server"]["depends_on"]


def test_state_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, _target, *mode = str(volume).split(":")
            if source.startswith((".", "/", "$")):
                assert mode == ["ro"], f"{name}: bind mount {volume} must be read-only"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    services = compose["services"]
    assert any(v.startswith("minio-data:") for v in services["minio"]["volumes"])
    assert any(v.startswith("postgres-data:") for v in services["postgres"]["volumes"])
    assert any(v.startswith("model-store:") for v in services["torchserve"]["volumes"])


def test_secrets_come_only_from_required_variables() -> None:
    for number, line in enumerate(COMPOSE.read_text().splitlines(), 1):
        key, sep, value = line.strip().partition(":")
        if not sep or not SECRET_NAME.search(key) or key.startswith("#"):
            continue
        value = value.strip()
        assert REQUIRED_VAR.match(value), f"line {number}: {key} must be ${{VAR:?message}}"


def test_env_example_lists_every_required_variable() -> None:
    text = COMPOSE.read_text() + GPU.read_text()
    required = {m.group(1) for m in INTERPOLATION.finditer(text) if m.group(2) == "?"}
    example = ENV_EXAMPLE.read_text()
    assigned = {line.split("=")[0] for line in example.splitlines() if "=" in line}
    assert required <= assigned, required - assigned
    for line in example.splitlines():
        if line and not line.startswith("#") and SECRET_NAME.search(line.split("=")[0]):
            assert "CHANGE-ME" in line, f"{line}: a placeholder, never a usable secret"


def test_gpu_override_targets_torchserve_and_flows() -> None:
    gpu = _load(GPU)["services"]
    assert set(gpu) == {"torchserve", "flows"}
    for service in gpu.values():
        assert service["runtime"] == "nvidia"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


# TorchServe gets the recorded model versions back at every start


def _healthcheck_module() -> Any:
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "deploy" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torchserve_restores_the_serving_records_before_it_is_healthy(
    services: dict[str, dict[str, Any]],
) -> None:
    torchserve = services["torchserve"]
    steps = _instructions(ROOT / "deploy" / "torchserve.Dockerfile")
    (command,) = [args for word, args in steps if word == "CMD"]
    assert "/opt/histomarker/torchserve_entrypoint.py" in command
    assert any(
        word == "COPY" and args.split()[0] == "deploy/torchserve_entrypoint.py"
        for word, args in steps
    )
    environment = torchserve["environment"]
    # The store the records and archives are in: the services' own settings.
    store_env = services["tiling"]["environment"]
    for key in ("HISTOMARKER_STORE_URL", "HISTOMARKER_S3_ACCESS_KEY", "HISTOMARKER_S3_SECRET_KEY"):
        assert environment[key] == store_env[key], key
    # Its own management API (loopback, the port of torchserve.properties) and key file.
    properties = (ROOT / "deploy" / "torchserve.properties").read_text()
    port = environment["HISTOMARKER_TORCHSERVE_MANAGEMENT_URL"].rsplit(":", 1)[-1]
    assert environment["HISTOMARKER_TORCHSERVE_MANAGEMENT_URL"].startswith("http://127.0.0.1:")
    assert f"management_address=http://0.0.0.0:{port}" in properties
    healthcheck = _healthcheck_module()
    assert environment["HISTOMARKER_TORCHSERVE_KEY_FILE"] == healthcheck.TORCHSERVE_KEY_FILE
    # The restore copies archives into the model store: mounted writable there.
    model_store = environment["HISTOMARKER_TORCHSERVE_MODEL_STORE"]
    assert f"model_store={model_store}" in properties
    (mount,) = [v for v in torchserve["volumes"] if str(v).startswith("model-store:")]
    assert str(mount) == f"model-store:{model_store}"
    # Prediction and flows wait for that health check.
    assert torchserve["healthcheck"]["test"][-1] == "torchserve"
    for client in ("prediction", "flows"):
        assert services[client]["depends_on"]["torchserve"] == {"condition": "service_healthy"}


def test_torchserve_is_unhealthy_until_the_restore_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    healthcheck = _healthcheck_module()
    monkeypatch.setenv("TORCHSERVE_RESTORED_FILE", str(tmp_path / "restored"))
    monkeypatch.setenv("TORCHSERVE_KEY_FILE", str(tmp_path / "key_file.json"))
    monkeypatch.setenv("TORCHSERVE_INFERENCE_PORT", "9")  # nothing listens there
    assert healthcheck.main(["torchserve"]) == 1
    assert "not restored yet" in capsys.readouterr().err
    (tmp_path / "restored").write_text("now")
    assert healthcheck.main(["torchserve"]) == 1  # restored, but /ping does not answer
    assert "not restored yet" not in capsys.readouterr().err
