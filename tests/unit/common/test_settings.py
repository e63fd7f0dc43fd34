from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.settings import ServiceSettings


def test_defaults_bind_loopback_without_tls_or_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HISTOMARKER_HOST", "HISTOMARKER_AUTH_TOKEN", "HISTOMARKER_TLS_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    settings = ServiceSettings()
    assert settings.host == "127.0.0.1"
    assert settings.auth_token is None and not settings.tls_enabled
    assert settings.store_url.startswith("file://")


def test_environment_overrides_and_secrets_stay_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HISTOMARKER_PORT", "50099")
    monkeypatch.setenv("HISTOMARKER_AUTH_TOKEN", "very-secret")
    monkeypatch.setenv("HISTOMARKER_MAX_MESSAGE_MB", "8")
    settings = ServiceSettings()
    assert settings.port == 50099
    assert settings.max_message_bytes == 8 * 1024 * 1024
    assert settings.auth_token is not None
    assert settings.auth_token.get_secret_value() == "very-secret"
    assert "very-secret" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value"),
    [("HISTOMARKER_PORT", "70000"), ("HISTOMARKER_LOG_LEVEL", "LOUD"), ("HISTOMARKER_PORT", "x")],
)
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        ServiceSettings()
