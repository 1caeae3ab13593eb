"""power_of_two: sample two replicas at random and send to the less loaded one (Mitzenmacher's
power of two choices). With many routers acting on the same stale heartbeats, least_loaded
sends every router's burst to the same replica; two random choices keep most of its benefit
and spread such bursts. Seeded, so a replayed trace routes the same way."""

from __future__ import annotations

import random
from typing import Sequence

from switchyard.fleet.view import FleetView, ReplicaState
from switchyard.routing.policy import NoReplicaError, RoutingPolicy, RoutingRequest


class PowerOfTwo(RoutingPolicy):
    name = "power_of_two"

    def __init__(self, fleet: FleetView | None = None, seed: int = 0) -> None:
        super().__init__(fleet)
        self._rng = random.Random(seed)

    def choose(self, request: RoutingRequest, candidates: Sequence[ReplicaState]) -> ReplicaState:
        if not candidates:
            raise NoReplicaError("no candidate replica")
        ordered = sorted(candidates, key=lambda r: r.replica_id)
        if len(ordered) == 1:
            return ordered[0]
        a, b = self._rng.sample(ordered, 2)
        return a if self.load(a) <= self.load(b) else b
