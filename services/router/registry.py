"""Live view of the replicas, built from their NATS heartbeats (LoadReports).

A replica is live while its reports keep coming; one silent for `misses` heartbeat
intervals is dropped, so a killed batcher leaves the registry within seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from switchyard.reporting.records import ReplicaUsage
from switchyard.v1 import bus_pb2

log = logging.getLogger(__name__)


@dataclass
class Replica:
    """What the router knows about one replica."""

    replica_id: str
    model: str
    report: bus_pb2.LoadReport
    last_seen: float  # monotonic
    inflight: int = 0  # requests this router has dispatched to it and not seen finish

    @property
    def draining(self) -> bool:
        return self.report.draining


@dataclass
class ReplicaRegistry:
    misses: float = 3.0
    replicas: dict[str, Replica] = field(default_factory=dict)
    # Every replica ever seen: (model, first seen, last seen) in unix seconds, for cost reports.
    lifetimes: dict[str, tuple[str, float, float]] = field(default_factory=dict)

    def observe(self, report: bus_pb2.LoadReport, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        first = self.lifetimes.get(report.replica_id, (report.model, report.sent_unix_s, 0.0))[1]
        self.lifetimes[report.replica_id] = (report.model, first, report.sent_unix_s)
        replica = self.replicas.get(report.replica_id)
        if replica is None:
            log.info("replica %s (%s) joined", report.replica_id, report.model)
            self.replicas[report.replica_id] = Replica(report.replica_id, report.model, report, now)
        else:
            replica.report, replica.last_seen = report, now

    def expire(self, now: float | None = None) -> list[str]:
        """Drop replicas whose heartbeats stopped; returns their ids."""
        now = time.monotonic() if now is None else now
        gone = [rid for rid, r in self.replicas.items()
                if now - r.last_seen > self.misses * max(r.report.interval_s, 0.05)]
        for rid in gone:
            log.warning("replica %s dropped: no heartbeat for %.1fs", rid, now - self.replicas[rid].last_seen)
            del self.replicas[rid]
        return gone

    def live(self, model: str) -> list[Replica]:
        """Replicas of `model` that take new requests (not draining, heard from recently)."""
        self.expire()
        return [r for r in self.replicas.values() if r.model == model and not r.draining]

    def models(self) -> dict[str, list[Replica]]:
        self.expire()
        out: dict[str, list[Replica]] = {}
        for r in self.replicas.values():
            if not r.draining:
                out.setdefault(r.model, []).append(r)
        return out

    def usage(self) -> list[ReplicaUsage]:
        return [ReplicaUsage(replica_id=rid, model=model, start_unix_s=start, end_unix_s=end)
                for rid, (model, start, end) in self.lifetimes.items()]

    def is_live(self, replica_id: str) -> bool:
        self.expire()
        return replica_id in self.replicas
