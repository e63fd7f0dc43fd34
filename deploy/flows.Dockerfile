# syntax=docker/dockerfile:1
# The Prefect flows: `histomarker flows serve` serves the scheduled deployments
# against the compose Prefect server. The same image runs that server
# (`prefect server start`), so client and server versions always match.
#   docker build -f deploy/flows.Dockerfile -t histomarker-flows .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY services/ services/
COPY flows/ flows/
RUN pip install . \
 && pip uninstall -y opencv-python \
 && pip install --force-reinstall --no-deps opencv-python-headless==5.0.0.93 \
 && python -m services.common.protogen \
 && pip install --no-deps --force-reinstall . \
 && python -c "import flows, services.common.stubs.histomarker.v1"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 histomarker \
 && useradd --system --uid 10001 --gid histomarker --create-home --home-dir /home/histomarker histomarker \
 && install -d -o histomarker -g histomarker /home/histomarker/work /model-store
COPY --from=build /opt/venv /opt/venv
COPY deploy/healthcheck.py deploy/with_torchserve_keys.py /opt/histomarker/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PREFECT_HOME=/home/histomarker/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    PREFECT_RUNNER_SERVER_ENABLE=true \
    PREFECT_RUNNER_SERVER_HOST=127.0.0.1 \
    PREFECT_RUNNER_SERVER_PORT=8090
USER histomarker
WORKDIR /home/histomarker
# The runner's own webserver answers /health while the deployments are served.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "/opt/histomarker/healthcheck.py", "http", "http://127.0.0.1:8090/health"]
CMD ["python", "/opt/histomarker/with_torchserve_keys.py", "histomarker", "flows", "serve"]
