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
from switchyard.prefix.blocks import matched_blocks
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
    def _indexed(self, request: RoutingRequest) -> dict[str, int]:
        """Leading blocks each replica reports holding: one walk of the fleet's prefix index."""
        if not request.block_hashes or self.fleet is None:
            return {}
        return self.fleet.prefix_index.matched_blocks(request.block_hashes)

    def _cached(self, request: RoutingRequest, replica_id: str, indexed: dict[str, int]) -> int:
        """The longer of the replica's reported chain and the chain this router dispatched there
        lately (recent chains start at block 0, so the longer one is the prefix it holds)."""
        recent = matched_blocks(request.block_hashes, self._recent.get(replica_id, {}))
        n = max(indexed.get(replica_id, 0), recent)
        return min(n * request.block_size, max(request.prompt_tokens - 1, 0))  # the worker prefills ≥ 1 token

    def cached_tokens(self, request: RoutingRequest, replica: ReplicaState) -> int:
        """Prompt tokens of `request` that `replica` is expected to hold."""
        return self._cached(request, replica.replica_id, self._indexed(request))

    # ---- the policy ----------------------------------------------------------------------
    def choose(self, request: RoutingRequest, candidates: Sequence[ReplicaState]) -> ReplicaState:
        if not candidates:
            raise NoReplicaError("no candidate replica")
        self._prune(time.monotonic())  # expired recent dispatches go (at most a second late)
        indexed = self._indexed(request)
        ordered = sorted(candidates, key=lambda r: r.replica_id)
        calm = [r for r in ordered if self.load(r) < self.overload]
        return self.pick_tied([
            (request.prompt_tokens - self._cached(request, r.replica_id, indexed) + self.load_weight * self.load(r), r)
            for r in calm or ordered])

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
