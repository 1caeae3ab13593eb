"""The worker's prefix cache on hand-built KV arrays: chain lookup, LRU order tail-first,
the byte budget, and KV coming back exactly as stored."""

from __future__ import annotations

import numpy as np
import pytest

from services.worker.prefix_cache import PrefixCache
from switchyard.prefix.blocks import block_hashes

pytestmark = pytest.mark.unit
BS = 4  # tokens per block in these tests
NAMES = 4  # past names (2 layers × key/value)
HEADS, DIM = 2, 3
BLOCK_BYTES = NAMES * HEADS * BS * DIM * 4


def kv_for(tokens: list[int]) -> list[np.ndarray]:
    """Fake KV whose every value encodes (past name, head, token id, dim): a block that comes
    back from the wrong place is seen at once."""
    t = np.asarray(tokens, dtype=np.float32)
    return [(name * 1000 + np.arange(HEADS)[:, None, None] * 100 + t[None, :, None] * 10
             + np.arange(DIM)[None, None, :]).astype(np.float32) for name in range(NAMES)]


def hashes(tokens: list[int]) -> list[int]:
    return block_hashes(tokens, "m", block_size=BS)


def test_lookup_stops_at_the_first_miss_and_assembles_the_stored_kv() -> None:
    cache = PrefixCache(100 * BLOCK_BYTES, BS)
    tokens = list(range(10, 26))  # 4 blocks
    assert cache.insert(hashes(tokens), kv_for(tokens)) == 4
    assert cache.stats().bytes_used == 4 * BLOCK_BYTES
    other = tokens[:8] + [99] + tokens[9:]  # differs in block 2: blocks 2 and 3 miss
    assert cache.lookup(hashes(other)) == 2
    kv = cache.assemble(hashes(other)[:2])
    assert kv.shape == (NAMES, HEADS, 8, DIM)
    expected = kv_for(tokens[:8])
    for name in range(NAMES):
        np.testing.assert_array_equal(kv[name], expected[name])
    # a chain whose first block misses matches nothing, even if later hashes were held
    assert cache.lookup([12345] + hashes(tokens)[1:]) == 0
    s = cache.stats()
    assert (s.query_blocks, s.hit_blocks, s.hit_tokens, s.query_tokens) == (8, 2, 8, 32)


def test_insert_skips_held_blocks_and_needs_enough_kv() -> None:
    cache = PrefixCache(100 * BLOCK_BYTES, BS)
    tokens = list(range(12))
    assert cache.insert(hashes(tokens[:8]), kv_for(tokens[:8])) == 2
    assert cache.insert(hashes(tokens), kv_for(tokens)) == 1  # only block 2 is new
    assert len(cache) == 3 and cache.stats().stored_blocks == 3
    with pytest.raises(ValueError, match="tokens of KV"):
        cache.insert(hashes(tokens), kv_for(tokens[:8]))


def test_budget_is_respected_and_tails_are_evicted_before_ancestors() -> None:
    cache = PrefixCache(5 * BLOCK_BYTES, BS)
    a = list(range(100, 112))  # 3 blocks
    b = list(range(200, 212))  # 3 blocks
    ha, hb = hashes(a), hashes(b)
    cache.insert(ha, kv_for(a))
    assert cache.insert(hb, kv_for(b)) == 3  # room for 2 more: evicts a's LRU block, its tail
    assert cache.bytes_used <= 5 * BLOCK_BYTES
    assert set(cache.held()) == set(ha[:2]) | set(hb)
    assert cache.lookup(ha) == 2  # a's head is intact
    assert cache.stats().evicted_blocks == 1
    # a was touched last: b's tail goes next, then b's middle, never b's head before them
    c = list(range(300, 308))
    cache.insert(hashes(c), kv_for(c))
    assert set(cache.held()) == set(ha[:2]) | {hb[0]} | set(hashes(c))
    assert cache.held()[0] == hb[0]  # LRU order: b's head, then a's tail-first, c's tail-first
    assert cache.held()[1:] == [ha[1], ha[0], hashes(c)[1], hashes(c)[0]]


def test_a_chain_larger_than_the_budget_keeps_its_head() -> None:
    cache = PrefixCache(2 * BLOCK_BYTES + 10, BS)
    tokens = list(range(20))  # 5 blocks, only 2 fit
    assert cache.insert(hashes(tokens), kv_for(tokens)) == 2
    assert cache.lookup(hashes(tokens)) == 2
    assert cache.bytes_used == 2 * BLOCK_BYTES
    assert PrefixCache(0, BS).insert(hashes(tokens), kv_for(tokens)) == 0  # zero budget holds nothing
