"""gRPC adapter of the TilingService: `histomarker serve tiling`.

The service's logic lives beside this file without any gRPC import; this module
only binds it to `histomarker.v1.TilingService`. RPCs that have not landed yet
answer UNIMPLEMENTED naming issue #5, after the request's object references
are checked.
"""

from __future__ import annotations

from services.common.grpc_server import HistomarkerServer, ServiceBinding, create_server, serve
from services.common.servicer import complete_servicer
from services.common.settings import DEFAULT_PORTS, ServiceSettings
from services.common.stubs.histomarker.v1 import tiling_pb2, tiling_pb2_grpc

SERVICE_NAME = "histomarker.v1.TilingService"


class TilingSettings(ServiceSettings):
    """Settings of the TilingService (environment prefix ``HISTOMARKER_``)."""

    service_name: str = "tiling"
    port: int = DEFAULT_PORTS["tiling"]


class TilingServicer(tiling_pb2_grpc.TilingServiceServicer):
    """Implements ``histomarker.v1.TilingService``."""


complete_servicer(TilingServicer, tiling_pb2.DESCRIPTOR.services_by_name["TilingService"], 5)


def bindings() -> list[ServiceBinding]:
    """The service this process hosts."""
    return [
        ServiceBinding(
            SERVICE_NAME, TilingServicer(), tiling_pb2_grpc.add_TilingServiceServicer_to_server
        )
    ]


def create(settings: ServiceSettings | None = None) -> tuple[HistomarkerServer, int]:
    """Build the server (bound, not started) and return it with its port."""
    return create_server(settings or TilingSettings(), bindings())


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    serve(TilingSettings(), bindings())


if __name__ == "__main__":
    main()
