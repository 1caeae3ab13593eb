"""Drains have a hard limit: a router stopped (SIGTERM) with a stream in flight exits within
its grace period instead of waiting for the stream to end."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import TINY, start_stack

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_router_sigterm_with_an_http_stream_in_flight_exits_within_grace(tiny_models_dir: Path, tmp_path: Path) -> None:
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path, router_args=("--grace-s", "1.0"))
    try:
        assert stack.router is not None
        started = threading.Event()

        def stream() -> None:
            body = {"model": TINY, "prompt": "go on", "max_tokens": 250, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", f"{stack.http_url}/v1/completions", json=body, timeout=60) as resp:
                    for _ in resp.iter_lines():
                        started.set()
            except httpx.HTTPError:
                pass

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert started.wait(30)
        os.kill(stack.workers[0].process.pid, signal.SIGSTOP)  # the stream now stays open, silent
        time.sleep(0.5)
        t0 = time.monotonic()
        stack.router.process.send_signal(signal.SIGTERM)
        stack.router.process.wait(timeout=15)
        assert time.monotonic() - t0 < 4.0  # grace 1 s for HTTP, then gRPC's 1 s, not the stalled stream's end
    finally:
        os.kill(stack.workers[0].process.pid, signal.SIGCONT)
        stack.stop()
