"""Token sampling: greedy, temperature, top-k, top-p, repetition penalty, per-sequence seeds.

Every sequence owns its random generator, seeded from the request, so its output does not
depend on which other sequences share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """Domain form of switchyard.v1.SamplingParams (defaults already applied)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that depends on the sequence's history."""
        return self.greedy and self.repetition_penalty == 1.0


def apply_repetition_penalty(logits: np.ndarray, seen: Collection[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty: divide positive logits of seen tokens, multiply negative ones.
    The seen ids become an array only when there is a penalty (not on every token)."""
    if penalty == 1.0 or not seen:
        return logits
    seen = np.fromiter(seen, dtype=np.int64, count=len(seen))
    out = logits.copy()
    picked = out[seen]
    out[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


NUCLEUS_CANDIDATES = 1024


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Ids of the smallest set of most likely tokens whose mass reaches top_p (ties by id).
    Sorts only the NUCLEUS_CANDIDATES most likely tokens when the nucleus ends among them (a
    partition is O(vocab); a full sort of 49k probabilities took ~5 ms a row)."""
    if probs.shape[-1] > NUCLEUS_CANDIDATES:
        part = np.argpartition(-probs, NUCLEUS_CANDIDATES)[:NUCLEUS_CANDIDATES]
        order = part[np.lexsort((part, -probs[part]))]
        cumulative = np.cumsum(probs[order], dtype=np.float64)  # float32 drifts ~1e-5 over a vocabulary
        end = int(np.searchsorted(cumulative, top_p))
        if end < NUCLEUS_CANDIDATES - 1:
            return order[:end + 1]
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order], dtype=np.float64)
    return order[:int(np.searchsorted(cumulative, top_p)) + 1]


def sample_token(logits: np.ndarray, params: SamplingParams, seen: Collection[int],
                 rng: np.random.Generator) -> int:
    """Pick the next token from one row of logits."""
    logits = apply_repetition_penalty(logits.astype(np.float32, copy=False), seen,
                                      params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    scaled = scaled - np.max(scaled)
    probs = np.exp(scaled)
    probs /= probs.sum()
    if 0.0 < params.top_p < 1.0:
        keep = nucleus(probs, params.top_p)
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.shape[-1], p=probs))
