"""The graphs' KV names, and feeds for running a model folder's graph directly (tests,
benchmarks) whichever graph kind it is: rows of equal length, no padding, the cache starting
empty. The worker's decode batches (services/worker/*_batch.py) bind their KV themselves."""

from __future__ import annotations

import numpy as np

from switchyard.model.config import ModelManifest
from switchyard.model.folder import graph_kind


def past_names(n_layers: int) -> list[str]:
    """The graphs' KV input names, layer by layer, key then value (both graph kinds)."""
    return [f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    """The graphs' KV output names, in the order of past_names."""
    return [name.replace("past_key_values", "present") for name in past_names(n_layers)]


def empty_past(manifest: ModelManifest, batch: int, capacity: int) -> dict[str, np.ndarray]:
    """An empty cache: [batch, kv_heads, 0, head_dim] for the plain graph (it concatenates), a
    zeroed [batch, kv_heads, capacity, head_dim] buffer for the fused one (appended in place)."""
    c = manifest.config
    length = capacity if graph_kind(manifest) == "fused" else 0
    return {name: np.zeros((batch, c.num_key_value_heads, length, c.head_dim), np.float32)
            for name in past_names(c.num_hidden_layers)}


def step_feeds(manifest: ModelManifest, input_ids: np.ndarray, past_length: int,
               past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds for ``input_ids`` [B, S] after ``past_length`` cached tokens per row; the graph's
    ``logits`` output is then the last new token's, and its ``present.*`` the next ``past``."""
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    rows, new = ids.shape
    total = past_length + new
    if graph_kind(manifest) == "fused":
        return {"input_ids": ids, "last_token_index": np.arange(rows, dtype=np.int64) * new + new - 1,
                "seqlens_k": np.full(rows, total - 1, np.int32),
                "total_sequence_length": np.array(total, np.int32), **past}
    return {"input_ids": ids, "attention_mask": np.ones((rows, total), np.int64),
            "position_ids": np.tile(np.arange(past_length, total, dtype=np.int64), (rows, 1)), **past}


def prompt_feeds(manifest: ModelManifest, ids: list[int]) -> dict[str, np.ndarray]:
    """One prompt from an empty cache (fetch "logits": its last token's)."""
    return step_feeds(manifest, np.array([ids], np.int64), 0, empty_past(manifest, 1, len(ids)))
