"""gRPC adapter of the PredictionService: `histomarker serve prediction`.

The service's logic lives beside this file without any gRPC import; this module
only binds it to `histomarker.v1.PredictionService`. RPCs that have not landed yet
answer UNIMPLEMENTED naming issue #9, after the request's object references
are checked.
"""

from __future__ import annotations

from services.common.grpc_server import HistomarkerServer, ServiceBinding, create_server, serve
from services.common.servicer import complete_servicer
from services.common.settings import DEFAULT_PORTS, ServiceSettings
from services.common.stubs.histomarker.v1 import prediction_pb2, prediction_pb2_grpc

SERVICE_NAME = "histomarker.v1.PredictionService"


class PredictionSettings(ServiceSettings):
    """Settings of the PredictionService (environment prefix ``HISTOMARKER_``)."""

    service_name: str = "prediction"
    port: int = DEFAULT_PORTS["prediction"]


class PredictionServicer(prediction_pb2_grpc.PredictionServiceServicer):
    """Implements ``histomarker.v1.PredictionService``."""


complete_servicer(
    PredictionServicer, prediction_pb2.DESCRIPTOR.services_by_name["PredictionService"], 9
)


def bindings() -> list[ServiceBinding]:
    """The service this process hosts."""
    return [
        ServiceBinding(
            SERVICE_NAME,
            PredictionServicer(),
            prediction_pb2_grpc.add_PredictionServiceServicer_to_server,
        )
    ]


def create(settings: ServiceSettings | None = None) -> tuple[HistomarkerServer, int]:
    """Build the server (bound, not started) and return it with its port."""
    return create_server(settings or PredictionSettings(), bindings())


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    serve(PredictionSettings(), bindings())


if __name__ == "__main__":
    main()
