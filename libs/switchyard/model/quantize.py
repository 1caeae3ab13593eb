"""Block-wise asymmetric 4-bit weight quantization in the layout of com.microsoft MatMulNBits.

A weight ``W`` of shape ``[K, N]`` (``K`` = input features, ``N`` = output features, i.e. the
transpose of an HF Linear weight) is cut along ``K`` into blocks of ``block_size`` values for
each output column ``n``. Each block gets its own float32 scale and 4-bit zero point:

    q = clip(round(w / scale) + zp, 0, 15)         w ≈ (q - zp) * scale

Layout (what onnxruntime's MatMulNBits checks, bits=4):
    packed       uint8   [N, k_blocks, block_size / 2]   two values per byte; the LOW nibble
                                                         holds the even element of the pair
    scales       float32 [N, k_blocks]                   (ORT also accepts the flat [N * k_blocks])
    zero_points  uint8   [N, ceil(k_blocks / 2)]         packed per column, low nibble = even block
                                                         (ORT also accepts the flat form)
where ``k_blocks = ceil(K / block_size)``; ``K`` is zero-padded up to a whole number of blocks.
"""

from __future__ import annotations

import numpy as np

BITS = 4
QMAX = (1 << BITS) - 1  # 15


def _check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (ORT's rule), got {block_size}")


def quantize_int4_blockwise(
    w_in_out: np.ndarray, block_size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``w_in_out`` ([K, N], float) → (packed, scales, zero_points); see module doc.

    The quantization range of every block includes 0, so 0.0 is represented exactly (and the
    zero padding of a ragged last block costs nothing).
    """
    _check_block_size(block_size)
    w = np.asarray(w_in_out, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] weight, got shape {w.shape}")
    k, n = w.shape
    k_blocks = -(-k // block_size)
    # [N, K_padded] then [N, k_blocks, block_size]; one transposed copy, done in float32.
    wt = np.zeros((n, k_blocks * block_size), dtype=np.float32)
    wt[:, :k] = w.T
    blocks = wt.reshape(n, k_blocks, block_size)
    del wt

    lo = np.minimum(blocks.min(axis=2), 0.0)
    hi = np.maximum(blocks.max(axis=2), 0.0)
    scales = (hi - lo) / QMAX
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)  # all-zero block: any scale
    zp = np.clip(np.rint(-lo / scales), 0, QMAX).astype(np.uint8)  # [N, k_blocks]

    q = np.rint(blocks / scales[:, :, None])
    q += zp[:, :, None]
    np.clip(q, 0, QMAX, out=q)
    q = q.astype(np.uint8)  # [N, k_blocks, block_size]
    del blocks

    packed = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)

    if k_blocks % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), dtype=np.uint8)], axis=1)
    zp_packed = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)  # [N, ceil(k_blocks/2)]
    return np.ascontiguousarray(packed), scales, np.ascontiguousarray(zp_packed)


def dequantize_int4_blockwise(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int
) -> np.ndarray:
    """Inverse of :func:`quantize_int4_blockwise`: returns the float32 weight [K, N]."""
    packed = np.asarray(packed, dtype=np.uint8)
    n, k_blocks, half = packed.shape
    block_size = half * 2
    q = np.empty((n, k_blocks, block_size), dtype=np.uint8)
    q[:, :, 0::2] = packed & 0x0F
    q[:, :, 1::2] = packed >> 4
    scales = np.asarray(scales, dtype=np.float32).reshape(n, k_blocks)
    zpp = np.asarray(zero_points, dtype=np.uint8).reshape(n, -1)
    zp = np.empty((n, zpp.shape[1] * 2), dtype=np.uint8)
    zp[:, 0::2] = zpp & 0x0F
    zp[:, 1::2] = zpp >> 4
    zp = zp[:, :k_blocks].astype(np.float32)
    w = (q.astype(np.float32) - zp[:, :, None]) * scales[:, :, None]
    return np.ascontiguousarray(w.reshape(n, k_blocks * block_size)[:, :k].T)
