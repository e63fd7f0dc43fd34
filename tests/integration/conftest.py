"""Servers shared by integration tests, started on 127.0.0.1 and stopped at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prefect_harness import prefect_home

#: One Prefect test harness for the whole session, shared by the flow and fault tests
#: (a harness per folder would nest two, and flows would record to the wrong one).
__all__ = ["prefect_home"]

#: Credentials the S3 test server accepts (moto accepts any; these are dummies).
S3_TEST_ACCESS_KEY = "histomarker-test"
S3_TEST_SECRET_KEY = "histomarker-test-secret"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-protocol server (moto) on 127.0.0.1 for the whole session.

    Yields:
        ``"127.0.0.1:PORT"``, usable as ``s3://127.0.0.1:PORT/<bucket>`` with the
        credentials of the ``s3_credentials`` fixture. Each test should use its own
        bucket.
    """
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        # Dummy AWS settings for moto, only while the server runs: nothing here may
        # ever pick up a developer's real credentials or region.
        env.setenv("AWS_ACCESS_KEY_ID", S3_TEST_ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", S3_TEST_SECRET_KEY)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            _, port = server.get_host_and_port()
            yield f"127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_credentials() -> dict[str, str]:
    """Keyword arguments ``access_key``/``secret_key`` for the ``s3_endpoint`` server."""
    return {"access_key": S3_TEST_ACCESS_KEY, "secret_key": S3_TEST_SECRET_KEY}
