"""Which replicas hold which prefix blocks: an inverted index block hash → replica ids.

Fed from the snapshots of cached block hashes that replicas publish in their load reports
(`LoadReport.cached_blocks`); a new snapshot replaces the replica's previous one by diffing,
so a report costs O(changed blocks) index updates. Because block hashes are chained (block
i's hash names blocks 0..i), the longest cached prefix of a request on a replica is the
number of its leading hashes that replica holds.
"""

from __future__ import annotations

from typing import Iterable, Sequence


class PrefixIndex:
    def __init__(self) -> None:
        self._replicas_by_block: dict[int, set[str]] = {}
        self._blocks_by_replica: dict[str, frozenset[int]] = {}

    def update(self, replica_id: str, blocks: Iterable[int]) -> None:
        """Replace what `replica_id` holds with `blocks`."""
        new = frozenset(blocks)
        old = self._blocks_by_replica.get(replica_id, frozenset())
        if new == old:
            return
        for h in old - new:
            holders = self._replicas_by_block.get(h)
            if holders is not None:
                holders.discard(replica_id)
                if not holders:
                    del self._replicas_by_block[h]
        for h in new - old:
            self._replicas_by_block.setdefault(h, set()).add(replica_id)
        if new:
            self._blocks_by_replica[replica_id] = new
        else:
            self._blocks_by_replica.pop(replica_id, None)

    def remove(self, replica_id: str) -> None:
        """A replica left the fleet: forget everything it held."""
        self.update(replica_id, ())

    def holds(self, replica_id: str) -> frozenset[int]:
        return self._blocks_by_replica.get(replica_id, frozenset())

    def holders(self, block_hash: int) -> frozenset[str]:
        return frozenset(self._replicas_by_block.get(block_hash, ()))

    def matched_blocks(self, hashes: Sequence[int]) -> dict[str, int]:
        """Replica id → number of leading blocks of `hashes` it holds (only replicas with ≥ 1).
        Walks the chain once, narrowing the set of replicas still matching."""
        matched: dict[str, int] = {}
        alive: set[str] | None = None
        for depth, h in enumerate(hashes, start=1):
            holders = self._replicas_by_block.get(h)
            if not holders:
                break
            alive = set(holders) if alive is None else alive & holders
            if not alive:
                break
            for rid in alive:
                matched[rid] = depth
        return matched

    def __len__(self) -> int:
        return len(self._replicas_by_block)
