# histomarker: `make test` and `make demo` set up everything they need on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip's local mirrors print one harmless warning per package; keep the rest.
QUIET_PIP := awk '!/^WARNING: Location/'
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STUBS := services/common/stubs/histomarker/v1/__init__.py
PROTOS := $(wildcard protos/histomarker/v1/*.proto)
# The opencv build staintools would pull in needs a display; we use the headless one.
OPENCV_HEADLESS := opencv-python-headless==5.0.0.93
PYTEST_ARGS ?=

.PHONY: all test demo lint format stubs install system-deps clean

all: test

# System packages, installed with apt-get only when missing (Java 17 for TorchServe;
# headless Chromium renders the analysis report in its test; docker-compose validates
# docker-compose.yml without a Docker engine).
system-deps:
	@need=""; \
	if ! command -v java >/dev/null 2>&1 || ! java -version 2>&1 | grep -qE 'version "(1[7-9]|2[0-9])'; then \
		need="$$need openjdk-17-jre-headless"; fi; \
	if ! command -v chromium >/dev/null 2>&1; then \
		need="$$need chromium"; fi; \
	if ! command -v docker-compose >/dev/null 2>&1; then \
		need="$$need docker-compose"; fi; \
	if [ -n "$$need" ]; then \
		echo "installing system packages:$$need"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need; \
	fi

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)

# torch first, by itself: its pinned release installs from local files.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q -e '.[test]' 2>&1 | $(QUIET_PIP)
	$(BIN)/pip uninstall -y -q opencv-python 2>/dev/null || true
	$(BIN)/pip install -q --force-reinstall --no-deps $(OPENCV_HEADLESS) 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import torch, torchvision, staintools, cv2, openslide, grpc, prefect, minio, ts, timm, open_clip, safetensors, h5py" 
	touch $(STAMP)

install: system-deps $(STAMP)

$(STUBS): $(PROTOS) services/common/protogen.py | $(STAMP)
	$(BIN)/python -m services.common.protogen

stubs: $(STUBS)

lint: install stubs
	$(BIN)/ruff check services flows tests benchmarks
	$(BIN)/ruff format --check services flows tests benchmarks
	$(BIN)/mypy

format: install
	$(BIN)/ruff format services flows tests benchmarks
	$(BIN)/ruff check --fix services flows tests benchmarks

test: install stubs lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install stubs
	$(BIN)/histomarker demo

clean:
	rm -rf services/common/stubs .pytest_cache .mypy_cache .ruff_cache
