"""The replica lifecycle API's local backend on a live stack: a replica added while the
stack serves takes traffic; one removed while it holds requests drains — every accepted
request completes (the running ones on it, the queued ones re-dispatched by the router)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from conftest import TINY, start_stack, wait_for_replicas
from switchyard.runtime.lifecycle import READY, LocalFleetBackend
from switchyard.v1 import generate_pb2, generate_pb2_grpc

pytestmark = [pytest.mark.integration]


def complete_all(address: str, n: int, max_tokens: int, timeout_s: float = 90.0) -> list[generate_pb2.CompleteResponse | str]:
    """n concurrent Complete calls; each result is the response or the error text."""
    def one(i: int) -> generate_pb2.CompleteResponse | str:
        with grpc.insecure_channel(address) as ch:
            req = generate_pb2.GenerateRequest(model=TINY, text=f"request {i} goes on and on", max_tokens=max_tokens,
                                               stop=generate_pb2.StopConditions(ignore_eos=True))
            try:
                return generate_pb2_grpc.GenerationStub(ch).Complete(req, timeout=timeout_s)
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def wait_state(backend: LocalFleetBackend, rid: str, state: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [r for r in backend.replicas(TINY) if r.replica_id == rid]
        if found and found[0].state == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"{rid} not {state} in {timeout_s}s: {backend.replicas(TINY)}")


def test_add_then_remove_a_replica_under_load_loses_no_request(tiny_models_dir: Path, tmp_path: Path) -> None:
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path, max_batch_size=2,
                        router_args=("--heartbeat-misses", "10"))  # a busy machine delays heartbeats
    try:
        backend = LocalFleetBackend(stack)
        assert [r.replica_id for r in backend.replicas(TINY)] == [f"{TINY}-0"]
        rid = backend.add_replica(TINY)
        wait_state(backend, rid, READY)
        ready = next(r for r in backend.replicas(TINY) if r.replica_id == rid)
        assert ready.cold_start_s is not None and ready.cold_start_s > 0
        wait_for_replicas(stack, 2)
        with ThreadPoolExecutor(1) as pool:
            # 8 long requests over 2 replicas of 2 slots: each replica runs 2 and has more queued.
            results = pool.submit(complete_all, stack.router_address, 8, 150)
            time.sleep(1.5)
            new_batcher = next(b for b in stack.batchers if b.name == f"batcher-{rid}")
            backend.remove_replica(TINY, rid)
            done = results.result(timeout=120)
        errors = [r for r in done if isinstance(r, str)]
        assert not errors, errors
        assert all(r.summary.usage.completion_tokens == 150 for r in done)  # type: ignore[union-attr]
        served_by = {r.summary.replica_id for r in done}  # type: ignore[union-attr]
        assert rid in served_by  # the removed replica finished what it was running while draining
        assert f"{TINY}-0" in served_by
        deadline = time.monotonic() + 30
        while backend.replicas(TINY) != [] and len(backend.replicas(TINY)) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [r.replica_id for r in backend.replicas(TINY)] == [f"{TINY}-0"]
        assert new_batcher.process.poll() is not None  # drained and exited
        assert all(b.name != f"batcher-{rid}" for b in stack.batchers)  # out of supervision
        wait_for_replicas(stack, 1)
    finally:
        stack.stop()


def test_a_replica_that_cannot_start_is_reported_failed(tiny_models_dir: Path, tmp_path: Path) -> None:
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path)
    try:
        backend = LocalFleetBackend(stack, start_timeout_s=10)  # a worker without weights never serves
        with pytest.raises(ValueError, match="no model folder"):
            backend.add_replica("no-such-model")
        onnx = next((tiny_models_dir / TINY).glob("*.onnx"))
        hidden = onnx.with_name(onnx.name + ".hidden")
        onnx.rename(hidden)  # the next worker cannot load its weights (it stays up, never serving)
        try:
            rid = backend.add_replica(TINY)
            wait_state(backend, rid, "failed", timeout_s=30)
        finally:
            hidden.rename(onnx)
        failed = next(r for r in backend.replicas(TINY) if r.replica_id == rid)
        assert "did not start" in failed.error and failed.ready_at is None
        assert all(w.name != f"worker-{rid}" for w in stack.workers)  # never supervised, never restarted
        backend.forget(TINY, rid)
        assert [r.replica_id for r in backend.replicas(TINY)] == [f"{TINY}-0"]
    finally:
        stack.stop()


def test_removing_a_replica_with_a_long_queue_loses_none_of_it(tiny_models_dir: Path, tmp_path: Path) -> None:
    """More requests queued on the removed replica than the router's retry budget allows for
    failures (10 per 10 s): moving them off a draining replica is not a retry of a failure."""
    stack = start_stack(tiny_models_dir, {TINY: 2}, tmp_path, max_batch_size=1, balancing="round_robin",
                        router_args=("--heartbeat-misses", "10", "--queue-limit", "200"))  # 80 clients on 2 cores
    try:
        backend = LocalFleetBackend(stack)
        wait_for_replicas(stack, 2)
        with ThreadPoolExecutor(1) as pool:
            results = pool.submit(complete_all, stack.router_address, 80, 250)
            time.sleep(3.0)  # ~1/8 of the work done: dozens still queued for each replica
            backend.remove_replica(TINY, f"{TINY}-1")
            done = results.result(timeout=180)
        errors = [r for r in done if isinstance(r, str)]
        assert not errors, errors[:3]
        assert all(r.summary.usage.completion_tokens == 250 for r in done)  # type: ignore[union-attr]
        assert stack.router is not None and stack.router.log_path is not None
        moved = [line for line in stack.router.log_path.read_text().splitlines()
                 if f"replica {TINY}-1 left the fleet" in line or f"replica {TINY}-1 stalled" in line]
        assert len(moved) > 10  # more re-dispatches than the retry budget's floor: none refused
    finally:
        stack.stop()
