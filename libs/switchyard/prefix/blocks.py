"""Chained block hashes: the name of a token prefix that router and worker both compute.

A token sequence is cut into fixed-size blocks of `BLOCK_SIZE` tokens (the trailing partial
block is not named). Block i's hash covers blocks 0..i: h_i = H(h_{i-1} ‖ tokens of block i),
as vLLM's prefix cache does, so equal hashes mean equal whole prefixes and a lookup walks the
chain until the first miss. The hash is 64-bit BLAKE2b (stable across processes and Python
versions, unlike `hash()`), seeded with a namespace (the model name) so the same tokens under
two models never collide in one index.
"""

from __future__ import annotations

import hashlib
from typing import Container, Sequence

import numpy as np

BLOCK_SIZE = 16  # tokens per block: small enough that a chat turn's tail is mostly reused


def _root(namespace: str) -> bytes:
    return hashlib.blake2b(namespace.encode("utf-8"), digest_size=8).digest()


def block_hashes(token_ids: Sequence[int] | np.ndarray, namespace: str = "",
                 block_size: int = BLOCK_SIZE, limit: int | None = None) -> list[int]:
    """Hashes (unsigned 64-bit ints) of every full block of `token_ids`, in order; at most
    `limit` blocks when given."""
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    tokens = np.asarray(token_ids, dtype=np.uint32)
    n = len(tokens) // block_size
    if limit is not None:
        n = min(n, max(limit, 0))
    out: list[int] = []
    prev = _root(namespace)
    for i in range(n):
        prev = hashlib.blake2b(prev + tokens[i * block_size:(i + 1) * block_size].tobytes(),
                               digest_size=8).digest()
        out.append(int.from_bytes(prev, "little"))
    return out


def matched_blocks(hashes: Sequence[int], held: Container[int]) -> int:
    """How many leading blocks of a prefix (its chained `hashes`) are in `held`."""
    n = 0
    for h in hashes:
        if h not in held:
            break
        n += 1
    return n
