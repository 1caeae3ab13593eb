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

from abc import ABC, abstractmethod
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

    @property
    def expected_tokens(self) -> int:
        return self.prompt_tokens + self.expected_output_tokens


@dataclass
class Inflight:
    """What this router has dispatched to one replica and not seen finish."""

    requests: int = 0
    tokens: int = 0


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
        load = self.inflight.setdefault(replica.replica_id, Inflight())
        load.requests += 1
        load.tokens += request.expected_tokens

    def on_complete(self, request: RoutingRequest, replica: ReplicaState, ok: bool) -> None:
        load = self.inflight.get(replica.replica_id)
        if load is None:
            return
        load.requests = max(load.requests - 1, 0)
        load.tokens = max(load.tokens - request.expected_tokens, 0)
        if load.requests == 0:
            del self.inflight[replica.replica_id]

    # ---- helpers shared by policies -------------------------------------------------------
    def inflight_requests(self, replica: ReplicaState) -> int:
        load = self.inflight.get(replica.replica_id)
        return load.requests if load else 0

    def load(self, replica: ReplicaState) -> float:
        """Occupancy of a replica's batch: requests it holds over its batch cap (1.0 = full,
        above 1 = queueing). Requests held = the larger of what the replica last reported
        (running + queued, which counts other routers' traffic) and what this router has in
        flight there (which counts what it sent since that report)."""
        held = max(self.inflight_requests(replica), replica.reported_requests)
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
