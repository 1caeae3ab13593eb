"""Oversized inputs are refused before tokenization, and long ones are tokenized off the
router's event loop: neither stalls other tenants' streams."""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import pytest

from switchyard.runtime.stack import LocalStack
from switchyard.v1 import generate_pb2, generate_pb2_grpc

from conftest import TINY

pytestmark = pytest.mark.integration


def test_a_900_kb_prompt_is_refused_at_once_and_a_running_stream_keeps_flowing(tiny_stack: LocalStack) -> None:
    gaps: list[float] = []

    def stream() -> None:
        req = generate_pb2.GenerateRequest(model=TINY, text="keep going", max_tokens=200,
                                           stop=generate_pb2.StopConditions(ignore_eos=True))
        with grpc.insecure_channel(tiny_stack.router_address) as ch:
            last = time.monotonic()
            for event in generate_pb2_grpc.GenerationStub(ch).Generate(req, timeout=60):
                now = time.monotonic()
                gaps.append(now - last)
                last = now

    runner = threading.Thread(target=stream)
    runner.start()
    huge = "word " * 180_000  # 900 KB
    with httpx.Client(timeout=30) as client:
        for _ in range(5):
            t0 = time.monotonic()
            resp = client.post(f"{tiny_stack.http_url}/v1/completions", json={"model": TINY, "prompt": huge, "max_tokens": 4})
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt", resp.text[:300]
            assert "cannot fit the context" in resp.json()["error"]["message"]
            assert time.monotonic() - t0 < 1.0  # parsing 900 KB of JSON, not tokenizing it
    runner.join()
    assert len(gaps) > 10 and max(gaps[1:]) < 1.0
