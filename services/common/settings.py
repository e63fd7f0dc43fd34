"""Settings shared by every histomarker service.

Each service has one ``pydantic-settings`` class deriving from :class:`ServiceSettings`;
values come from the environment with the prefix ``HISTOMARKER_`` (for example
``HISTOMARKER_PORT``, ``HISTOMARKER_STORE_URL``). Secrets are read only from the
environment and are never logged.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.objectstore import ObjectStore, open_store

#: The embedded default object store: a folder in the user's home.
DEFAULT_STORE_URL = (Path.home() / ".histomarker" / "store").as_uri()

#: Default ports of the four gRPC services when run side by side on one machine.
DEFAULT_PORTS = {
    "prediction": 50050,
    "tiling": 50051,
    "nuclei": 50052,
    "analysis": 50053,
}


#: Marks the placeholder values of .env.example, refused as secrets.
PLACEHOLDER = "CHANGE-ME"


class ServiceSettings(BaseSettings):
    """What every gRPC service of histomarker is configured with."""

    model_config = SettingsConfigDict(env_prefix="HISTOMARKER_", extra="ignore")

    #: Name of the service, used in logs and health status.
    service_name: str = "histomarker"
    #: Address to bind; loopback unless told otherwise.
    host: str = "127.0.0.1"
    #: TCP port; 0 picks a free one (tests).
    port: int = Field(default=0, ge=0, le=65535)
    #: Object store, ``file:///path`` (embedded default) or ``s3://host:port/bucket``.
    store_url: str = DEFAULT_STORE_URL
    #: S3 access key (only for ``s3://`` stores).
    s3_access_key: SecretStr | None = None
    #: S3 secret key (only for ``s3://`` stores).
    s3_secret_key: SecretStr | None = None
    #: Use HTTPS towards the S3 endpoint.
    s3_secure: bool = False
    #: Largest gRPC message accepted or sent, in mebibytes.
    max_message_mb: int = Field(default=64, ge=1, le=2047)
    #: Worker threads of the gRPC server.
    max_workers: int = Field(default=8, ge=1, le=256)
    #: Concurrent RPCs accepted before RESOURCE_EXHAUSTED; None means unbounded.
    max_concurrent_rpcs: int | None = Field(default=64, ge=1)
    #: Seconds given to in-flight RPCs on shutdown (SIGTERM).
    shutdown_grace_s: float = Field(default=10.0, ge=0.0)
    #: PEM certificate chain for TLS; TLS is on when this and ``tls_key_file`` are set.
    tls_cert_file: Path | None = None
    #: PEM private key for TLS.
    tls_key_file: Path | None = None
    #: Bearer token clients must send (``authorization: Bearer <token>``); off if unset.
    auth_token: SecretStr | None = None
    #: Log level name.
    log_level: str = "INFO"

    @field_validator("auth_token", "s3_access_key", "s3_secret_key")
    @classmethod
    def _not_a_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        # .env.example's values are public: a service never runs with one of them.
        if value is not None and PLACEHOLDER in value.get_secret_value():
            raise ValueError(f"still the {PLACEHOLDER} placeholder of .env.example: set a secret")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return level

    @property
    def max_message_bytes(self) -> int:
        """Largest gRPC message in bytes."""
        return self.max_message_mb * 1024 * 1024

    def open_store(self) -> ObjectStore:
        """The object store these settings name, with their S3 credentials."""
        access = self.s3_access_key.get_secret_value() if self.s3_access_key else None
        secret = self.s3_secret_key.get_secret_value() if self.s3_secret_key else None
        return open_store(
            self.store_url, access_key=access, secret_key=secret, secure=self.s3_secure
        )

    @property
    def tls_enabled(self) -> bool:
        """Whether the server listens with TLS."""
        return self.tls_cert_file is not None and self.tls_key_file is not None
