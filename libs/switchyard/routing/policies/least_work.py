"""least_work: the replica with the least outstanding work in tokens, among those with a free
batch slot. Outstanding work = prompt + expected output tokens of what this router has in
flight there (`Inflight.tokens`), or what the replica reports holding (tokens in flight plus a
mean request's worth per queued request) when that is more (other routers' traffic).

Why tokens and not requests: with heavy-tailed output lengths, three requests can be three
short answers or three 550-token essays; a decode step's time grows with context length as
well as batch size (48 → 600-token contexts doubled the step time at batch 8 on the 2-core
box, bench/balancing.py notes), and a long request holds its slot for hundreds of steps.
Counting requests (least_loaded) puts the next long request next to another long one half of
the time; counting tokens keeps the long ones apart.
"""

from __future__ import annotations

from typing import Sequence

from switchyard.fleet.view import ReplicaState
from switchyard.routing.policy import RoutingPolicy, RoutingRequest


class LeastWork(RoutingPolicy):
    name = "least_work"

    def outstanding_tokens(self, replica: ReplicaState) -> float:
        own = self.inflight.get(replica.replica_id)
        mine = own.tokens if own else 0
        report = replica.report
        mean = report.tokens_in_flight / report.running if report.running else 0.0
        reported = report.tokens_in_flight + mean * report.queue_depth
        return max(mine, reported)

    def choose(self, request: RoutingRequest, candidates: Sequence[ReplicaState]) -> ReplicaState:
        ordered = sorted(candidates, key=lambda r: r.replica_id)
        with_room = [r for r in ordered if self.load(r) < 1.0] or ordered
        return self.pick_tied([(self.outstanding_tokens(r), r) for r in with_room])
