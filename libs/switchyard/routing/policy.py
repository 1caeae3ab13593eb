"""The routing policy interface: which replica of a model serves a request.

The pipeline knows only this interface: it builds a `RoutingRequest`, asks the model's policy
to `choose()` among the live candidates from the fleet view, then reports `on_dispatch` and
`on_complete`. The router's own in-flight accounting (requests and tokens it has sent to a
replica and not yet seen finish) lives here, behind the interface, because a heartbeat is up
to one interval stale: between two reports only the router knows what it just sent.

A policy is one module in `switchyard.routing.policies` defining one `RoutingPolicy` subclass
with a unique `name`; `switchyard.routing.make_policy(name)` finds it, so adding a policy is
adding one file. Policies do no I/O and are unit-tested on hand-built fleet views.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from switchyard.fleet.view import FleetView, ReplicaState


class NoReplicaError(LookupError):
    """`choose()` was given no candidates."""


@dataclass
class RoutingRequest:
    """What a policy may look at: the request's cost and identity, never its text."""

    model: str
    prompt_tokens: int
    expected_output_tokens: int
    block_hashes: list[int] = field(default_factory=list)  # chained prefix block hashes
    block_size: int = 0
    tenant: str = ""
    session_id: str = ""  # conversation / user key, when the client gives one
    request_id: str = ""
    dispatched_unix_s: float = 0.0  # set by on_dispatch

    @property
    def expected_tokens(self) -> int:
        return self.prompt_tokens + self.expected_output_tokens


@dataclass
class Inflight:
    """What this router has dispatched to one replica and not seen finish, and the
    (dispatched, completed) unix times of what finished lately."""

    requests: int = 0
    tokens: int = 0
    finished: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=256))

    def finished_since(self, report_unix_s: float) -> int:
        """Requests the replica counted in a report sent at `report_unix_s` that have
        finished since: dispatched before it, completed after it."""
        return sum(1 for dispatched, done in self.finished if dispatched < report_unix_s < done)


class RoutingPolicy(ABC):
    """Base of every policy: `choose()` is the policy; the hooks keep in-flight accounting."""

    name: ClassVar[str]

    def __init__(self, fleet: FleetView | None = None) -> None:
        self.fleet = fleet  # for policies that look beyond the candidates (cache index)
        self.inflight: dict[str, Inflight] = {}
        self._turn = 0

    @abstractmethod
    def choose(self, request: RoutingRequest, candidates: Sequence[ReplicaState]) -> ReplicaState:
        """Pick one of `candidates` (live replicas of `request.model`, never empty)."""

    def on_dispatch(self, request: RoutingRequest, replica: ReplicaState) -> None:
        request.dispatched_unix_s = time.time()
        load = self.inflight.setdefault(replica.replica_id, Inflight())
        load.requests += 1
        load.tokens += request.expected_tokens

    def on_complete(self, request: RoutingRequest, replica: ReplicaState, ok: bool) -> None:
        load = self.inflight.get(replica.replica_id)
        if load is None:
            return
        load.requests = max(load.requests - 1, 0)
        load.tokens = max(load.tokens - request.expected_tokens, 0)
        now = time.time()
        load.finished.append((request.dispatched_unix_s, now))
        while load.finished and now - load.finished[0][1] > 60.0:
            load.finished.popleft()

    # ---- helpers shared by policies -------------------------------------------------------
    def inflight_requests(self, replica: ReplicaState) -> int:
        load = self.inflight.get(replica.replica_id)
        return load.requests if load else 0

    def load(self, replica: ReplicaState) -> float:
        """Occupancy of a replica's batch: requests it holds over its batch cap (1.0 = full,
        above 1 = queueing). Requests held = the larger of what the replica last reported
        (running + queued, which counts other routers' traffic) less what of that this router
        has seen finish since the report, and what this router has in flight there (which
        counts what it sent since that report). Without the correction a replica looks busy
        for up to a heartbeat after its requests end."""
        own = self.inflight.get(replica.replica_id)
        reported = replica.reported_requests
        if own is not None and own.finished:
            reported = max(reported - own.finished_since(replica.report.sent_unix_s), 0)
        held = max(own.requests if own else 0, reported)
        return held / replica.max_batch_size

    def next_turn(self) -> int:
        """A counter for breaking ties in turn, so equal replicas share the load."""
        self._turn += 1
        return self._turn - 1

    def pick_tied(self, ranked: Sequence[tuple[float, ReplicaState]]) -> ReplicaState:
        """The replica with the lowest score; ties (within 1e-9) go in turn."""
        if not ranked:
            raise NoReplicaError("no candidate replica")
        best = min(score for score, _ in ranked)
        tied = [r for score, r in ranked if score - best <= 1e-9]
        return tied[self.next_turn() % len(tied)]
