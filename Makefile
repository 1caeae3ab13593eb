# Switchyard entry points. `make run` and `make test` set everything up from a clean clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MODELS ?= models
PROTO_SRC := $(wildcard protos/switchyard/v1/*.proto)
PROTO_OUT := libs/switchyard/v1

BENCH_VENV ?= .venv-bench

.PHONY: all venv proto model tiny-model certs run test test-fast fuzz chaos bench bench-deps bench-model gpu-deps gpu-check gpu-bench clean

all: proto

# onnxruntime-gpu (the CPU provider included) replaces onnxruntime: both install the
# `onnxruntime` module, so a venv made before the switch has plain onnxruntime removed and
# onnxruntime-gpu reinstalled over the files the two shared.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test]'
	if $(PIP) show onnxruntime >/dev/null 2>&1; then \
	  $(PIP) uninstall -y onnxruntime && \
	  $(PIP) install --force-reinstall --no-deps "onnxruntime-gpu==$$($(PY) -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')"; \
	fi
	$(PY) -c 'import onnxruntime'
	touch $@

venv: $(VENV)/.installed

# On a machine with an NVIDIA GPU (nvidia-smi lists one): CUDA and cuDNN as pip packages (the
# `gpu` extra), found by the worker through onnxruntime's preload_dlls. Nothing elsewhere.
gpu-deps: $(VENV)/.installed
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  if [ ! -f $(VENV)/.gpu-installed ] || [ pyproject.toml -nt $(VENV)/.gpu-installed ]; then \
	    $(PIP) install -e '.[test,gpu]' && touch $(VENV)/.gpu-installed; fi; \
	fi

# Generated protobuf package: git-ignored, rebuilt when a .proto changes.
$(PROTO_OUT)/__init__.py: $(PROTO_SRC) $(VENV)/.installed
	rm -rf $(PROTO_OUT)
	mkdir -p $(PROTO_OUT)
	$(PY) -m grpc_tools.protoc -I protos --python_out=libs --grpc_python_out=libs --pyi_out=libs $(PROTO_SRC)
	echo '"""Generated from protos/switchyard/v1 by `make proto`; do not edit."""' > $@

proto: $(PROTO_OUT)/__init__.py

# Real model: SmolLM2-135M-Instruct GGUF -> ONNX fp32 + int4 (cached, idempotent).
model: proto
	$(PY) -m switchyard.cli model convert --models-dir $(MODELS)

tiny-model: proto
	$(PY) -m switchyard.cli model tiny --models-dir $(MODELS)

# Development CA, server and client certificates for TLS on every hop (`switchyard up --tls runs/certs`).
certs: proto
	$(PY) -m switchyard.cli certs --out runs/certs

run: model gpu-deps
	$(PY) -m switchyard.cli up --models-dir $(MODELS)

test: proto
	$(PY) -m pytest -ra

# Skips the real-model tests marked slow (CI runs them all through `make test`).
test-fast: proto
	$(PY) -m pytest -ra -m "not slow"

# Faults injected into the real stack: kill -9 of workers and batchers, SIGSTOP, a nats-server
# restart, 5× overload, drains with streams in flight (also part of `make test`).
chaos: proto
	$(PY) -m pytest -ra -m chaos

# Property-based fuzzing of the HTTP and gRPC APIs, longer than the bounded run in `make test`.
FUZZ_EXAMPLES ?= 2000
fuzz: proto
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -ra tests/test_fuzz.py

bench: model
	$(PY) bench/stack_overhead.py

# Reference engines for the model benchmark, in their own virtualenv (llama-cpp-python
# compiles for ~15 minutes; onnxruntime-genai brings its own onnxruntime). Not part of `make test`.
$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --upgrade pip
	$(BENCH_VENV)/bin/pip install numpy llama-cpp-python onnxruntime-genai
	touch $@

bench-deps: $(BENCH_VENV)/.installed

bench-model: model bench-deps
	$(PY) bench/model_throughput.py --reference-python $(BENCH_VENV)/bin/python

gpu-check: model gpu-deps
	$(PY) bench/gpu_check.py

# The GPU benchmark (bench/gpu_bench.py): correctness against the CPU engine, decode tok/s at
# batch 1-256, TTFT, the whole stack at 64/256 streams, GPU memory; one JSON file.
GPU_BENCH_OUT ?= runs/gpu_bench.json
GPU_BENCH_ARGS ?= --provider cuda
gpu-bench: model gpu-deps
	$(PY) bench/gpu_bench.py $(GPU_BENCH_ARGS) --out $(GPU_BENCH_OUT)

clean:
	rm -rf $(PROTO_OUT) build *.egg-info
