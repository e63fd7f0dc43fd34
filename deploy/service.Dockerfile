# syntax=docker/dockerfile:1
# One image for the four gRPC services; SERVICE picks which one a container runs:
#   docker build -f deploy/service.Dockerfile --build-arg SERVICE=tiling -t histomarker-tiling .
# Build from the repository root (the context .dockerignore trims).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# CPU wheels of the pinned torch by default; the GPU override points this at CUDA's.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY services/ services/
COPY flows/ flows/
# Dependencies first; then the gRPC stubs (generated, not committed) and the package
# with them. staintools pulls the GUI opencv build: swap in the headless one.
RUN pip install . \
 && pip uninstall -y opencv-python \
 && pip install --force-reinstall --no-deps opencv-python-headless==5.0.0.93 \
 && python -m services.common.protogen \
 && pip install --no-deps --force-reinstall . \
 && python -c "import services.common.stubs.histomarker.v1"

FROM ${PYTHON_IMAGE} AS runtime
ARG SERVICE=prediction
RUN groupadd --system --gid 10001 histomarker \
 && useradd --system --uid 10001 --gid histomarker --create-home --home-dir /home/histomarker histomarker
COPY --from=build /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/histomarker/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SERVICE=${SERVICE}
USER histomarker
WORKDIR /home/histomarker
EXPOSE 50050 50051 50052 50053
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "/opt/histomarker/healthcheck.py", "grpc"]
# exec: the service is PID 1's only child of note and gets SIGTERM for its graceful stop.
CMD ["sh", "-c", "exec histomarker serve \"$SERVICE\""]
