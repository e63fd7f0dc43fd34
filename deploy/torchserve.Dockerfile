# syntax=docker/dockerfile:1
# TorchServe 0.12.0 on Java 17 with histomarker's handler code installed (the .mar
# archives reference services.inference.handler). Token authorization on; the key
# file lands in /var/lib/torchserve/keys (a volume prediction and flows read). The
# entrypoint starts TorchServe, then registers the model versions the object store's
# serving records name (`histomarker models restore`); the health check passes only
# after that.
#   docker build -f deploy/torchserve.Dockerfile -t histomarker-torchserve .
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
 && python -c "import ts, services.inference.handler"

FROM ${PYTHON_IMAGE} AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 histomarker \
 && useradd --system --uid 10001 --gid histomarker --create-home --home-dir /home/histomarker histomarker \
 && install -d -o histomarker -g histomarker /var/lib/torchserve/keys /var/lib/torchserve/logs \
      /var/lib/torchserve/tmp /model-store
COPY --from=build /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/histomarker/healthcheck.py
COPY deploy/torchserve_entrypoint.py /opt/histomarker/torchserve_entrypoint.py
COPY deploy/torchserve.properties /opt/histomarker/config.properties
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LOG_LOCATION=/var/lib/torchserve/logs \
    METRICS_LOCATION=/var/lib/torchserve/logs \
    TEMP=/var/lib/torchserve/tmp \
    TMPDIR=/var/lib/torchserve/tmp
USER histomarker
# TorchServe writes key_file.json into its working folder.
WORKDIR /var/lib/torchserve/keys
EXPOSE 8080 8081 8082 7070 7071
# Healthy once TorchServe answers /ping and the recorded models are back (restoring
# seven models on CPUs takes minutes: a long start period).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "/opt/histomarker/healthcheck.py", "torchserve"]
# torchserve --start --foreground --ts-config /opt/histomarker/config.properties
#   --model-store /model-store --ncs --enable-model-api, then the restore.
CMD ["python", "/opt/histomarker/torchserve_entrypoint.py"]
