"""The autoscaler's pure parts with hand-built inputs: the router's demand tracker, config
parsing, and the tick's convergence (backoff after failed starts, what counts as capacity,
which replica goes first, the floor for waiting requests, cold starts kept on disk). The
backend here is a small in-memory FleetBackend; the live tests use the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.autoscaler.config import AutoscalerConfig
from services.autoscaler.scaling import ModelScaling
from services.autoscaler.core import Autoscaler, ColdStartStore, reason_label
from services.router.demand import DemandTracker, demand_subject
from switchyard.autoscaling.policy import Decision, Demand, ScalingLimits, ScalingPolicy
from switchyard.config import ConfigError, load_config
from switchyard.fleet.view import FleetView
from switchyard.runtime.lifecycle import FAILED, READY, STARTING, FleetBackend, Replica
from switchyard.v1 import bus_pb2

pytestmark = [pytest.mark.unit]


class Fixed(ScalingPolicy):
    """Wants `want` replicas whatever the demand; records what it was shown."""

    name = "fixed"

    def __init__(self, limits: ScalingLimits, want: int) -> None:
        super().__init__(limits)
        self.want = want
        self.seen: list[Demand] = []

    def decide(self, demand: Demand) -> Decision:
        self.seen.append(demand)
        return Decision(self.limits.clamp(self.want) if self.want else 0, f"fixed {self.want}")


class MemoryBackend(FleetBackend):
    def __init__(self) -> None:
        self.reps: dict[str, Replica] = {}
        self.removed: list[str] = []
        self.n = 0

    def replicas(self, model: str) -> list[Replica]:
        return [r for r in self.reps.values() if r.model == model]

    def add_replica(self, model: str) -> str:
        self.n += 1
        rid = f"{model}-{self.n}"
        self.reps[rid] = Replica(rid, model, STARTING, started_at=float(self.n))
        return rid

    def remove_replica(self, model: str, replica_id: str) -> None:
        self.removed.append(replica_id)
        del self.reps[replica_id]

    def forget(self, model: str, replica_id: str) -> None:
        if self.reps[replica_id].state == FAILED:
            del self.reps[replica_id]


def scaler_with(want: int, limits: str = "m=0:4", **kw: float) -> tuple[Autoscaler, MemoryBackend, Fixed]:
    backend = MemoryBackend()
    policies: list[Fixed] = []

    def factory(name: str, lim: ScalingLimits) -> ScalingPolicy:
        policies.append(Fixed(lim, want))
        return policies[-1]
    scaler = Autoscaler([ModelScaling.parse(limits)], backend, FleetView(), ColdStartStore(None, 7.0), factory, **kw)  # type: ignore[arg-type]
    return scaler, backend, policies[0]


def heartbeat(fleet: FleetView, rid: str, running: int = 0, queued: int = 0) -> None:
    fleet.observe(bus_pb2.LoadReport(replica_id=rid, model="m", running=running, queue_depth=queued,
                                     max_batch_size=4, interval_s=1000.0))  # the view expires on the real clock


def test_demand_tracker_rates_counts_and_idle_models() -> None:
    t = DemandTracker(window_s=10.0, idle_report_s=30.0)
    for i in range(20):
        t.arrived("a", now=100.0 + i * 0.5)  # 2 req/s for 10 s
    t.started("a"), t.started("a"), t.ended("a")
    t.wait_begins("b")
    reports = {r.model: r for r in t.reports("router-1", 1.0, now=110.0)}
    assert reports["a"].arrival_rate == pytest.approx(2.0, rel=0.06)
    assert reports["a"].in_flight == 1 and reports["a"].waiting == 0
    assert reports["b"].waiting == 1 and reports["b"].in_flight == 1  # waiting counts as in flight
    t.ended("a"), t.wait_ends("b")
    assert [r.model for r in t.reports("router-1", 1.0, now=125.0)] == ["a"]  # b: never arrived, nothing held
    assert t.reports("router-1", 1.0, now=200.0) == []  # a: idle longer than idle_report_s
    assert demand_subject("m.v1") == "switchyard.demand.m_v1"


def test_model_scaling_and_config_are_validated() -> None:
    s = ModelScaling.parse("tiny=0:3:predictive:120")
    assert (s.model, s.limits.min_replicas, s.limits.max_replicas, s.policy, s.limits.scale_to_zero_after_s) == \
        ("tiny", 0, 3, "predictive", 120.0)
    assert ModelScaling.parse("tiny=1:2").policy == "reactive"
    for bad in ("tiny", "tiny=1", "tiny=a:2", "tiny=3:2", "=1:2", "tiny=0:2:reactive:-1"):
        with pytest.raises(ConfigError):
            ModelScaling.parse(bad)
    with pytest.raises(ConfigError, match="name at least one"):
        load_config(AutoscalerConfig, [])
    with pytest.raises(ConfigError, match="backend"):
        load_config(AutoscalerConfig, ["--models", "a=1:2", "--backend", "docker"])
    with pytest.raises(ConfigError, match="key=number"):
        load_config(AutoscalerConfig, ["--models", "a=1:2", "--policy-options", "window=soon"])
    config = load_config(AutoscalerConfig, ["--models", "a=1:2,b=0:1", "--policy-options", "scale_down_window_s=5"])
    assert [m.model for m in config.scaling()] == ["a", "b"] and config.options() == {"scale_down_window_s": 5.0}


def test_a_failed_start_is_reported_backed_off_and_not_counted() -> None:
    scaler, backend, policy = scaler_with(1, retry_base_s=1.0, retry_max_s=4.0)
    scaler.tick(now=0.0)
    (rid,) = backend.reps
    backend.reps[rid].state, backend.reps[rid].error = FAILED, "worker exited with 1"
    scaler.tick(now=0.5)  # reported and forgotten; the retry waits 1 s
    assert [e.kind for e in scaler.events if e.kind != "decision"] == ["add", "start_failed"]
    assert backend.reps == {} and policy.seen[-1].starting_replicas == 0  # never counted
    scaler.tick(now=1.4)
    assert backend.reps == {}
    scaler.tick(now=1.6)
    (rid2,) = backend.reps
    backend.reps[rid2].state = FAILED
    scaler.tick(now=1.7)
    scaler.tick(now=3.6)  # second failure in a row: 2 s
    assert len(backend.reps) == 0
    scaler.tick(now=3.8)
    assert len(backend.reps) == 1


def test_starting_replicas_count_toward_the_decision_and_ready_ones_measure_cold_start(tmp_path: Path) -> None:
    scaler, backend, policy = scaler_with(2)
    scaler.cold_starts = ColdStartStore(tmp_path / "cold.json", 7.0)
    scaler.tick(now=0.0)
    scaler.tick(now=1.0)
    assert len(backend.reps) == 2  # not 4: the two starting ones count
    assert policy.seen[-1].starting_replicas == 2 and policy.seen[-1].cold_start_s == 7.0
    first = backend.reps["m-1"]
    first.state, first.ready_at = READY, first.started_at + 3.25
    heartbeat(scaler.fleet, "m-1")
    scaler.tick(now=2.0)
    assert policy.seen[-1].ready_replicas == 1 and policy.seen[-1].starting_replicas == 1
    assert json.loads((tmp_path / "cold.json").read_text()) == {"m": 3.25}
    assert ColdStartStore(tmp_path / "cold.json", 7.0).get("m") == 3.25  # survives a restart
    (tmp_path / "bad.json").write_text("{not json")
    assert ColdStartStore(tmp_path / "bad.json", 7.0).get("m") == 7.0


def test_scale_down_removes_starting_then_least_loaded_replicas() -> None:
    scaler, backend, policy = scaler_with(3)
    scaler.tick(now=0.0)
    for rid, running in (("m-1", 3), ("m-2", 0)):
        backend.reps[rid].state, backend.reps[rid].ready_at = READY, 1.0
        heartbeat(scaler.fleet, rid, running=running)
    policy.want = 1
    scaler.tick(now=1.0)
    assert backend.removed == ["m-3", "m-2"]  # the starting one, then the idle ready one; the busy one stays


def test_requests_waiting_for_a_replica_get_one_even_if_the_policy_says_zero() -> None:
    scaler, backend, _ = scaler_with(0)
    scaler.tick(now=0.0)
    assert backend.reps == {}
    scaler.observe_demand(bus_pb2.DemandReport(model="m", router_id="r1", waiting=1, in_flight=1, interval_s=1.0), now=1.0)
    decision = scaler.tick(now=1.5)["m"]
    assert decision.replicas == 1 and len(backend.reps) == 1
    assert scaler.waiting("m", now=1.5) == 1 and scaler.waiting("m", now=10.0) == 0  # stale reports stop counting


def test_demand_sums_routers_and_replica_queues() -> None:
    scaler, _, policy = scaler_with(1)
    heartbeat(scaler.fleet, "m-x", running=2, queued=5)
    for router, rate, flight in (("r1", 1.5, 4), ("r2", 0.5, 3)):
        scaler.observe_demand(bus_pb2.DemandReport(model="m", router_id=router, arrival_rate=rate, in_flight=flight,
                                                   interval_s=1.0), now=0.0)
    scaler.observe_demand(bus_pb2.DemandReport(model="m", router_id="r1", arrival_rate=2.5, in_flight=6,
                                               interval_s=1.0), now=0.5)  # r1's newer report replaces its older
    scaler.tick(now=1.0)
    d = policy.seen[-1]
    assert (d.arrival_rate, d.in_flight, d.queued, d.ready_replicas, d.slots_per_replica) == (3.0, 9, 5, 1, 4)


def test_reason_labels_stay_bounded() -> None:
    assert reason_label("scale up 1 → 3: utilisation 1.40 of target 0.70") == "scale_up"
    assert reason_label("hold 2: within tolerance") == "hold"
    assert reason_label("") == "unspecified"


@pytest.mark.integration
def test_the_autoscaler_process_serves_health_and_metrics_and_stops_on_sigterm(nats_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`python -m services.autoscaler` as its own process (the observe backend: compose's mode):
    health SERVING, a router's demand report for a model at zero turns into a decision of one
    replica on /metrics, SIGTERM stops it cleanly."""
    import asyncio
    import os
    import signal
    import subprocess
    import sys
    import time

    import grpc
    import httpx
    import nats
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port_file = tmp_path / "ports.json"
    proc = subprocess.Popen([sys.executable, "-m", "services.autoscaler", "--models", "tiny=0:2:reactive:5",
                             "--backend", "observe", "--grpc-port", "0", "--metrics-port", "0", "--tick-s", "0.2",
                             "--nats-url", nats_server.url, "--port-file", str(port_file)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")})
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text()) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            time.sleep(0.05)
        ports = json.loads(port_file.read_text())
        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING

        def desired() -> float | None:
            text = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5).text
            line = next((x for x in text.splitlines() if x.startswith('switchyard_autoscaler_desired_replicas{model="tiny"}')), None)
            return float(line.rsplit(" ", 1)[1]) if line else None

        deadline = time.monotonic() + 10
        while desired() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert desired() == 0.0  # min 0, no demand: nothing wanted

        async def demand() -> None:
            nc = await nats.connect(nats_server.url)
            report = bus_pb2.DemandReport(model="tiny", router_id="r1", waiting=1, in_flight=1, arrival_rate=0.5,
                                          interval_s=1.0)
            for _ in range(10):
                await nc.publish(demand_subject("tiny"), report.SerializeToString())
                await asyncio.sleep(0.2)
            await nc.drain()
        asyncio.run(demand())
        assert desired() == 1.0  # a request waits for a replica of a model at zero
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        out = proc.stdout.read().decode()  # type: ignore[union-attr]
        assert "tiny: 1 replicas wanted" in out and "autoscaler stopping" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
