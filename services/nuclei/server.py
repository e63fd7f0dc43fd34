"""gRPC adapter of the NucleiService: `histomarker serve nuclei`.

The service's logic lives beside this file without any gRPC import; this module
only binds it to `histomarker.v1.NucleiService`. RPCs that have not landed yet
answer UNIMPLEMENTED naming issue #7, after the request's object references
are checked.
"""

from __future__ import annotations

from services.common.grpc_server import HistomarkerServer, ServiceBinding, create_server, serve
from services.common.servicer import complete_servicer
from services.common.settings import DEFAULT_PORTS, ServiceSettings
from services.common.stubs.histomarker.v1 import nuclei_pb2, nuclei_pb2_grpc

SERVICE_NAME = "histomarker.v1.NucleiService"


class NucleiSettings(ServiceSettings):
    """Settings of the NucleiService (environment prefix ``HISTOMARKER_``)."""

    service_name: str = "nuclei"
    port: int = DEFAULT_PORTS["nuclei"]


class NucleiServicer(nuclei_pb2_grpc.NucleiServiceServicer):
    """Implements ``histomarker.v1.NucleiService``."""


complete_servicer(NucleiServicer, nuclei_pb2.DESCRIPTOR.services_by_name["NucleiService"], 7)


def bindings() -> list[ServiceBinding]:
    """The service this process hosts."""
    return [
        ServiceBinding(
            SERVICE_NAME, NucleiServicer(), nuclei_pb2_grpc.add_NucleiServiceServicer_to_server
        )
    ]


def create(settings: ServiceSettings | None = None) -> tuple[HistomarkerServer, int]:
    """Build the server (bound, not started) and return it with its port."""
    return create_server(settings or NucleiSettings(), bindings())


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    serve(NucleiSettings(), bindings())


if __name__ == "__main__":
    main()
