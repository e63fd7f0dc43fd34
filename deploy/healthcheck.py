"""Container health checks of the histomarker compose stack (no histomarker import).

    python healthcheck.py grpc         grpc.health.v1 Check of this container's service
    python healthcheck.py torchserve   TorchServe /ping says Healthy (with its key file)
                                       and the entrypoint restored the recorded models
    python healthcheck.py http URL     GET URL answers 2xx (Prefect API, flows runner)

Exit 0 when healthy, 1 when not (Docker's HEALTHCHECK contract). The gRPC check
talks to 127.0.0.1:$HISTOMARKER_PORT; with TLS on ($HISTOMARKER_TLS_CERT_FILE), it
verifies the server against $HEALTHCHECK_TLS_CA_FILE (default: that certificate)
for the name $HEALTHCHECK_TLS_SERVER_NAME (default ``localhost``). Health checks
need no bearer token: the services exempt grpc.health.v1 from authorization.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request

TIMEOUT_S = 4.0
#: The service this container hosts, by the ``SERVICE`` its image was built with.
SERVICE_NAMES = {
    "tiling": "histomarker.v1.TilingService",
    "nuclei": "histomarker.v1.NucleiService",
    "analysis": "histomarker.v1.AnalysisService",
    "prediction": "histomarker.v1.PredictionService",
}
TORCHSERVE_KEY_FILE = "/var/lib/torchserve/keys/key_file.json"
#: Written by torchserve_entrypoint.py once the recorded model versions are READY.
TORCHSERVE_RESTORED_FILE = "/var/lib/torchserve/tmp/restored"


def check_grpc() -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"127.0.0.1:{os.environ.get('HISTOMARKER_PORT', '50050')}"
    cert = os.environ.get("HISTOMARKER_TLS_CERT_FILE")
    if cert:
        with open(os.environ.get("HEALTHCHECK_TLS_CA_FILE", cert), "rb") as handle:
            credentials = grpc.ssl_channel_credentials(handle.read())
        name = os.environ.get("HEALTHCHECK_TLS_SERVER_NAME", "localhost")
        options = [("grpc.ssl_target_name_override", name)]
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    service = SERVICE_NAMES.get(os.environ.get("SERVICE", ""), "")
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        answer = stub.Check(request, timeout=TIMEOUT_S)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def check_torchserve() -> bool:
    restored = os.environ.get("TORCHSERVE_RESTORED_FILE", TORCHSERVE_RESTORED_FILE)
    if not os.path.exists(restored):
        print("unhealthy: the recorded model versions are not restored yet", file=sys.stderr)
        return False
    port = os.environ.get("TORCHSERVE_INFERENCE_PORT", "8080")
    request = urllib.request.Request(f"http://127.0.0.1:{port}/ping")
    key_file = os.environ.get("TORCHSERVE_KEY_FILE", TORCHSERVE_KEY_FILE)
    if os.path.exists(key_file):
        with open(key_file, encoding="utf-8") as handle:
            key = json.load(handle)["inference"]["key"]
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return bool(json.load(response).get("status") == "Healthy")


def check_http(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return bool(200 <= response.status < 300)


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "grpc"
    try:
        if mode == "grpc":
            healthy = check_grpc()
        elif mode == "torchserve":
            healthy = check_torchserve()
        elif mode == "http" and len(argv) == 2:
            healthy = check_http(argv[1])
        else:
            print("usage: healthcheck.py grpc | torchserve | http URL", file=sys.stderr)
            return 2
    except Exception as exc:  # any failure to answer means unhealthy
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
