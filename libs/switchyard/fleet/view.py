"""Live view of the replicas, built from their NATS heartbeats (LoadReports).

This is the only place that parses heartbeats: the router's routing policies, the autoscaler
and the rollout controller read replicas, their load, cache contents and lifetimes from here.
A replica is live while its reports keep coming; one silent for `misses` heartbeat intervals
is dropped (a killed batcher leaves within seconds) and its cached blocks leave the prefix
index with it. `subscribe(nc)` is the thin I/O loop; `observe()` / `expire()` are pure and
unit-tested with hand-built reports.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg

from switchyard.bus import subjects
from switchyard.bus.queue import decoded
from switchyard.reporting.records import ReplicaUsage
from switchyard.v1 import bus_pb2

from .prefix_index import PrefixIndex

log = logging.getLogger(__name__)


@dataclass
class ReplicaState:
    """What the fleet knows about one replica: its latest report and when it was seen."""

    replica_id: str
    model: str
    report: bus_pb2.LoadReport
    first_seen: float  # monotonic
    last_seen: float  # monotonic
    first_seen_unix_s: float = 0.0

    @property
    def draining(self) -> bool:
        return self.report.draining

    @property
    def max_batch_size(self) -> int:
        return max(self.report.max_batch_size, 1)

    @property
    def reported_requests(self) -> int:
        """Requests the replica holds: running plus queued (its own and in JetStream)."""
        return self.report.running + self.report.queue_depth

    def age_s(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.first_seen


Listener = Callable[[ReplicaState], None]


@dataclass
class FleetView:
    misses: float = 3.0
    replicas: dict[str, ReplicaState] = field(default_factory=dict)
    prefix_index: PrefixIndex = field(default_factory=PrefixIndex)
    # Every replica ever seen: (model, first seen, last seen) in unix seconds, for cost reports.
    lifetimes: dict[str, tuple[str, float, float]] = field(default_factory=dict)
    _leave_listeners: list[Listener] = field(default_factory=list)
    _join_listeners: list[Listener] = field(default_factory=list)

    # ---- ingest ---------------------------------------------------------------------------
    def observe(self, report: bus_pb2.LoadReport, now: float | None = None) -> ReplicaState:
        now = time.monotonic() if now is None else now
        first = self.lifetimes.get(report.replica_id, (report.model, report.sent_unix_s, 0.0))[1]
        self.lifetimes[report.replica_id] = (report.model, first, report.sent_unix_s)
        replica = self.replicas.get(report.replica_id)
        if replica is None:
            log.info("replica %s (%s) joined", report.replica_id, report.model)
            replica = ReplicaState(report.replica_id, report.model, report, now, now, first)
            self.replicas[report.replica_id] = replica
            for listener in self._join_listeners:
                listener(replica)
        else:
            replica.report, replica.last_seen = report, now
        self.prefix_index.update(report.replica_id, report.cached_blocks)
        return replica

    def on_leave(self, listener: Listener) -> None:
        """Call `listener` with each replica that leaves (heartbeats stopped)."""
        self._leave_listeners.append(listener)

    def on_join(self, listener: Listener) -> None:
        """Call `listener` with each replica that joins (first heartbeat, or back after leaving)."""
        self._join_listeners.append(listener)

    def expire(self, now: float | None = None) -> list[str]:
        """Drop replicas whose heartbeats stopped; returns their ids."""
        now = time.monotonic() if now is None else now
        gone = [rid for rid, r in self.replicas.items()
                if now - r.last_seen > self.misses * max(r.report.interval_s, 0.05)]
        for rid in gone:
            replica = self.replicas.pop(rid)
            log.warning("replica %s dropped: no heartbeat for %.1fs", rid, now - replica.last_seen)
            self.prefix_index.remove(rid)
            for listener in self._leave_listeners:
                listener(replica)
        return gone

    async def subscribe(self, nc: Client) -> None:
        """Feed this view from every replica's heartbeats on `nc`."""
        async def on_load(msg: Msg) -> None:
            report = decoded(msg, bus_pb2.LoadReport, "load report")
            if report is None:
                return
            if msg.subject != subjects.load_subject(report.model, report.replica_id):
                # NATS permissions let a batcher publish only on its own subject; a report naming
                # another replica or model than its subject is forged, not a heartbeat.
                log.warning("dropped a load report for %s/%s sent on %s", report.model, report.replica_id, msg.subject)
                return
            self.observe(report)

        await nc.subscribe(subjects.LOAD_ALL, cb=on_load)

    # ---- questions ------------------------------------------------------------------------
    def live(self, model: str) -> list[ReplicaState]:
        """Replicas of `model` that take new requests (not draining, heard from recently), by id."""
        self.expire()
        return sorted((r for r in self.replicas.values() if r.model == model and not r.draining),
                      key=lambda r: r.replica_id)

    def models(self) -> dict[str, list[ReplicaState]]:
        """Served model → its live replicas."""
        self.expire()
        out: dict[str, list[ReplicaState]] = {}
        for r in sorted(self.replicas.values(), key=lambda r: r.replica_id):
            if not r.draining:
                out.setdefault(r.model, []).append(r)
        return out

    def is_live(self, replica_id: str) -> bool:
        self.expire()
        return replica_id in self.replicas

    def get(self, replica_id: str) -> ReplicaState | None:
        return self.replicas.get(replica_id)

    def capacity(self, model: str) -> int:
        """Sequences the live replicas of `model` can run at once."""
        return sum(r.report.max_batch_size for r in self.live(model))

    def token_capacity(self, model: str) -> int:
        """KV tokens (prompt + max_tokens reservations) the live replicas of `model` can hold."""
        return sum(r.report.token_budget for r in self.live(model))

    def usage(self) -> list[ReplicaUsage]:
        return [ReplicaUsage(replica_id=rid, model=model, start_unix_s=start, end_unix_s=end)
                for rid, (model, start, end) in self.lifetimes.items()]
