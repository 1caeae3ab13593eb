"""The autoscaler on a live local stack (real processes, the tiny model): a load step scales a
model up and the new replica takes traffic; removing the load scales it down with every
request completed; a model scaled to zero serves its next request after a cold start; min and
max hold; a replica that fails to start is reported, retried with backoff and never counted.

The autoscaler runs as `switchyard up --autoscale` runs it: its loop in a thread of the process
that owns the stack, driving the local lifecycle backend, with the shipped reactive policy
(short stabilisation windows through its options)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from conftest import TINY, Load, start_stack, wait_for_replicas
from services.autoscaler.config import AutoscalerConfig
from services.autoscaler.server import AutoscalerThread
from switchyard.config import load_config
from switchyard.runtime.lifecycle import STARTING, READY, LocalFleetBackend
from switchyard.runtime.stack import LocalStack
from switchyard.v1 import generate_pb2, generate_pb2_grpc

pytestmark = [pytest.mark.integration]

FAST = ("scale_up_window_s=0", "scale_down_window_s=1", "target_utilisation=1.0")


def autoscaler(stack: LocalStack, models: str, backend: LocalFleetBackend | None = None, **kw: object) -> AutoscalerThread:
    assert stack.nats is not None
    creds = stack.nats_credentials("autoscaler")
    config = load_config(AutoscalerConfig, [], nats_url=stack.nats.url, models=(models,), backend="local",
                         nats_user=creds.get("user"), nats_password=creds.get("password"),
                         grpc_port=0, tick_s=0.2, policy_options=FAST, service_rate_per_replica=1000.0, **kw)
    return AutoscalerThread(config, backend or LocalFleetBackend(stack)).start()


def wait_until(what: str, check: "callable[[], bool]", timeout_s: float = 60.0) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def test_load_step_scales_up_and_load_removal_scales_down_completing_every_request(
        tiny_models_dir: Path, tmp_path: Path) -> None:
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path, max_batch_size=2,  # 8 clients on 2 shared cores
                        router_args=("--demand-interval-s", "0.2", "--heartbeat-misses", "10"))  # delay heartbeats
    counts: list[int] = []
    sampling = threading.Event()
    try:
        backend = LocalFleetBackend(stack)

        def sample() -> None:  # replicas asked for (starting + ready), all along
            while not sampling.is_set():
                counts.append(sum(1 for r in backend.replicas(TINY) if r.state in (STARTING, READY)))
                time.sleep(0.05)
        threading.Thread(target=sample, daemon=True).start()
        with autoscaler(stack, f"{TINY}=1:2:reactive", backend) as scaler:
            heavy = Load(stack, clients=8)  # 8 in flight over 2 slots: wants 4, max is 2
            wait_for_replicas(stack, 2, timeout_s=60)
            added = [e.detail for e in scaler.autoscaler.events if e.kind == "add"]
            assert len(added) == 1
            wait_until("the new replica served a request",
                       lambda: any(not isinstance(r, str) and r.summary.replica_id == added[0] for r in heavy.results))
            heavy_results = heavy.stop()
            light = Load(stack, clients=2)  # 2 in flight over 2 slots: one replica is enough
            wait_until("scaled down to one replica", lambda: len(backend.replicas(TINY)) == 1, timeout_s=60)
            removed = [e for e in scaler.autoscaler.events if e.kind == "remove"]
            time.sleep(1.0)
            light_results = light.stop()
        sampling.set()
        results = heavy_results + light_results
        errors = [r for r in results if isinstance(r, str)]
        assert not errors, errors[:5]
        assert all(r.summary.usage.completion_tokens == 200 for r in results)  # type: ignore[union-attr]
        assert len(removed) == 1 and len(light_results) >= 2
        assert max(counts) == 2 and min(counts) == 1  # max and min held throughout
        wait_for_replicas(stack, 1)
    finally:
        sampling.set()
        stack.stop()


def test_scale_to_zero_then_one_request_succeeds_after_a_cold_start(tiny_models_dir: Path, tmp_path: Path) -> None:
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path,
                        router_args=("--demand-interval-s", "0.2", "--replica-wait-s", "60"))
    cold_file = tmp_path / "cold_start.json"
    try:
        backend = LocalFleetBackend(stack)
        with autoscaler(stack, f"{TINY}=0:1:reactive:1.5", backend, cold_start_file=cold_file) as scaler:
            wait_until("scaled to zero", lambda: not backend.replicas(TINY), timeout_s=30)
            with grpc.insecure_channel(stack.router_address) as ch:
                stub = generate_pb2_grpc.GenerationStub(ch)
                wait_until("the router lists no replica",
                           lambda: all(m.replicas == 0 for m in stub.ListModels(generate_pb2.ListModelsRequest()).models))
                t0 = time.monotonic()
                reply = stub.Complete(generate_pb2.GenerateRequest(model=TINY, text="wake up", max_tokens=20),
                                      timeout=60)
                waited = time.monotonic() - t0
            assert reply.summary.usage.completion_tokens > 0
            assert reply.summary.replica_id.startswith(f"{TINY}-s")  # a replica started for it
            costs = scaler.autoscaler.cold_starts
            wait_until("the cold start measured (next tick)", lambda: costs.get(TINY) != costs.default_s, timeout_s=5)
            cold = costs.get(TINY)
            assert 0 < cold < waited  # the request waited out the cold start
            # The cold start is read at an autoscaler tick (tick_s=0.2 here), so it can read up to
            # a tick late; the request's TTFT holds the whole real cold start.
            assert reply.summary.timings.time_to_first_token_s > cold - 0.2
            assert json.loads(cold_file.read_text())[TINY] == pytest.approx(cold)
            assert any(e.kind == "decision" and "zero" in e.detail for e in scaler.autoscaler.events)
    finally:
        stack.stop()


def test_a_replica_that_fails_to_start_is_reported_retried_and_not_counted(tiny_models_dir: Path, tmp_path: Path) -> None:
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path)
    onnx = next((tiny_models_dir / TINY).glob("*.onnx"))
    hidden = onnx.with_name(onnx.name + ".hidden")
    before = REGISTRY.get_sample_value("switchyard_autoscaler_start_failures_total", {"model": TINY}) or 0.0
    try:
        backend = LocalFleetBackend(stack, start_timeout_s=2.0)
        onnx.rename(hidden)  # new workers cannot load the weights
        with autoscaler(stack, f"{TINY}=2:3:reactive", backend, retry_base_s=1.0) as scaler:
            events = scaler.autoscaler.events
            wait_until("two failed starts", lambda: sum(e.kind == "start_failed" for e in events) >= 2, timeout_s=40)
            adds = [e.at for e in events if e.kind == "add"]
            fails = [e.at for e in events if e.kind == "start_failed"]
            assert adds[1] - fails[0] >= 1.0 - 0.05  # retried after the backoff, not at once
            ready, asked = scaler.autoscaler.replica_count(TINY)
            assert ready == 1 and asked <= 2  # the failed ones are not capacity
            failures = REGISTRY.get_sample_value("switchyard_autoscaler_start_failures_total", {"model": TINY})
            assert failures is not None and failures - before >= 2
            hidden.rename(onnx)
            wait_for_replicas(stack, 2, timeout_s=60)  # a later retry succeeds: min 2 reached
    finally:
        if hidden.exists():
            hidden.rename(onnx)
        stack.stop()
