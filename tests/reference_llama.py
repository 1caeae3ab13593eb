"""Independent, deliberately plain numpy forward pass of a llama decoder (HF semantics).

Used as the ground truth for the ONNX graphs; it shares no code with the builder. Computes in
float64 by default so that its own rounding error is negligible next to the graph's float32.
"""

from __future__ import annotations

import math

import numpy as np

from switchyard.model.config import LlamaConfig


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * weight


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [S, hd/2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [S, hd]
    return np.cos(emb), np.sin(emb)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def reference_logits(
    config: LlamaConfig,
    weights: dict[str, np.ndarray],
    token_ids: list[int] | np.ndarray,
    positions: list[int] | np.ndarray | None = None,
    *,
    dtype: type = np.float64,
    bridge: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Logits [S, vocab] (``dtype``) for every position of ONE unpadded sequence, with plain
    causal attention over the whole prompt. ``positions`` defaults to 0..S-1. Uses
    ``lm_head.weight`` when present in ``weights``, else the (tied) embedding. ``bridge`` =
    (W [hidden, hidden], b): hidden @ W + b after the last layer, before the final norm."""
    c = config
    ids = np.asarray(token_ids, dtype=np.int64)
    seq = len(ids)
    pos = np.arange(seq) if positions is None else np.asarray(positions)
    hd = c.head_dim
    n_heads, n_kv = c.num_attention_heads, c.num_key_value_heads
    heads_per_kv = n_heads // n_kv

    def w(name: str) -> np.ndarray:
        return np.asarray(weights[name], dtype=dtype)

    hidden = np.asarray(weights["model.embed_tokens.weight"])[ids].astype(dtype)  # [S, hidden]
    cos, sin = (t.astype(dtype) for t in _rope_cos_sin(pos, hd, c.rope_theta))
    causal = np.tril(np.ones((seq, seq), dtype=bool))

    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}"
        x = _rms_norm(hidden, w(f"{p}.input_layernorm.weight"), c.rms_norm_eps)
        q = x @ w(f"{p}.self_attn.q_proj.weight").T  # [S, H*hd]
        k = x @ w(f"{p}.self_attn.k_proj.weight").T  # [S, kvH*hd]
        v = x @ w(f"{p}.self_attn.v_proj.weight").T

        head_outputs = []
        for head in range(n_heads):
            kv = head // heads_per_kv
            qh = q[:, head * hd:(head + 1) * hd]
            kh = k[:, kv * hd:(kv + 1) * hd]
            vh = v[:, kv * hd:(kv + 1) * hd]
            qh = qh * cos + _rotate_half(qh) * sin
            kh = kh * cos + _rotate_half(kh) * sin
            scores = qh @ kh.T / math.sqrt(hd)
            scores = np.where(causal, scores, -np.inf)
            scores = scores - scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs = probs / probs.sum(axis=-1, keepdims=True)
            head_outputs.append(probs @ vh)
        attn = np.concatenate(head_outputs, axis=-1) @ w(f"{p}.self_attn.o_proj.weight").T
        hidden = hidden + attn

        x = _rms_norm(hidden, w(f"{p}.post_attention_layernorm.weight"), c.rms_norm_eps)
        gate = x @ w(f"{p}.mlp.gate_proj.weight").T
        up = x @ w(f"{p}.mlp.up_proj.weight").T
        hidden = hidden + (_silu(gate) * up) @ w(f"{p}.mlp.down_proj.weight").T

    if bridge is not None:
        hidden = hidden @ np.asarray(bridge[0], dtype) + np.asarray(bridge[1], dtype)
    hidden = _rms_norm(hidden, w("model.norm.weight"), c.rms_norm_eps)
    head = w("lm_head.weight") if "lm_head.weight" in weights else w("model.embed_tokens.weight")
    return hidden @ head.T
