# Set-up and entry points. `make run` and `make test` work from a fresh clone:
# they create .venv, install dependencies, build the extension and go.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.densepipe-installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)  # dvc.yaml's commands call `densepipe`
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: all venv install run test lint bench ui cuda-headers clean

all: run

# --system-site-packages: a machine's own torch (e.g. a CUDA build) stays visible and untouched.
$(PY):
	python3 -m venv --system-site-packages $(VENV)

venv: $(PY)

# torch first, and only when none is importable: an open range would pull a CUDA build.
$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install "setuptools>=68" wheel ninja
	$(PIP) install --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# cuBLASLt headers for compiling the CUDA sources where the toolkit lacks them
# (unpacked from PyPI's nvidia-cublas wheel; nothing is installed).
cuda-headers: $(PY)
	$(PY) -m densepipe._cuda_headers $(VENV)/cuda-headers

run: install
	$(VENV)/bin/dvc repro
	$(PY) -m densepipe where

# Two pytest workers: the pipeline tests spend much of their time starting stage processes,
# whose imports run on one core, so a second worker keeps the other core busy (the suite
# takes about 70% of the serial time on 2 cores). --dist loadfile keeps each test file on one
# worker, so a file's shared fixtures (a project built once) are built once.
# `make test TEST_WORKERS=0` runs the suite in this process, one test after another.
TEST_WORKERS ?= 2

test: install
	@command -v nvcc >/dev/null && $(MAKE) --no-print-directory cuda-headers || true
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/bench_dense.py
	$(PY) benchmarks/bench_chain.py
	$(PY) benchmarks/bench_optim.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf build src/densepipe/*.so src/*.egg-info

ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db" --host 127.0.0.1 --port 5000
