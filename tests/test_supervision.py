"""Supervision, not teardown: a crashed worker or batcher is restarted while the other
replica keeps serving, its requests finish elsewhere, and nothing is left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from switchyard.runtime.stack import LocalStack
from switchyard.v1 import generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc

from conftest import TINY, start_stack
from test_failover import disturbed_run, requests, stream_all

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture
def supervised(tiny_models_dir: Path, tmp_path: Path) -> Iterator[LocalStack]:
    stack = start_stack(tiny_models_dir, {TINY: 2}, tmp_path, max_batch_size=4,
                        router_args=("--stall-timeout-s", "1.0"))
    stack.start_supervisor()
    yield stack
    stack.stop()


def replicas_serving(stack: LocalStack) -> int:
    with grpc.insecure_channel(stack.router_address) as ch:
        models = generate_pb2_grpc.GenerationStub(ch).ListModels(generate_pb2.ListModelsRequest()).models
    return models[0].replicas if models else 0


def wait_until(predicate: "callable[[], bool]", timeout_s: float, what: str) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def served_by(stack: LocalStack, n: int) -> set[str]:
    results = asyncio.run(stream_all(stack.router_address, requests(n, max_tokens=8)))
    assert all(final is not None for _, final, _ in results), [e for _, _, e in results if e][:3]
    return {final.replica_id for _, final, _ in results if final is not None}


def test_a_killed_worker_is_restarted_and_serves_again(supervised: LocalStack) -> None:
    stack = supervised
    wait_until(lambda: replicas_serving(stack) == 2, 20, "two replicas")
    reqs = requests(12, max_tokens=100)
    results = disturbed_run(stack, reqs, lambda: os.kill(stack.workers[0].process.pid, signal.SIGKILL))
    assert [e for _, final, e in results if final is None] == []
    assert all(final.usage.completion_tokens == 100 for _, final, _ in results if final is not None)
    wait_until(lambda: stack.restarts.get(stack.workers[0].name) == 1, 10, "the worker's restart")
    wait_until(lambda: replicas_serving(stack) == 2, 30, "the restarted replica to rejoin")
    assert served_by(stack, 8) == {"tiny-llama-0", "tiny-llama-1"}


def test_a_killed_batcher_loses_nothing_and_leaves_nothing_on_its_worker(supervised: LocalStack) -> None:
    stack = supervised
    wait_until(lambda: replicas_serving(stack) == 2, 20, "two replicas")
    # 16 long streams on 2 replicas with batches of 4: each replica runs 4 and queues 4
    reqs = requests(16, max_tokens=120)
    undisturbed = asyncio.run(stream_all(stack.router_address, reqs))
    results = disturbed_run(stack, reqs, lambda: os.kill(stack.batchers[0].process.pid, signal.SIGKILL))
    assert [e for _, final, e in results if final is None] == []
    assert [t for t, _, _ in results] == [t for t, _, _ in undisturbed]  # none lost, repeated or changed
    wait_until(lambda: stack.restarts.get(stack.batchers[0].name) == 1, 10, "the batcher's restart")
    wait_until(lambda: replicas_serving(stack) == 2, 30, "the restarted replica to rejoin")
    # the restarted batcher started from a clean worker, and full batches are accepted again
    # (it left the fleet while down, so it comes back with a clean record, not ejected)
    assert served_by(stack, 16) == {"tiny-llama-0", "tiny-llama-1"}

    def idle() -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{stack.workers[0].port}") as ch:
            return worker_pb2_grpc.WorkerStub(ch).Info(worker_pb2.InfoRequest(), metadata=stack.worker_metadata(
                stack.workers[0])).active_sequences == 0
    wait_until(idle, 30, "the worker to hold no sequence")


def test_a_worker_restarted_while_its_batcher_idles_serves_the_next_request(tiny_models_dir: Path,
                                                                             tmp_path: Path) -> None:
    """The batcher's step stream to a worker that died while nothing ran is dead: the next
    request must open a new one, not fail on the old (one replica: there is nowhere to fail over)."""
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path)
    stack.start_supervisor()
    try:
        wait_until(lambda: replicas_serving(stack) == 1, 20, "the replica")
        assert served_by(stack, 2) == {"tiny-llama-0"}  # the batcher's stream is open now
        os.kill(stack.workers[0].process.pid, signal.SIGKILL)
        wait_until(lambda: stack.restarts.get(stack.workers[0].name) == 1, 10, "the worker's restart")
        wait_until(lambda: replicas_serving(stack) == 1, 30, "the restarted replica to rejoin")
        log = stack.batchers[0].log_path
        assert log is not None
        before = log.stat().st_size
        results = asyncio.run(stream_all(stack.router_address, requests(4, max_tokens=8)))
        assert [e for _, final, e in results if final is None] == []
        assert all(final is not None and final.usage.completion_tokens == 8 for _, final, _ in results)
        with open(log, encoding="utf-8") as f:
            f.seek(before)
            after = f.read()
        # served at the first try: no step failed and bounced them back through the router
        assert "worker call failed" not in after and "scheduler iteration failed" not in after, after[-2000:]
    finally:
        stack.stop()
