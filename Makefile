# Switchyard entry points. `make run` and `make test` set everything up from a clean clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MODELS ?= models
PROTO_SRC := $(wildcard protos/switchyard/v1/*.proto)
PROTO_OUT := libs/switchyard/v1

BENCH_VENV ?= .venv-bench

.PHONY: all venv proto model tiny-model certs run test test-fast fuzz chaos bench bench-deps bench-model gpu-check clean

all: proto

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test]'
	touch $@

venv: $(VENV)/.installed

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

run: model
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

gpu-check: model
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(PROTO_OUT) build *.egg-info
