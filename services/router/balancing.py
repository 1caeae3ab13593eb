"""Replica choice policies. Each policy picks one replica among the live ones for a model.

least_loaded (default): fewest requests in flight, counting both what this router has
outstanding and what the replica reports (running + queued), so other routers' traffic
counts too; ties go round-robin so equal replicas share the load.
round_robin: in turn, blind to load (the baseline to compare against).
"""

from __future__ import annotations

import itertools
from typing import Protocol

from .registry import Replica


class BalancingPolicy(Protocol):
    name: str

    def choose(self, replicas: list[Replica]) -> Replica: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, replicas: list[Replica]) -> Replica:
        ordered = sorted(replicas, key=lambda r: r.replica_id)
        return ordered[next(self._counter) % len(ordered)]


class LeastLoaded:
    name = "least_loaded"

    def __init__(self) -> None:
        self._counter = itertools.count()

    @staticmethod
    def load(replica: Replica) -> float:
        reported = replica.report.running + replica.report.queue_depth
        return max(replica.inflight, reported) / max(replica.report.max_batch_size, 1)

    def choose(self, replicas: list[Replica]) -> Replica:
        ordered = sorted(replicas, key=lambda r: r.replica_id)
        best = min(self.load(r) for r in ordered)
        tied = [r for r in ordered if self.load(r) == best]
        return tied[next(self._counter) % len(tied)]


POLICIES: dict[str, type[RoundRobin] | type[LeastLoaded]] = {
    RoundRobin.name: RoundRobin, LeastLoaded.name: LeastLoaded}


def make_policy(name: str) -> BalancingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown balancing policy {name!r}; choose one of {sorted(POLICIES)}") from None
