"""Shared fixtures: real nats-server, real service processes, real model folders.

Integration fixtures start the same LocalStack that `switchyard up` runs, on free ports,
and wait on health before yielding."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from switchyard.bus.server import NatsServer
from switchyard.model.tiny import build_tiny_model
from switchyard.runtime.stack import LocalStack, StackSpec
from switchyard.v1 import generate_pb2, generate_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny-llama"


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model built as served models are: the fused graph (GroupQueryAttention, KV pool)."""
    models = tmp_path_factory.mktemp("models")
    build_tiny_model(models, name=TINY, seed=0)
    return models


@pytest.fixture(scope="session")
def tiny_plain_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model (same weights, same name) as the plain-op graph."""
    models = tmp_path_factory.mktemp("models-plain")
    build_tiny_model(models, name=TINY, seed=0, graph="plain")
    return models


@pytest.fixture(scope="session", params=["fused", "plain"])
def tiny_graph_models_dir(request: pytest.FixtureRequest) -> Path:
    """tiny_models_dir, then tiny_plain_models_dir: a test using it runs once per graph kind."""
    return request.getfixturevalue("tiny_models_dir" if request.param == "fused" else "tiny_plain_models_dir")


@pytest.fixture(scope="session")
def real_models_dir() -> Path:
    """The real SmolLM2 models, converted once per machine into the same folder `make run`
    uses (override with SWITCHYARD_TEST_MODELS_DIR)."""
    from switchyard.model.convert import convert_gguf
    models = Path(os.environ.get("SWITCHYARD_TEST_MODELS_DIR", REPO / "models"))
    convert_gguf(models)
    return models


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


def start_stack(models_dir: Path, replicas: dict[str, int], tmp: Path, **kw: object) -> LocalStack:
    spec = StackSpec(models_dir=models_dir, replicas=replicas, heartbeat_s=0.2, log_dir=tmp, **kw)  # type: ignore[arg-type]
    return LocalStack(spec).start()


@pytest.fixture(scope="session")
def tiny_stack(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Two tiny-model replicas behind a router; shared by the tests that do not break it."""
    stack = start_stack(tiny_models_dir, {TINY: 2}, tmp_path_factory.mktemp("tiny-stack-logs"))
    yield stack
    stack.stop()


@pytest.fixture
def channel(tiny_stack: LocalStack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(tiny_stack.router_address) as ch:
        yield ch


def wait_for_replicas(stack: LocalStack, n: int, timeout_s: float = 30.0) -> None:
    """Until the router lists `n` replicas of the stack's (first) model."""
    import time

    from switchyard.v1 import generate_pb2, generate_pb2_grpc
    with stack.grpc_channel() as ch:  # TLS when the stack runs it
        stub = generate_pb2_grpc.GenerationStub(ch)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            models = stub.ListModels(generate_pb2.ListModelsRequest(), metadata=stack.auth_metadata()).models
            if models and models[0].replicas == n:
                return
            time.sleep(0.1)
    raise AssertionError(f"the router did not list {n} replicas within {timeout_s}s")


class Load:
    """`clients` threads each sending Complete calls back to back to the stack's router (over
    TLS and with its API key when the stack has them) until stop()."""

    def __init__(self, stack: LocalStack, clients: int, max_tokens: int = 200) -> None:
        self.stack, self.max_tokens = stack, max_tokens
        self.results: list[generate_pb2.CompleteResponse | str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in self._threads:
            t.start()

    def _client(self, i: int) -> None:
        with self.stack.grpc_channel() as ch:
            stub = generate_pb2_grpc.GenerationStub(ch)
            n = 0
            while not self._stop.is_set():
                n += 1
                req = generate_pb2.GenerateRequest(model=TINY, text=f"client {i} request {n}", max_tokens=self.max_tokens,
                                                   stop=generate_pb2.StopConditions(ignore_eos=True))
                try:
                    self.results.append(stub.Complete(req, timeout=90, metadata=self.stack.auth_metadata()))
                except grpc.RpcError as exc:
                    self.results.append(f"{exc.code().name}: {exc.details()}")

    def stop(self) -> list[generate_pb2.CompleteResponse | str]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        return self.results


def up_grpc_address(output: str) -> str:
    """The router's gRPC address from `switchyard up`'s "Switchyard is up  gRPC HOST:PORT" line
    (tests start it on port 0: a port picked beforehand may be taken by the time the router binds)."""
    found = re.search(r"Switchyard is up\s+gRPC (\S+:\d+)", output)
    assert found, output
    return found.group(1)


def start_switchyard_up(cwd: Path, args: list[str], timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`switchyard up ARGS` as a user starts it, in ``cwd``; returns the process and what it printed
    up to its "Ctrl-C stops every process" line (or its exit)."""
    up = subprocess.Popen([sys.executable, "-m", "switchyard.cli", "up", *args], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    assert up.stdout is not None
    lines = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = up.stdout.readline()
        lines.append(line)
        if "Ctrl-C stops every process" in line or not line:
            break
    return up, "".join(lines)
