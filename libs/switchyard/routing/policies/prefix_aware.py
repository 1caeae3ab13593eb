"""prefix_aware: send a request where its prompt's prefix is already cached, unless that
replica is too busy for the saved prefill to matter.

The cost of serving request q on replica r, in prompt-token equivalents (lower wins):

    cost(r) = uncached(q, r) + load_weight × load(r)

- uncached(q, r) = prompt tokens whose KV r does not hold = prompt − block_size × (leading
  blocks of q's chained block hashes r holds). That is the prefill r must compute before the
  first token, and the compute it takes from r's running streams.
- load(r) = requests held over batch cap (`RoutingPolicy.load`; 1.0 = batch full).
  `load_weight` (tokens) says what a full batch's worth of occupancy costs compared with
  prefill: with the default 1,024, a replica holding a 1,000-token prefix wins over an idle
  one until it is ~1 batch fuller than it. With nothing cached anywhere every uncached term
  is the same and this is least_loaded.
- Overload guard: a replica at or above `overload` (default 1.0: its batch is full, so the
  request would queue behind whole generations) is not a candidate while any other is below
  it — a cache hit on an overloaded replica is not a win.

Where blocks are: the fleet's prefix index (snapshots of each replica's cache in its load
reports, authoritative but up to one heartbeat old), plus what this router dispatched in the
last `recent_ttl_s` seconds (the replica will hold those blocks once it prefills them), so a
follow-up sent right after its previous turn already finds its replica.
"""

from __future__ import annotations

import time
from typing import Sequence

from switchyard.fleet.view import FleetView, ReplicaState
from switchyard.routing.policy import NoReplicaError, RoutingPolicy, RoutingRequest


class PrefixAware(RoutingPolicy):
    name = "prefix_aware"

    def __init__(self, fleet: FleetView | None = None, load_weight: float = 1024.0, overload: float = 1.0,
                 recent_ttl_s: float = 30.0) -> None:
        super().__init__(fleet)
        self.load_weight = load_weight
        self.overload = overload
        self.recent_ttl_s = recent_ttl_s
        self._recent: dict[str, dict[int, float]] = {}  # replica → block hash → expiry (monotonic)
        self._pruned_at = 0.0

    # ---- where a prefix is cached --------------------------------------------------------
    def cached_tokens(self, request: RoutingRequest, replica: ReplicaState, now: float | None = None) -> int:
        """Prompt tokens of `request` that `replica` is expected to hold (leaving at least one
        to prefill, as the worker does)."""
        if not request.block_hashes:
            return 0
        now = time.monotonic() if now is None else now
        held = self.fleet.prefix_index.holds(replica.replica_id) if self.fleet is not None else frozenset()
        recent = self._recent.get(replica.replica_id, {})
        n = 0
        for h in request.block_hashes:
            if h in held or recent.get(h, 0.0) > now:
                n += 1
            else:
                break
        return min(n * request.block_size, max(request.prompt_tokens - 1, 0))

    def cost(self, request: RoutingRequest, replica: ReplicaState, now: float | None = None) -> float:
        return (request.prompt_tokens - self.cached_tokens(request, replica, now)) + self.load_weight * self.load(replica)

    # ---- the policy ----------------------------------------------------------------------
    def choose(self, request: RoutingRequest, candidates: Sequence[ReplicaState]) -> ReplicaState:
        if not candidates:
            raise NoReplicaError("no candidate replica")
        now = time.monotonic()
        self._prune(now)
        ordered = sorted(candidates, key=lambda r: r.replica_id)
        calm = [r for r in ordered if self.load(r) < self.overload]
        pool = calm or ordered
        return self.pick_tied([(self.cost(request, r, now), r) for r in pool])

    def on_dispatch(self, request: RoutingRequest, replica: ReplicaState) -> None:
        super().on_dispatch(request, replica)
        if request.block_hashes:
            expiry = time.monotonic() + self.recent_ttl_s
            recent = self._recent.setdefault(replica.replica_id, {})
            for h in request.block_hashes:
                recent[h] = expiry

    def _prune(self, now: float) -> None:
        if now - self._pruned_at < 1.0:
            return
        self._pruned_at = now
        live = set(self.fleet.replicas) if self.fleet is not None else None
        for rid in list(self._recent):
            if live is not None and rid not in live:
                del self._recent[rid]  # the replica left: its blocks went with it
                continue
            fresh = {h: t for h, t in self._recent[rid].items() if t > now}
            if fresh:
                self._recent[rid] = fresh
            else:
                del self._recent[rid]
