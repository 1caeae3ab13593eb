"""A NATS outage: kill -9 nats-server and start it again on the same port. Requests during
the outage get UNAVAILABLE with a retry delay, service resumes within seconds of the server
coming back, no other process is restarted, and nobody floods the logs meanwhile."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from switchyard.runtime.stack import LocalStack
from switchyard.v1 import generate_pb2, generate_pb2_grpc

from conftest import TINY, start_stack

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture
def stack(tiny_models_dir: Path, tmp_path: Path) -> Iterator[LocalStack]:
    s = start_stack(tiny_models_dir, {TINY: 2}, tmp_path)
    yield s
    s.stop()


def ask(stub: generate_pb2_grpc.GenerationStub, timeout: float = 10) -> generate_pb2.FinalSummary:
    req = generate_pb2.GenerateRequest(model=TINY, token_ids=generate_pb2.TokenIds(ids=[5, 6, 7, 8]), max_tokens=8)
    for event in stub.Generate(req, timeout=timeout):
        if event.HasField("final"):
            return event.final
    raise AssertionError("no final event")


def test_service_resumes_after_nats_server_restarts(stack: LocalStack) -> None:
    assert stack.nats is not None and stack.nats.process is not None
    pids = {s.name: s.process.pid for s in stack.services()}
    log_sizes = {s.name: s.log_path.stat().st_size for s in stack.services() if s.log_path}
    with grpc.insecure_channel(stack.router_address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        assert ask(stub).usage.completion_tokens == 8
        stack.nats.process.kill()
        stack.nats.process.wait()
        time.sleep(2.0)
        # during the outage: a clear, retryable error at once, not a hang or a wrong code
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            ask(stub)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert time.monotonic() - t0 < 2.0
        retry = dict(err.value.trailing_metadata() or ()).get("retry-after-s")
        assert retry is not None and float(retry) > 0
        time.sleep(3.0)  # services keep retrying the connection meanwhile
        stack.nats.start()  # same port, same store
        back = time.monotonic()
        while True:
            try:
                ask(stub, timeout=5)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                assert time.monotonic() - back < 5.0, "not serving 5 s after nats-server came back"
                time.sleep(0.2)
        for _ in range(10):
            assert ask(stub).usage.completion_tokens == 8
    assert {s.name: s.process.pid for s in stack.services()} == pids  # nothing was restarted
    for s in stack.services():
        assert s.log_path is not None
        grown = s.log_path.read_text(errors="replace")[log_sizes[s.name]:]
        assert grown.count("\n") < 40, f"{s.name} logged {grown.count(chr(10))} lines during the outage:\n{grown[:3000]}"
