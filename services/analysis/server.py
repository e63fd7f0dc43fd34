"""gRPC adapter of the AnalysisService: `histomarker serve analysis`.

The service's logic lives beside this file without any gRPC import; this module
only binds it to `histomarker.v1.AnalysisService`. RPCs that have not landed yet
answer UNIMPLEMENTED naming issue #8, after the request's object references
are checked.
"""

from __future__ import annotations

from services.common.grpc_server import HistomarkerServer, ServiceBinding, create_server, serve
from services.common.servicer import complete_servicer
from services.common.settings import DEFAULT_PORTS, ServiceSettings
from services.common.stubs.histomarker.v1 import analysis_pb2, analysis_pb2_grpc

SERVICE_NAME = "histomarker.v1.AnalysisService"


class AnalysisSettings(ServiceSettings):
    """Settings of the AnalysisService (environment prefix ``HISTOMARKER_``)."""

    service_name: str = "analysis"
    port: int = DEFAULT_PORTS["analysis"]


class AnalysisServicer(analysis_pb2_grpc.AnalysisServiceServicer):
    """Implements ``histomarker.v1.AnalysisService``."""


complete_servicer(AnalysisServicer, analysis_pb2.DESCRIPTOR.services_by_name["AnalysisService"], 8)


def bindings() -> list[ServiceBinding]:
    """The service this process hosts."""
    return [
        ServiceBinding(
            SERVICE_NAME,
            AnalysisServicer(),
            analysis_pb2_grpc.add_AnalysisServiceServicer_to_server,
        )
    ]


def create(settings: ServiceSettings | None = None) -> tuple[HistomarkerServer, int]:
    """Build the server (bound, not started) and return it with its port."""
    return create_server(settings or AnalysisSettings(), bindings())


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    serve(AnalysisSettings(), bindings())


if __name__ == "__main__":
    main()
