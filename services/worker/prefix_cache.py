"""The worker's prefix cache: KV of prompt (and answer) blocks kept after their sequences, so a
later sequence with the same prefix skips its prefill.

Blocks are named by the chained hashes of `switchyard.prefix.blocks` (block i's hash covers
blocks 0..i), so a lookup walks a prompt's hashes until the first miss. One block is ONE array
[2·layers, kv_heads, block_size, head_dim] (keys and values of every layer in past-name order):
a thousand-token prefix is ~60 arrays, not thousands of small ones. A block is a numpy array on
the host, or an OrtValue where the worker's KV pool lives (`insert_blocks` / `blocks`: on CUDA
the cache then never copies KV through the host; the batch cuts and places blocks on the device).

Eviction is LRU within a byte budget, ordered so that a chain's tail goes before its ancestors
(as vLLM frees blocks tail-first): a matched or inserted chain is touched from its last block
to its first, so the first block is the most recently used. Evicting an ancestor would strand
every descendant (a lookup stops at the first miss), evicting a tail loses only that block.

Pure bookkeeping, no I/O. A lock guards the table because the worker's gRPC thread snapshots
`held()` for load reports while the engine thread inserts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters since start (monotonic) and the current occupancy."""

    query_blocks: int = 0  # blocks looked up (prompts' full blocks, capped as the caller asks)
    hit_blocks: int = 0  # of those, blocks found (a chain counts up to its first miss)
    stored_blocks: int = 0  # blocks inserted
    evicted_blocks: int = 0  # blocks dropped for room
    blocks: int = 0  # blocks held now
    bytes_used: int = 0  # bytes of the held blocks' arrays
    capacity_bytes: int = 0  # the budget
    block_size: int = 0  # tokens per block

    @property
    def query_tokens(self) -> int:
        return self.query_blocks * self.block_size

    @property
    def hit_tokens(self) -> int:
        return self.hit_blocks * self.block_size


class PrefixCache:
    """KV blocks by chained hash, LRU within `capacity_bytes`."""

    def __init__(self, capacity_bytes: int, block_size: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be non-negative")
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.capacity_bytes = capacity_bytes
        self.block_size = block_size
        self._blocks: OrderedDict[int, Any] = OrderedDict()  # LRU first, MRU last; numpy or OrtValue
        self._block_bytes: dict[int, int] = {}
        self._bytes = 0
        self._query = self._hit = self._stored = self._evicted = 0
        self._lock = threading.Lock()

    # ---- reads -------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are held; touches them (tail first) and counts
        the query. Call `assemble` for their KV."""
        with self._lock:
            n = 0
            for h in hashes:
                if h not in self._blocks:
                    break
                n += 1
            self._touch_chain(hashes[:n])
            self._query += len(hashes)
            self._hit += n
            return n

    def assemble(self, hashes: Sequence[int]) -> np.ndarray:
        """KV of the prefix named by `hashes` (all held, e.g. the first `lookup` result of them)
        as one array [2·layers, kv_heads, len(hashes)·block_size, head_dim]."""
        blocks = self.blocks(hashes)
        if not blocks:
            raise ValueError("assemble needs at least one block")
        return np.concatenate(blocks, axis=2)

    def blocks(self, hashes: Sequence[int]) -> list[Any]:
        """The held blocks named by `hashes`, in order (as stored: numpy or device OrtValues)."""
        with self._lock:
            return [self._blocks[h] for h in hashes]

    def held(self) -> list[int]:
        """Snapshot of the hashes held, least recently used first."""
        with self._lock:
            return list(self._blocks)

    def __contains__(self, h: int) -> bool:
        return h in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(
                query_blocks=self._query, hit_blocks=self._hit, stored_blocks=self._stored,
                evicted_blocks=self._evicted, blocks=len(self._blocks), bytes_used=self._bytes,
                capacity_bytes=self.capacity_bytes, block_size=self.block_size)

    # ---- writes ------------------------------------------------------------------------
    def insert(self, hashes: Sequence[int], kv: Sequence[np.ndarray]) -> int:
        """Store the blocks of a prefix: `hashes` name its first len(hashes) blocks, `kv` holds
        one array per past name [kv_heads, T, head_dim] with T ≥ len(hashes)·block_size starting
        at the prefix's token 0. Blocks already held are not copied again. When the budget cannot
        take every new block (after evicting blocks of other chains), only a leading part of
        the chain is stored: a tail without its ancestors could never be matched. Returns the
        number of blocks newly stored."""
        bs = self.block_size
        if hashes and kv[0].shape[1] < len(hashes) * bs:
            raise ValueError(f"{len(hashes)} blocks need {len(hashes) * bs} tokens of KV, got {kv[0].shape[1]}")
        nbytes = len(kv) * kv[0].shape[0] * bs * kv[0].shape[2] * kv[0].dtype.itemsize if hashes else 0
        return self.insert_blocks(
            hashes, lambda positions: [np.stack([a[:, i * bs:(i + 1) * bs, :] for a in kv]) for i in positions], nbytes)

    def insert_blocks(self, hashes: Sequence[int], make_blocks: Callable[[list[int]], list[Any]],
                      block_bytes: int) -> int:
        """`insert` for blocks made by the caller: `make_blocks(positions)` returns the chain's
        blocks at those positions (called once, for the blocks not held yet that fit), each
        `block_bytes` big. One call for all of them: on a device, cutting blocks costs per call."""
        with self._lock:
            chain = set(hashes)
            self._touch_chain([h for h in hashes if h in self._blocks])  # protect them from eviction below
            new: list[int] = []  # chain positions to store, their bytes already counted
            kept = 0  # leading blocks of the chain held after this call
            for i, h in enumerate(hashes):
                if h not in self._blocks:
                    if not self._make_room(block_bytes, chain):
                        break
                    self._bytes += block_bytes
                    new.append(i)
                kept = i + 1
            try:
                blocks = make_blocks(new) if new else []
            except BaseException:
                self._bytes -= block_bytes * len(new)
                raise
            for i, block in zip(new, blocks, strict=True):
                self._blocks[hashes[i]] = block
                self._block_bytes[hashes[i]] = block_bytes
            self._touch_chain(hashes[:kept])
            self._stored += len(new)
            return len(new)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._block_bytes.clear()
            self._bytes = 0

    # ---- internals (lock held) -----------------------------------------------------------
    def _touch_chain(self, hashes: Sequence[int]) -> None:
        """Most recent use: the chain's first block most recent, its tail least (evicted first)."""
        for h in reversed(hashes):
            self._blocks.move_to_end(h)

    def _make_room(self, nbytes: int, protected: set[int]) -> bool:
        """Evict least recently used blocks outside `protected` until `nbytes` fit; False when
        they cannot."""
        if nbytes > self.capacity_bytes:
            return False
        while self._bytes + nbytes > self.capacity_bytes:
            victim = next((h for h in self._blocks if h not in protected), None)
            if victim is None:
                return False
            del self._blocks[victim]
            self._bytes -= self._block_bytes.pop(victim)
            self._evicted += 1
        return True
