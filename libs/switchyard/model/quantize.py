"""Block-wise weight quantization in the layout of com.microsoft MatMulNBits (4 and 8 bits).

A weight ``W`` of shape ``[K, N]`` (``K`` = input features, ``N`` = output features, i.e. the
transpose of an HF Linear weight) is cut along ``K`` into blocks of ``block_size`` values for
each output column ``n``. Each block gets a float32 scale and an integer zero point:

    q = clip(round(w / scale) + zp, 0, 2**bits - 1)         w ≈ (q - zp) * scale

Layout (what onnxruntime's MatMulNBits checks):
    packed       uint8   [N, k_blocks, block_size * bits / 8]   bits=4: two values per byte, the
                                                                LOW nibble holds the even element
    scales       float32 [N, k_blocks]                          (ORT also accepts [N * k_blocks])
    zero_points  uint8   bits=4: [N, ceil(k_blocks / 2)]        packed per column, low nibble =
                                                                even block; bits=8: [N, k_blocks]
                 (absent: ORT's default zero point 2**(bits-1))
where ``k_blocks = ceil(K / block_size)``; ``K`` is padded up to a whole number of blocks.

A :class:`BlockQuantized` weight may also carry exact float32 per-block ``offsets`` [N, k_blocks]
(``w = (q - zp) * scale + offset``), which the graph adds as ``blocksum(x) @ offsets``: the way
to represent a grid that does not contain 0, since MatMulNBits' integer zero points always put
0.0 on the grid.

Pre-quantized GGUF weights are carried over exactly (:func:`from_ggml`):

* Q8_0 (``w = d * q``, q int8) → bits=8, ``q + 128`` with the default zero point 128.
* Q4_1 (``w = d * q + m``, q ∈ [0, 15]) → bits=4, scale ``d``. MatMulNBits would take ``-m/d``
  as a float zero point, but onnxruntime's CPU kernel then dequantizes the whole weight on every
  call (~20x slower than the integer path, measured with ORT 1.32), and rounding ``-m/d`` to an
  integer moves every weight of the block by up to half a step. So the integer zero point is
  ``zp = round(-m/d)`` and the remainder ``r = m + zp * d`` (|r| ≤ d/2) becomes a per-block
  *offset*: ``w = (q - zp) * d + r``. The graph adds ``blocksum(x) @ offsets`` (a [k_blocks, N]
  float32 MatMul, 1/32 of the weight's size) to the MatMulNBits output — exact up to float32
  rounding, on the fast integer path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BITS = 4
QMAX = (1 << BITS) - 1  # 15

# ggml block layouts (ggml-common.h): 32 values per block, little-endian fp16 scales
QK = 32
GGML_Q4_1_BYTES = 2 + 2 + QK // 2  # d, m, 16 bytes of nibbles (value j low nibble, j+16 high)
GGML_Q8_0_BYTES = 2 + QK  # d, 32 int8
GGML_SUPPORTED = ("Q4_1", "Q8_0")


def _check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (ORT's rule), got {block_size}")


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 2m] uint8 values < 16 → [..., m] bytes, low nibble = even element."""
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8, copy=False)


def _unpack_nibbles(p: np.ndarray) -> np.ndarray:
    q = np.empty((*p.shape[:-1], p.shape[-1] * 2), dtype=np.uint8)
    q[..., 0::2] = p & 0x0F
    q[..., 1::2] = p >> 4
    return q


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """uint8 zero points [N, k_blocks] → MatMulNBits' layout for ``bits``."""
    zp = np.asarray(zp, dtype=np.uint8)
    if bits == 8:
        return np.ascontiguousarray(zp)
    if zp.shape[1] % 2:
        zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), dtype=np.uint8)], axis=1)
    return _pack_nibbles(zp)


def unpack_zero_points(zero_points: np.ndarray | None, n: int, k_blocks: int, bits: int) -> np.ndarray:
    """MatMulNBits zero points (or None: the default 2**(bits-1)) → float32 [N, k_blocks]."""
    if zero_points is None:
        return np.full((n, k_blocks), float(1 << (bits - 1)), dtype=np.float32)
    zpp = np.asarray(zero_points, dtype=np.uint8).reshape(n, -1)
    zp = zpp if bits == 8 else _unpack_nibbles(zpp)
    return zp[:, :k_blocks].astype(np.float32)


@dataclass(frozen=True, eq=False)
class BlockQuantized:
    """A [K, N] weight in MatMulNBits layout (see module doc), optionally with exact per-block
    additive offsets: ``W[k, n] = (q - zp) * scale + offsets[n, k // block_size]``."""

    k: int
    n: int
    bits: int
    block_size: int
    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None = None  # uint8, MatMulNBits layout; None → 2**(bits-1)
    offsets: np.ndarray | None = None  # float32 [N, k_blocks]
    source: str = "float"  # "float" (quantized here), "Q4_1", "Q8_0"

    @property
    def k_blocks(self) -> int:
        return -(-self.k // self.block_size)

    def q_values(self) -> np.ndarray:
        """Unpacked integer codes, uint8 [N, k_blocks, block_size]."""
        p = np.asarray(self.packed, dtype=np.uint8)
        return p if self.bits == 8 else _unpack_nibbles(p)

    def dequantize(self) -> np.ndarray:
        """The float32 weight [K, N] the graph computes with."""
        n, kb, bs = self.n, self.k_blocks, self.block_size
        scales = np.asarray(self.scales, dtype=np.float32).reshape(n, kb)
        zp = unpack_zero_points(self.zero_points, n, kb, self.bits)
        w = (self.q_values().astype(np.float32) - zp[:, :, None]) * scales[:, :, None]
        if self.offsets is not None:
            w += np.asarray(self.offsets, dtype=np.float32)[:, :, None]
        return np.ascontiguousarray(w.reshape(n, kb * bs)[:, :self.k].T)

    def max_error(self, w_in_out: np.ndarray) -> float:
        return float(np.abs(self.dequantize() - np.asarray(w_in_out, dtype=np.float32)).max())


def concat_outputs(parts: Sequence[BlockQuantized]) -> BlockQuantized:
    """Several weights over the same input ([K, N_i] each, same bits and block size) as one
    [K, sum N_i] weight, so that one MatMulNBits computes all of them (outputs in order)."""
    first = parts[0]
    if any((p.k, p.bits, p.block_size) != (first.k, first.bits, first.block_size) for p in parts):
        raise ValueError("concatenated weights need the same K, bits and block_size")
    kb, bits = first.k_blocks, first.bits

    def zero_points(p: BlockQuantized) -> np.ndarray:
        if p.zero_points is not None:
            return np.asarray(p.zero_points, dtype=np.uint8).reshape(p.n, -1)
        default = np.full((p.n, kb), 1 << (bits - 1), dtype=np.uint8)
        return pack_zero_points(default, bits)

    has_zp = any(p.zero_points is not None for p in parts)
    has_offsets = any(p.offsets is not None for p in parts)
    return BlockQuantized(
        k=first.k, n=sum(p.n for p in parts), bits=bits, block_size=first.block_size,
        packed=np.concatenate([p.packed for p in parts], axis=0),
        scales=np.concatenate([np.asarray(p.scales, np.float32).reshape(p.n, kb) for p in parts]),
        zero_points=np.concatenate([zero_points(p) for p in parts]) if has_zp else None,
        offsets=np.concatenate([np.zeros((p.n, kb), np.float32) if p.offsets is None else p.offsets
                                for p in parts]) if has_offsets else None,
        source="+".join(dict.fromkeys(p.source for p in parts)),
    )


def quantize_blockwise(w_in_out: np.ndarray, block_size: int = 32, bits: int = 4, *,
                       allow_offsets: bool = True) -> BlockQuantized:
    """Asymmetric min/max quantization of ``w_in_out`` ([K, N], float) per block.

    Each block's grid spans exactly its own [min, max] with an integer zero point. Since the
    range is exactly ``2**bits - 1`` steps wide, every value lies within half a step of a grid
    point even though rounding the zero point shifts the grid by up to half a step. MatMulNBits'
    zero points are unsigned (grid point ``q = zp`` is always 0.0), so a block whose values all
    have the same sign cannot be covered by its own range alone: such a block gets an exact
    additive offset (its minimum, with zero point 0; see :class:`BlockQuantized`) and the result
    carries ``offsets`` (None when no block needs one). ``allow_offsets=False`` instead widens
    those blocks' ranges to include 0 (the plain MatMulNBits scheme: coarser steps for them).

    A ragged last block is padded with its own last value (padding never widens the range); a
    constant block is exact.

    Not for weights that are already block-quantized (a GGUF's dequantized Q4_1 values): their
    grid ``d * q + m`` is offset from the integer-zero-point grid by ``m``'s remainder, so this
    moves nearly every weight by up to half a step; carry such blocks over with
    :func:`from_ggml` instead.
    """
    _check_block_size(block_size)
    _check_bits(bits)
    qmax = (1 << bits) - 1
    w = np.asarray(w_in_out, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] weight, got shape {w.shape}")
    k, n = w.shape
    k_blocks = -(-k // block_size)
    wt = np.ascontiguousarray(w.T)  # [N, K]
    if k_blocks * block_size != k:
        wt = np.pad(wt, ((0, 0), (0, k_blocks * block_size - k)), mode="edge")
    blocks = wt.reshape(n, k_blocks, block_size)
    del wt

    lo = blocks.min(axis=2)
    hi = blocks.max(axis=2)
    if allow_offsets:
        shifted = (lo > 0) | (hi < 0)  # the block's range excludes 0
    else:
        shifted = np.zeros(lo.shape, dtype=bool)
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    offsets = np.where(shifted, lo, 0.0).astype(np.float32)  # [N, k_blocks]
    scales = (hi - lo) / qmax
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)  # constant block: any scale
    zp = np.where(shifted, 0.0, np.rint(-lo / scales))
    zp = np.clip(zp, 0, qmax).astype(np.uint8)  # [N, k_blocks]

    q = np.rint((blocks - offsets[:, :, None]) / scales[:, :, None])
    q += zp[:, :, None]
    np.clip(q, 0, qmax, out=q)
    q = q.astype(np.uint8)  # [N, k_blocks, block_size]
    del blocks
    packed = q if bits == 8 else _pack_nibbles(q)
    return BlockQuantized(k=k, n=n, bits=bits, block_size=block_size,
                          packed=np.ascontiguousarray(packed), scales=scales,
                          zero_points=pack_zero_points(zp, bits),
                          offsets=offsets if shifted.any() else None)


def quantize_int4_blockwise(
    w_in_out: np.ndarray, block_size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-bit :func:`quantize_blockwise` without offsets (every block's range includes 0), as
    (packed, scales, packed uint8 zero points): a plain MatMulNBits weight."""
    bq = quantize_blockwise(w_in_out, block_size, bits=4, allow_offsets=False)
    assert bq.zero_points is not None and bq.offsets is None
    return bq.packed, bq.scales, bq.zero_points


def dequantize_int4_blockwise(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int
) -> np.ndarray:
    """Inverse of :func:`quantize_int4_blockwise`: returns the float32 weight [K, N]."""
    packed = np.asarray(packed, dtype=np.uint8)
    n, _, half = packed.shape
    return BlockQuantized(k=k, n=n, bits=4, block_size=half * 2, packed=packed,
                          scales=np.asarray(scales, dtype=np.float32),
                          zero_points=zero_points).dequantize()


# --------------------------------------------------------------------------------------------
# ggml blocks → MatMulNBits (exact)
# --------------------------------------------------------------------------------------------


def _f16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 (little-endian fp16) → float32 [...]."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32)


def from_ggml(ggml_type: str, blocks: np.ndarray) -> BlockQuantized:
    """Raw ggml blocks of a Linear weight → the exact MatMulNBits equivalent.

    ``blocks`` is uint8 [rows, K / 32, block bytes] with rows = output features (ggml stores a
    Linear as [out, in] row-major, blocks along the input dimension), i.e. the transpose of the
    [K, N] result. Supports Q4_1 and Q8_0 (see the module doc).
    """
    blocks = np.asarray(blocks, dtype=np.uint8)
    if blocks.ndim != 3:
        raise ValueError(f"expected [rows, blocks, bytes] ggml blocks, got shape {blocks.shape}")
    n, kb, nbytes = blocks.shape
    if ggml_type == "Q8_0":
        if nbytes != GGML_Q8_0_BYTES:
            raise ValueError(f"Q8_0 blocks have {GGML_Q8_0_BYTES} bytes, got {nbytes}")
        d = _f16(blocks[:, :, 0:2])
        q = (blocks[:, :, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return BlockQuantized(k=kb * QK, n=n, bits=8, block_size=QK, packed=np.ascontiguousarray(q),
                              scales=d, zero_points=None, source="Q8_0")
    if ggml_type == "Q4_1":
        if nbytes != GGML_Q4_1_BYTES:
            raise ValueError(f"Q4_1 blocks have {GGML_Q4_1_BYTES} bytes, got {nbytes}")
        d = _f16(blocks[:, :, 0:2])
        m = _f16(blocks[:, :, 2:4])
        qs = blocks[:, :, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # ggml: value j low, j + 16 high nibble
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(d > 0, np.rint(-m / d), 0.0)
        zp = np.clip(zp, 0, QMAX).astype(np.uint8)
        offsets = (m + zp.astype(np.float32) * d).astype(np.float32)
        return BlockQuantized(k=kb * QK, n=n, bits=4, block_size=QK, packed=_pack_nibbles(q),
                              scales=d, zero_points=pack_zero_points(zp, 4), offsets=offsets,
                              source="Q4_1")
    raise NotImplementedError(f"ggml type {ggml_type!r} cannot be carried into MatMulNBits "
                              f"(supported: {', '.join(GGML_SUPPORTED)})")
