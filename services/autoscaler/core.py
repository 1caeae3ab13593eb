"""What the autoscaler does each tick, without its I/O loop: per model, build a `Demand` from
the routers' demand reports and the fleet view, ask the model's policy, and converge the
backend toward the decision — counting replicas still starting, retrying failed starts with
backoff (never counting them as capacity), and measuring cold starts as replicas come up.
services/autoscaler/server.py feeds it from NATS; the tests drive it on a live stack."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from switchyard.autoscaling.capacity import ServiceRateEstimator
from switchyard.autoscaling.policy import Decision, Demand, ScalingLimits, ScalingPolicy
from switchyard.fleet.view import FleetView
from switchyard.runtime.lifecycle import FAILED, READY, STARTING, FleetBackend, Replica
from switchyard.v1 import bus_pb2

from . import telemetry as tm
from .scaling import ModelScaling

log = logging.getLogger(__name__)

PolicyFactory = Callable[[str, ScalingLimits], ScalingPolicy]
DEMAND_STALE_INTERVALS = 3.0  # a router's report older than this many of its intervals no longer counts


def default_policy_factory(options: dict[str, float]) -> PolicyFactory:
    """The policies of switchyard.autoscaling (one module each), by name."""
    def make(name: str, limits: ScalingLimits) -> ScalingPolicy:
        from switchyard.autoscaling import make_scaling_policy  # type: ignore[attr-defined]
        return make_scaling_policy(name, limits, **options)  # type: ignore[no-any-return]
    return make


class ColdStartStore:
    """The last measured cold start per model, kept in a small JSON file across restarts;
    `default_s` until a model has one."""

    def __init__(self, path: Path | None, default_s: float) -> None:
        self.path = path
        self.default_s = default_s
        self.values: dict[str, float] = {}
        if path is not None and path.exists():
            try:
                self.values = {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("cold start file %s unreadable (%s); starting from %.1fs", path, exc, default_s)

    def get(self, model: str) -> float:
        return self.values.get(model, self.default_s)

    def record(self, model: str, seconds: float) -> None:
        self.values[model] = seconds
        tm.COLD_START.labels(model).set(seconds)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.values, indent=1, sort_keys=True))
            os.replace(tmp, self.path)


@dataclass
class _ModelState:
    scaling: ModelScaling
    policy: ScalingPolicy
    failures: int = 0  # failed starts in a row
    retry_at: float = 0.0  # no new start before this (backoff after a failed start)
    slots: int = 0  # last reported batch size of a replica
    desired: int | None = None
    last_decision: Decision | None = None
    measured: set[str] = field(default_factory=set)  # replicas whose cold start was recorded
    rates: ServiceRateEstimator | None = None  # completions/s per replica at capacity, from heartbeats


@dataclass
class Event:
    """Something the autoscaler did (tests and logs read these)."""

    at: float
    model: str
    kind: str  # add | remove | start_failed | decision
    detail: str


def reason_label(reason: str) -> str:
    """A bounded metric label from a decision's reason (its leading words, no numbers)."""
    words = re.findall(r"[A-Za-z_\-]+", reason.split(":")[0])[:4]
    return "_".join(words).lower()[:48] or "unspecified"


class Autoscaler:
    def __init__(self, scaling: list[ModelScaling], backend: FleetBackend, fleet: FleetView,
                 cold_starts: ColdStartStore, policy_factory: PolicyFactory,
                 service_rate_per_replica: float = 2.0, default_slots: int = 32,
                 retry_base_s: float = 1.0, retry_max_s: float = 60.0,
                 measure_service_rate: bool = True, service_rate_window_s: float = 60.0) -> None:
        self.backend = backend
        self.fleet = fleet
        self.cold_starts = cold_starts
        self.service_rate_per_replica = service_rate_per_replica
        self.default_slots = default_slots
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.models = {s.model: _ModelState(s, policy_factory(s.policy, s.limits),
                                            rates=ServiceRateEstimator(window_s=service_rate_window_s,
                                                                       min_saturated_s=min(5.0, service_rate_window_s))
                                            if measure_service_rate else None) for s in scaling}
        self.demand: dict[str, dict[str, tuple[bus_pb2.DemandReport, float]]] = {}  # model → router → (report, at)
        self.events: list[Event] = []

    # ---- inputs ---------------------------------------------------------------------------
    def observe_demand(self, report: bus_pb2.DemandReport, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.demand.setdefault(report.model, {})[report.router_id] = (report, now)

    def waiting(self, model: str, now: float | None = None) -> int:
        """Requests the routers hold for `model` because it has no live replica."""
        return sum(r.waiting for r in self._fresh(model, now))

    def _fresh(self, model: str, now: float | None) -> list[bus_pb2.DemandReport]:
        now = time.monotonic() if now is None else now
        out = []
        for report, at in self.demand.get(model, {}).values():
            if now - at <= DEMAND_STALE_INTERVALS * max(report.interval_s, 0.1):
                out.append(report)
        return out

    def demand_for(self, model: str, replicas: list[Replica], now: float) -> Demand:
        state = self.models[model]
        live = self.fleet.live(model)
        if live:
            state.slots = max(r.max_batch_size for r in live)
        reports = self._fresh(model, now)
        live_ids = {r.replica_id for r in live}
        starting = sum(1 for r in replicas if r.state == STARTING or (r.state == READY and r.replica_id not in live_ids))
        return Demand(
            now=now, arrival_rate=sum(r.arrival_rate for r in reports),
            in_flight=sum(r.in_flight for r in reports),
            queued=sum(r.waiting for r in reports) + sum(r.report.queue_depth for r in live),
            ready_replicas=len(live), starting_replicas=starting,
            slots_per_replica=state.slots or self.default_slots,
            service_rate_per_replica=self.service_rate(model),
            cold_start_s=self.cold_starts.get(model))

    def service_rate(self, model: str) -> float:
        """Completions/s one replica of `model` manages at capacity: measured from the
        heartbeats once replicas have been seen saturated, the configured figure before."""
        state = self.models[model]
        if state.rates is None:
            return self.service_rate_per_replica
        live = self.fleet.live(model)
        for r in live:
            rep = r.report
            state.rates.observe(r.replica_id, rep.sent_unix_s, rep.completed,
                                ServiceRateEstimator.saturated(rep.running, rep.max_batch_size, rep.queue_depth))
        state.rates.forget({r.replica_id for r in live})
        measured = state.rates.rate()
        tm.SERVICE_RATE.labels(model).set(measured or self.service_rate_per_replica)
        return measured if measured else self.service_rate_per_replica

    # ---- the tick -------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> dict[str, Decision]:
        now = time.monotonic() if now is None else now
        out = {}
        for model, state in self.models.items():
            try:
                out[model] = self._tick_model(model, state, now)
            except Exception:  # one model's backend trouble must not stop the others
                log.exception("autoscaling %s failed this tick", model)
        return out

    def _tick_model(self, model: str, state: _ModelState, now: float) -> Decision:
        replicas = self._account(model, state, self.backend.replicas(model), now)
        demand = self.demand_for(model, replicas, now)
        decision = state.policy.decide(demand)
        if decision.replicas == 0 and demand.queued > 0 and demand.ready_replicas == 0:
            # Requests wait in the routers for a replica to exist: never leave them without one.
            decision = Decision(state.scaling.limits.clamp(1), "requests waiting for a replica")
        desired = state.scaling.limits.clamp(decision.replicas)
        if desired != state.desired:
            log.info("%s: %d replicas wanted (%s); ready %d, starting %d", model, desired, decision.reason,
                     demand.ready_replicas, demand.starting_replicas)
            self.events.append(Event(now, model, "decision", f"{desired}: {decision.reason}"))
        state.desired, state.last_decision = desired, decision
        tm.DESIRED.labels(model).set(desired)
        tm.READY.labels(model).set(demand.ready_replicas)
        tm.STARTING.labels(model).set(demand.starting_replicas)
        tm.DECISIONS.labels(model, reason_label(decision.reason)).inc()
        self._converge(model, state, desired, replicas, now)
        return Decision(desired, decision.reason)

    def _account(self, model: str, state: _ModelState, replicas: list[Replica], now: float) -> list[Replica]:
        """Record cold starts of replicas that came up; report and forget failed starts, and
        back off before the next start. Returns the replicas that count (failed ones do not)."""
        counted = []
        for r in replicas:
            if r.state == FAILED:
                state.failures += 1
                wait = min(self.retry_base_s * 2 ** (state.failures - 1), self.retry_max_s)
                state.retry_at = now + wait
                tm.START_FAILURES.labels(model).inc()
                log.warning("%s: replica %s failed to start (%s); retrying in %.1fs", model, r.replica_id,
                            r.error, wait)
                self.events.append(Event(now, model, "start_failed", f"{r.replica_id}: {r.error}"))
                self.backend.forget(model, r.replica_id)
                continue
            if r.state == READY and r.replica_id not in state.measured:
                state.measured.add(r.replica_id)
                if r.cold_start_s is not None and r.cold_start_s > 0:
                    self.cold_starts.record(model, r.cold_start_s)
                    state.failures = 0
            counted.append(r)
        return counted

    def _converge(self, model: str, state: _ModelState, desired: int, replicas: list[Replica], now: float) -> None:
        active = [r for r in replicas if r.state in (STARTING, READY)]
        if len(active) < desired:
            if now < state.retry_at:
                return  # backing off after a failed start
            for _ in range(desired - len(active)):
                rid = self.backend.add_replica(model)
                self.events.append(Event(now, model, "add", rid))
        elif len(active) > desired:
            for r in self._removal_order(model, active)[:len(active) - desired]:
                self.backend.remove_replica(model, r.replica_id)
                self.events.append(Event(now, model, "remove", r.replica_id))

    def _removal_order(self, model: str, active: list[Replica]) -> list[Replica]:
        """Replicas still starting first (newest first: least sunk cost), then the ready ones
        holding the fewest requests (least to drain)."""
        starting = sorted((r for r in active if r.state == STARTING), key=lambda r: -r.started_at)
        load = {s.replica_id: s.reported_requests for s in self.fleet.live(model)}
        ready = sorted((r for r in active if r.state == READY),
                       key=lambda r: (load.get(r.replica_id, 0), -r.started_at))
        return starting + ready

    def replica_count(self, model: str) -> tuple[int, int]:
        """(ready in the fleet, asked for and not draining) — for tests and status."""
        reps = [r for r in self.backend.replicas(model) if r.state in (STARTING, READY)]
        return len(self.fleet.live(model)), len(reps)


__all__ = ["Autoscaler", "ColdStartStore", "Event", "default_policy_factory", "reason_label"]
