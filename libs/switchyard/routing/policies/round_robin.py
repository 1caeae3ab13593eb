"""round_robin: replicas in turn, blind to load and cache — the baseline every other policy
is measured against (bench/balancing.py, bench/cache_routing.py)."""

from __future__ import annotations

from typing import Sequence

from switchyard.fleet.view import ReplicaState
from switchyard.routing.policy import NoReplicaError, RoutingPolicy, RoutingRequest


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def choose(self, request: RoutingRequest, candidates: Sequence[ReplicaState]) -> ReplicaState:
        if not candidates:
            raise NoReplicaError("no candidate replica")
        ordered = sorted(candidates, key=lambda r: r.replica_id)
        return ordered[self.next_turn() % len(ordered)]
