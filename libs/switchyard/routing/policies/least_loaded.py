"""least_loaded: the replica whose batch is least occupied (`RoutingPolicy.load`: requests
held over batch cap, the larger of the replica's report and this router's in-flight count);
ties in turn. Occupancy, not tokens, because on this engine a request's cost to others is
its slot in the batch: a decode step's time grows with batch size far more than with context
length at these lengths (docs/benchmarks.md, balancing section)."""

from __future__ import annotations

from typing import Sequence

from switchyard.fleet.view import ReplicaState
from switchyard.routing.policy import RoutingPolicy, RoutingRequest


class LeastLoaded(RoutingPolicy):
    name = "least_loaded"

    def choose(self, request: RoutingRequest, candidates: Sequence[ReplicaState]) -> ReplicaState:
        return self.pick_tied([(self.load(r), r) for r in sorted(candidates, key=lambda r: r.replica_id)])
