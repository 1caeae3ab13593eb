"""Build the ONNX graph of a llama-shaped decoder from numpy weights (fp32 or int4).

The graph follows the I/O contract of :mod:`switchyard.model.config` (onnxruntime-genai names):

    input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], past_key_values.{i}.key/value
    [B, kv_heads, P, head_dim]  →  logits [B, 1, V] (last position), present.{i}.key/value
    [B, kv_heads, P+S, head_dim]

Per layer: RMSNorm → q/k/v projections → rotary (HF rotate_half) → grouped-query attention with
an additive mask built once per graph from attention_mask and the causal rule → o_proj →
residual → RMSNorm → SwiGLU MLP → residual. Final RMSNorm and the lm_head run on the last
position only. (Fusing q/k/v and gate/up into one MatMul each made no measurable difference to
CPU decode speed of the fp32 graph at SmolLM2-135M size, so there the projections stay one
MatMul per HF weight; the int4 graph fuses them — one MatMulNBits and one block-offset
correction for q/k/v and one for gate/up — which took its batch-1 decode from ~55 to ~65
tokens/s at accuracy_level 4 on 2 shared cores.)

Grouped-query attention runs without a per-head loop: q [B, H, S, hd] is reshaped to
[B, kvh, group * S, hd] (head h = kv * group + g lands in kv block h // group, row g * S + s)
and multiplied against k [B, kvh, T, hd]; the [B, 1, S, T] mask is tiled to [B, 1, group * S, T]
in the same row order.

variant="int4": every projection (q/k/v, o, gate/up, down) is a com.microsoft MatMulNBits
(bits=4). A weight found in ``prequantized`` (e.g. a GGUF's Q4_1 blocks, see
:func:`switchyard.model.quantize.from_ggml`) is carried over exactly; any other is quantized
here by :func:`switchyard.model.quantize.quantize_blockwise`. A weight with per-block offsets
(the part of Q4_1's ``m`` that an integer zero point cannot hold, or a same-sign block of our own
quantizer) adds ``blocksum(x) @ offsets`` — one Reshape + ReduceSum per distinct input and a
small float32 MatMul [k_blocks, N] + Add per MatMulNBits — which keeps MatMulNBits on its fast
integer-zero-point path (a float zero point would be exact too, but ORT's CPU kernel then
dequantizes the weight on every call). The lm_head is 8-bit or float32 (``lm_head_bits``): the
logits are the most quantization-sensitive output and a 4-bit lm_head visibly changes greedy
answers. The embedding Gather stays float32.

Everything is written straight into one ModelProto (no graph copies) and saved with the weights
as external data in ``model.onnx.data``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import TensorProto, helper

from switchyard.model.config import MODEL_FILE, LlamaConfig
from switchyard.model.quantize import BlockQuantized, concat_outputs, quantize_blockwise, unpack_zero_points

DATA_FILE = MODEL_FILE + ".data"
OPSET = 17
MS_DOMAIN = "com.microsoft"
MASK_VALUE = -1e9  # finite "minus infinity": fully masked rows stay NaN-free
VARIANTS = ("fp32", "int4")
GRAPHS = ("plain", "fused")
DTYPES = {"float32": np.float32, "float16": np.float16}  # the fused graph's weights, activations and KV
LM_HEAD_BITS = (8, 32)  # int4 variant's lm_head: MatMulNBits bits=8, or float32

Progress = Callable[[str, int, int], None]


class _Graph:
    """Appends nodes and initializers straight into a ModelProto's graph (no copies)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, *,
           n_out: int = 1, domain: str = "", **attrs) -> str | list[str]:
        base = self.name(hint or op_type)
        outs = [base] if n_out == 1 else [f"{base}:{j}" for j in range(n_out)]
        self.graph.node.append(
            helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs)
        )
        return outs[0] if n_out == 1 else outs

    def init(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        t = self.graph.initializer.add()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.raw_data = arr.tobytes()
        return name

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            # A Constant node, not an initializer: small shape/axis constants must stay inline
            # (ORT's shape inference cannot read external data), while every initializer goes
            # to model.onnx.data.
            name = self.name("const")
            self.graph.node.append(helper.make_node(
                "Constant", [], [name], name=name, value=onnx.numpy_helper.from_array(arr, name)))
            self._consts[key] = name
        return self._consts[key]


def _get(weights: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in weights:
        raise KeyError(f"missing weight {name!r}")
    arr = np.asarray(weights[name])
    if arr.shape != shape:
        raise ValueError(f"weight {name!r} has shape {arr.shape}, expected {shape}")
    return arr


def _rope_tables(config: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos [maxpos, hd] and the sign-folded sin [maxpos, hd] of HF's rotate_half rope.

    q*cos + rotate_half(q)*sin == q*cos + concat(q2, q1) * concat(-sin_h, sin_h).
    """
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    pos = np.arange(config.max_position_embeddings, dtype=np.float64)
    freqs = np.outer(pos, inv_freq)  # [maxpos, hd/2]
    cos = np.cos(freqs)
    sin = np.sin(freqs)
    cos_t = np.concatenate([cos, cos], axis=1).astype(np.float32)
    sin_t = np.concatenate([-sin, sin], axis=1).astype(np.float32)
    return cos_t, sin_t


def build_llama_onnx(
    config: LlamaConfig,
    weights: Mapping[str, np.ndarray],
    out_dir: Path,
    *,
    variant: str = "fp32",
    block_size: int = 32,
    progress: Progress | None = None,
    accuracy_level: int = 0,
    prequantized: Mapping[str, BlockQuantized] | None = None,
    lm_head_bits: int | None = None,
    bridge: tuple[np.ndarray, np.ndarray] | None = None,
    hidden_outputs: Sequence[int] = (),
    graph: str = "plain",
    lm_head_accuracy_level: int | None = None,
    dtype: str = "float32",
    file_name: str = MODEL_FILE,
) -> Path:
    """Write ``out_dir/<file_name>`` (+ ``<file_name>.data``) for ``config`` and return its path.

    ``weights`` uses HF names and shapes (see config.py); ``variant`` is "fp32" or "int4"
    (``block_size`` is the int4 quantization block along the input dimension). ``progress`` is
    called as ``progress(stage, done, total)`` with stage "layers" (once per decoder layer) and
    "save".

    ``accuracy_level`` is MatMulNBits' attribute (int4 only): 0 computes in float32 with the
    dequantized weights (exact w.r.t. the quantized model); 4 quantizes activations to int8 on
    the fly: ~1.4x faster batch-1 decode on CPU, but on SmolLM2-135M the logits move by ~1
    (of ~25) and only ~44% of 32-token greedy continuations stay identical
    (bench/int4_agreement.py).

    ``prequantized`` (int4 only) maps HF weight names to weights already in MatMulNBits layout
    ([K, N] = the transposed HF weight); one with ``bits`` no larger than its slot's (4 for the
    projections, ``lm_head_bits`` for the lm_head, which reads the embedding's entry when tied)
    is used as is instead of being quantized from ``weights``.

    ``lm_head_bits`` (int4 only): 8 → MatMulNBits bits=8, 32 → float32 (a Gemm sharing the
    embedding when tied). None picks 8 when ``accuracy_level`` is 4 and 32 otherwise: ORT 1.32's
    CPU MatMulNBits runs bits=8 fast only with int8 activations (accuracy_level 4); at level 0 it
    falls back to dequantizing the whole [vocab, hidden] weight per call (~35x slower than the
    float32 Gemm, measured).

    ``lm_head_accuracy_level`` (int4, ``lm_head_bits`` 8): the lm_head MatMulNBits' own
    accuracy_level (None: ``accuracy_level``). 4 with level-0 projections keeps the decoder's
    arithmetic exact and multiplies only the 8-bit lm_head with int8 activations, as llama.cpp
    does with the GGUF's Q8_0 output weights — a quarter of the float32 lm_head's bytes per token.

    ``dtype`` (fused graph only): "float32", or "float16" — weights (scales, for MatMulNBits),
    activations and KV in half precision, the graph for CUDA; logits still come out float32.

    ``bridge`` = (W [hidden, hidden], b [hidden]): an affine map h @ W + b (float32 MatMul + Add)
    between the last decoder layer and the final norm — the fitted "tuned lens" that lets a
    truncated model's residual stream reach the lm_head's basis (switchyard.model.bridge).

    ``hidden_outputs``: layer counts i (0 = the embedding, n_layers = the last layer's output,
    before any bridge or norm) whose residual stream is added as an extra graph output
    ``hidden.{i}`` [B, S, hidden] at every position — what the bridge is fitted on. Serving
    graphs have none.

    ``graph``: "plain" (standard ONNX ops, the I/O contract in config.py; what the numpy
    reference tests check) or "fused" (ONNX Runtime's contrib operators and the fused I/O
    contract, ``FUSED_CONTRACT`` in config.py: GroupQueryAttention with rotary inside and the KV
    in a preallocated buffer that is past and present at once, SimplifiedLayerNormalization /
    SkipSimplifiedLayerNormalization, one packed q/k/v projection, greedy ArgMax in the graph).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    fused = graph == "fused"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if dtype != "float32" and not fused:
        raise ValueError("the plain graph is float32 only (it is the numpy reference's twin)")
    fdt = DTYPES[dtype]
    # Q4_1's per-block offsets as float zero points in the float16 (CUDA) graph: 16 fewer nodes
    # per layer; on the CPU float zero points are ~12x slower (bench/cpu_kernels.py), so the
    # float32 graph keeps integer zero points plus the blocksum(x) @ offsets correction.
    float_zero_points = fdt == np.float16
    if fused and hidden_outputs:
        raise ValueError("hidden_outputs need the plain graph (the bridge is fitted on it)")
    hidden_outputs = sorted(set(hidden_outputs))
    if any(not 0 <= i <= config.num_hidden_layers for i in hidden_outputs):
        raise ValueError(f"hidden_outputs {hidden_outputs} outside 0..{config.num_hidden_layers}")
    if lm_head_bits is None:
        lm_head_bits = 8 if accuracy_level == 4 else 32
    if lm_head_bits not in LM_HEAD_BITS:
        raise ValueError(f"lm_head_bits must be one of {LM_HEAD_BITS}, got {lm_head_bits}")
    prequantized = prequantized or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda stage, done, total: None)

    c = config
    hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    group = nh // nkv
    hid, inter, vocab, n_layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    q_dim, kv_dim = nh * hd, nkv * hd

    model = onnx.ModelProto()
    model.ir_version = 8  # opset 17 era; understood by every ORT >= 1.14
    model.producer_name = "switchyard"
    model.opset_import.append(helper.make_opsetid("", OPSET))
    if variant == "int4" or fused:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    model.graph.name = "llama"
    g = _Graph(model)

    block_sums: dict[tuple[str, int], str] = {}

    def block_sum(x: str, k: int, bs: int) -> str:
        """x [B, S, K] → [B, S, K / bs]: the sum of x over each quantization block (cached)."""
        key = (x, bs)
        if key not in block_sums:
            kb = -(-k // bs)
            if kb * bs != k:  # ragged last block: zero-pad x (the padded weights multiply 0)
                x = g.op("Pad", [x, g.const([0, 0, 0, 0, 0, kb * bs - k])], f"{x}.pad{bs}")
            blocked = g.op("Reshape", [x, g.const([0, 0, kb, bs])], f"{key[0]}.blocks{bs}")
            block_sums[key] = g.op("ReduceSum", [blocked, g.const([-1])], f"{x}.blocksum{bs}",
                                   keepdims=0)
        return block_sums[key]

    def quantized(w_in_out: np.ndarray, bits: int, source: str | None) -> BlockQuantized:
        """The ``prequantized`` entry for ``source`` if it fits ``bits``, else quantize here."""
        k, n = w_in_out.shape
        bq = prequantized.get(source) if source else None
        if bq is not None and (bq.k, bq.n) != (k, n):
            raise ValueError(f"prequantized {source!r} is [K, N] = {(bq.k, bq.n)}, expected {(k, n)}")
        if bq is None or bq.bits > bits:
            bq = quantize_blockwise(w_in_out, block_size, bits)
        return bq

    def linear(x: str, w_in_out: np.ndarray, name: str, *, bits: int = 4,
               source: str | None = None, level: int | None = None) -> str:
        """x [..., K] @ w_in_out [K, N] as MatMul (fp32) or MatMulNBits (int4 variant).

        ``source`` names the ``prequantized`` entry that may replace quantizing ``w_in_out``.
        """
        if variant == "fp32" or bits == 32:
            w = np.ascontiguousarray(w_in_out, dtype=fdt)
            return g.op("MatMul", [x, g.init(f"{name}.weight", w)], name)
        return nbits(x, quantized(w_in_out, bits, source), name, level)

    def linears(x: str, parts: list[tuple[np.ndarray, str, str]], *, split: bool = True) -> list[str] | str:
        """Several 4-bit projections of the same x: in the int4 variant one MatMulNBits over
        the concatenated weights, then Split (fewer kernel launches and block-offset nodes).
        ``split=False`` returns the packed output [..., sum of N] (the fused graph's q/k/v,
        which GroupQueryAttention takes packed); fp32 then concatenates the weights."""
        name = parts[0][1].rsplit(".", 1)[0] + "." + "_".join(n.rsplit(".", 1)[1] for _, n, _ in parts)
        if variant == "fp32":
            if not split:
                return linear(x, np.concatenate([w for w, _, _ in parts], axis=1), name)
            return [linear(x, w, name, source=src) for w, name, src in parts]
        bqs = [quantized(w, 4, src) for w, name, src in parts]
        if len({(b.bits, b.block_size) for b in bqs}) > 1:
            outs = [nbits(x, bq, name) for bq, (_, name, _) in zip(bqs, parts)]
            return outs if split else g.op("Concat", outs, f"{name}.packed", axis=-1)
        y = nbits(x, concat_outputs(bqs), name)
        if not split:
            return y
        return g.op("Split", [y, g.const([b.n for b in bqs])], f"{name}.split",
                    n_out=len(parts), axis=-1)

    def nbits(x: str, bq: BlockQuantized, name: str, level: int | None = None) -> str:
        k, n = bq.k, bq.n
        scales = np.asarray(bq.scales, dtype=np.float32)
        inputs = [x, g.init(f"{name}.qweight", bq.packed), g.init(f"{name}.scales", scales.astype(fdt))]
        offsets = bq.offsets
        if offsets is not None and float_zero_points and np.all(scales != 0):
            # d·(q - zp) + off == d·(q - (zp - off/d)): the offsets folded into float zero points
            kb = -(-k // bq.block_size)
            zp = unpack_zero_points(bq.zero_points, n, kb, bq.bits).astype(np.float64)
            zpf = zp - np.asarray(offsets, np.float64).reshape(n, kb) / scales.reshape(n, kb)
            inputs.append(g.init(f"{name}.fzeros", zpf.reshape(-1).astype(fdt)))
            offsets = None
        elif bq.zero_points is not None:
            inputs.append(g.init(f"{name}.qzeros", bq.zero_points))
        y = g.op("MatMulNBits", inputs, name, domain=MS_DOMAIN, K=k, N=n, bits=bq.bits,
                 block_size=bq.block_size, accuracy_level=accuracy_level if level is None else level)
        if offsets is not None:
            offsets_t = np.ascontiguousarray(np.asarray(offsets, dtype=fdt).T)  # [kb, N]
            corr = g.op("MatMul", [block_sum(x, k, bq.block_size),
                                   g.init(f"{name}.offsets", offsets_t)], f"{name}.offset")
            y = g.op("Add", [y, corr], f"{name}.exact")
        return y

    def rms_norm(x: str, w: np.ndarray, name: str) -> str:
        # Pow → ReduceMean → Add → Sqrt → Div → Mul: the pattern ORT fuses into
        # SimplifiedLayerNormalization at ORT_ENABLE_EXTENDED and above.
        sq = g.op("Pow", [x, two], f"{name}.pow")
        mean = g.op("ReduceMean", [sq], f"{name}.mean", axes=[-1], keepdims=1)
        std = g.op("Sqrt", [g.op("Add", [mean, eps], f"{name}.add")], f"{name}.sqrt")
        normed = g.op("Div", [x, std], f"{name}.div")
        return g.op("Mul", [normed, g.init(f"{name}.weight", w.astype(np.float32))], name)

    def lm_head(x: str, embed: np.ndarray, embed_name: str) -> str:
        """x [B, 1, hid] → logits [B, 1, vocab]."""
        lm = embed if c.tie_word_embeddings else _get(weights, "lm_head.weight", (vocab, hid))
        lm_source = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        if (variant == "fp32" or lm_head_bits == 32) and c.tie_word_embeddings:
            # Share the embedding initializer: Gemm with transB on [B, hid] → [B, vocab].
            x2 = g.op("Reshape", [x, g.const([-1, hid])], "lm_head.in2d")
            y = g.op("Gemm", [x2, embed_name], "lm_head", transB=1)
            return g.op("Unsqueeze", [y, g.const([1])], "lm_head.out3d")
        return linear(x, lm.T, "lm_head", bits=lm_head_bits, source=lm_source, level=lm_head_accuracy_level)

    if fused:
        _fused_body(g, model, c, weights, linear, linears, lm_head, bridge, report, fdt)
        return _save(model, out_dir, report, file_name)

    eps = g.const(np.float32(c.rms_norm_eps), np.float32)
    two = g.const(np.float32(2.0), np.float32)

    # ---- graph inputs / outputs -------------------------------------------------------------
    gi, go = model.graph.input, model.graph.output
    gi.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
    gi.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]))
    gi.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
    kv_past = ["batch_size", nkv, "past_sequence_length", hd]
    kv_total = ["batch_size", nkv, "total_sequence_length", hd]
    for i in range(n_layers):
        for kind in ("key", "value"):
            gi.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_past))
    go.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, vocab]))
    for i in range(n_layers):
        for kind in ("key", "value"):
            go.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, kv_total))
    for i in hidden_outputs:
        go.append(helper.make_tensor_value_info(f"hidden.{i}", TensorProto.FLOAT,
                                                ["batch_size", "sequence_length", hid]))

    def expose(i: int, x: str) -> None:
        """The residual stream after ``i`` layers as graph output hidden.{i}, if asked for."""
        if i in hidden_outputs:
            model.graph.node.append(helper.make_node("Identity", [x], [f"hidden.{i}"], name=f"hidden.{i}"))

    # ---- embedding, rotary tables, mask (once per graph) ------------------------------------
    embed = _get(weights, "model.embed_tokens.weight", (vocab, hid)).astype(np.float32, copy=False)
    embed_name = g.init("model.embed_tokens.weight", embed)
    h = g.op("Gather", [embed_name, "input_ids"], "embed", axis=0)  # [B, S, hid]
    expose(0, h)

    cos_t, sin_t = _rope_tables(c)
    scale = 1.0 / math.sqrt(hd)
    pos = "position_ids"
    # [B, S, 1, hd]; the q tables carry the 1/sqrt(hd) attention scale (rope is linear in q).
    axes2 = g.const([2])
    cos_k = g.op("Unsqueeze", [g.op("Gather", [g.init("rope.cos", cos_t), pos], "cos", axis=0), axes2], "cos_k")
    sin_k = g.op("Unsqueeze", [g.op("Gather", [g.init("rope.sin", sin_t), pos], "sin", axis=0), axes2], "sin_k")
    cos_q = g.op("Unsqueeze", [g.op("Gather", [g.init("rope.cos_q", cos_t * np.float32(scale)), pos], "cosq", axis=0), axes2], "cos_q")
    sin_q = g.op("Unsqueeze", [g.op("Gather", [g.init("rope.sin_q", sin_t * np.float32(scale)), pos], "sinq", axis=0), axes2], "sin_q")
    del cos_t, sin_t

    one_i = g.const(1)
    zero_i = g.const(0)
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"], "ids_shape"), one_i], "seq_len", axis=0)
    total_len = g.op("Gather", [g.op("Shape", ["attention_mask"], "am_shape"), one_i], "total_len", axis=0)
    past_len = g.op("Sub", [total_len, seq_len], "past_len")
    key_idx = g.op("Range", [zero_i, total_len, one_i], "key_idx")                      # [T]
    query_pos = g.op("Range", [past_len, total_len, one_i], "query_pos")                # [S]
    query_pos = g.op("Unsqueeze", [query_pos, g.const([1])], "query_pos_col")           # [S, 1]
    causal = g.op("LessOrEqual", [key_idx, query_pos], "causal")                        # [S, T]
    am = g.op("Cast", ["attention_mask"], "am_bool", to=TensorProto.BOOL)
    am = g.op("Unsqueeze", [am, g.const([1, 2])], "am_4d")                              # [B,1,1,T]
    allowed = g.op("And", [causal, am], "allowed")                                      # [B,1,S,T]
    mask = g.op("Where", [allowed, g.const(np.float32(0.0), np.float32),
                          g.const(np.float32(MASK_VALUE), np.float32)], "mask")
    if group > 1:
        mask = g.op("Tile", [mask, g.const([1, 1, group, 1])], "mask_gqa")              # [B,1,gS,T]

    shape_bshd_q = g.const([0, 0, nh, hd])
    shape_bshd_kv = g.const([0, 0, nkv, hd])
    shape_gqa = g.const([0, nkv, -1, hd])
    shape_heads = g.const([0, nh, -1, hd])
    shape_bsd = g.const([0, 0, q_dim])
    split_half = g.const([hd // 2, hd // 2])

    def rope(x: str, cos: str, sin: str, name: str) -> str:
        x1, x2 = g.op("Split", [x, split_half], f"{name}.split", n_out=2, axis=-1)
        rot = g.op("Concat", [x2, x1], f"{name}.rot", axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos], f"{name}.cos"),
                            g.op("Mul", [rot, sin], f"{name}.sin")], name)

    # ---- decoder layers ---------------------------------------------------------------------
    for i in range(n_layers):
        p = f"model.layers.{i}"
        wq = _get(weights, f"{p}.self_attn.q_proj.weight", (q_dim, hid))
        wk = _get(weights, f"{p}.self_attn.k_proj.weight", (kv_dim, hid))
        wv = _get(weights, f"{p}.self_attn.v_proj.weight", (kv_dim, hid))
        wo = _get(weights, f"{p}.self_attn.o_proj.weight", (hid, q_dim))
        wg = _get(weights, f"{p}.mlp.gate_proj.weight", (inter, hid))
        wu = _get(weights, f"{p}.mlp.up_proj.weight", (inter, hid))
        wd = _get(weights, f"{p}.mlp.down_proj.weight", (hid, inter))

        x = rms_norm(h, _get(weights, f"{p}.input_layernorm.weight", (hid,)), f"{p}.input_layernorm")
        q, k, v = linears(x, [(w.T, f"{p}.self_attn.{n}", f"{p}.self_attn.{n}.weight")
                              for w, n in ((wq, "q_proj"), (wk, "k_proj"), (wv, "v_proj"))])

        q = g.op("Reshape", [q, shape_bshd_q], f"{p}.q_bshd")
        k = g.op("Reshape", [k, shape_bshd_kv], f"{p}.k_bshd")
        v = g.op("Reshape", [v, shape_bshd_kv], f"{p}.v_bshd")
        q = rope(q, cos_q, sin_q, f"{p}.q_rope")
        k = rope(k, cos_k, sin_k, f"{p}.k_rope")
        q = g.op("Transpose", [q], f"{p}.q_bhsd", perm=[0, 2, 1, 3])
        k = g.op("Transpose", [k], f"{p}.k_bhsd", perm=[0, 2, 1, 3])
        v = g.op("Transpose", [v], f"{p}.v_bhsd", perm=[0, 2, 1, 3])

        k_all = f"present.{i}.key"
        v_all = f"present.{i}.value"
        model.graph.node.append(helper.make_node(
            "Concat", [f"past_key_values.{i}.key", k], [k_all], name=f"{p}.k_concat", axis=2))
        model.graph.node.append(helper.make_node(
            "Concat", [f"past_key_values.{i}.value", v], [v_all], name=f"{p}.v_concat", axis=2))

        qg = g.op("Reshape", [q, shape_gqa], f"{p}.q_gqa")                          # [B,kvh,gS,hd]
        kt = g.op("Transpose", [k_all], f"{p}.k_t", perm=[0, 1, 3, 2])              # [B,kvh,hd,T]
        scores = g.op("MatMul", [qg, kt], f"{p}.scores")                            # [B,kvh,gS,T]
        scores = g.op("Add", [scores, mask], f"{p}.masked")
        probs = g.op("Softmax", [scores], f"{p}.probs", axis=-1)
        ctx = g.op("MatMul", [probs, v_all], f"{p}.ctx")                            # [B,kvh,gS,hd]
        ctx = g.op("Reshape", [ctx, shape_heads], f"{p}.ctx_heads")                 # [B,H,S,hd]
        ctx = g.op("Transpose", [ctx], f"{p}.ctx_bshd", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, shape_bsd], f"{p}.ctx_bsd")
        attn = linear(ctx, wo.T, f"{p}.self_attn.o_proj", source=f"{p}.self_attn.o_proj.weight")
        h = g.op("Add", [h, attn], f"{p}.attn_residual")

        x = rms_norm(h, _get(weights, f"{p}.post_attention_layernorm.weight", (hid,)),
                     f"{p}.post_attention_layernorm")
        gate, up = linears(x, [(w.T, f"{p}.mlp.{n}", f"{p}.mlp.{n}.weight")
                               for w, n in ((wg, "gate_proj"), (wu, "up_proj"))])
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}.mlp.sigmoid")], f"{p}.mlp.silu")
        act = g.op("Mul", [act, up], f"{p}.mlp.swiglu")
        down = linear(act, wd.T, f"{p}.mlp.down_proj", source=f"{p}.mlp.down_proj.weight")
        h = g.op("Add", [h, down], f"{p}.mlp_residual")
        expose(i + 1, h)
        report("layers", i + 1, n_layers)

    # ---- head: last position only -----------------------------------------------------------
    last = g.op("Slice", [h, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1])], "last")
    if bridge is not None:
        bw, bb = bridge
        if np.shape(bw) != (hid, hid) or np.shape(bb) != (hid,):
            raise ValueError(f"bridge must be ([{hid}, {hid}], [{hid}]), got {np.shape(bw)}, {np.shape(bb)}")
        last = g.op("MatMul", [last, g.init("bridge.weight", np.asarray(bw, np.float32))], "bridge.matmul")
        last = g.op("Add", [last, g.init("bridge.bias", np.asarray(bb, np.float32))], "bridge")
    x = rms_norm(last, _get(weights, "model.norm.weight", (hid,)), "model.norm")
    logits_src = lm_head(x, embed, embed_name)
    model.graph.node.append(helper.make_node("Identity", [logits_src], ["logits"], name="logits"))
    return _save(model, out_dir, report, file_name)


def _save(model: onnx.ModelProto, out_dir: Path, report: Progress, file_name: str = MODEL_FILE) -> Path:
    report("save", 0, 1)
    path = out_dir / file_name
    data_path = out_dir / (file_name + ".data")
    if data_path.exists():
        data_path.unlink()  # the external-data writer appends to an existing file
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data_path.name, size_threshold=0,
    )
    report("save", 1, 1)
    return path


def _fused_body(g: _Graph, model: onnx.ModelProto, c: LlamaConfig, weights: Mapping[str, np.ndarray],
                linear: Callable[..., str], linears: Callable[..., list[str] | str],
                lm_head: Callable[[str, np.ndarray, str], str], bridge: tuple[np.ndarray, np.ndarray] | None,
                report: Progress, fdt: type = np.float32) -> None:
    """The decoder on ONNX Runtime's contrib operators (I/O: ``FUSED_CONTRACT`` in config.py).

    Per layer: SkipSimplifiedLayerNormalization (the residual add and the RMSNorm in one node;
    the first layer has no skip yet, so plain SimplifiedLayerNormalization) → one packed q/k/v
    projection → GroupQueryAttention (rotary inside, HF rotate_half layout; KV appended in place
    into the buffer bound as both past and present at row b's position seqlens_k[b] + 1 - S) →
    o_proj → SkipSimplifiedLayerNormalization → gate/up → SiLU · up → down. Rows are
    right-padded: row b's new tokens are its first (seqlens_k[b] + 1 - past_b) positions of S,
    and ``last_token_index`` (b * S + i, into the flattened tokens) names the one whose logits
    are returned.
    """
    hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    hid, inter, vocab, n_layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    q_dim, kv_dim = nh * hd, nkv * hd
    ftype = helper.np_dtype_to_tensor_dtype(np.dtype(fdt))
    gi, go = model.graph.input, model.graph.output
    gi.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
    gi.append(helper.make_tensor_value_info("last_token_index", TensorProto.INT64, ["batch_size"]))
    gi.append(helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]))
    gi.append(helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []))
    kv = ["batch_size", nkv, "max_sequence_length", hd]
    for i in range(n_layers):
        for kind in ("key", "value"):
            gi.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", ftype, kv))
    go.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, vocab]))
    go.append(helper.make_tensor_value_info("next_token", TensorProto.INT64, ["batch_size"]))
    for i in range(n_layers):
        for kind in ("key", "value"):
            go.append(helper.make_tensor_value_info(f"present.{i}.{kind}", ftype, kv))

    embed = _get(weights, "model.embed_tokens.weight", (vocab, hid)).astype(fdt, copy=False)
    embed_name = g.init("model.embed_tokens.weight", embed)
    h = g.op("Gather", [embed_name, "input_ids"], "embed", axis=0)  # [B, S, hid]
    inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    freqs = np.outer(np.arange(c.max_position_embeddings, dtype=np.float64), inv_freq)  # [maxpos, hd/2]
    cos_cache = g.init("rope.cos_cache", np.cos(freqs).astype(fdt))
    sin_cache = g.init("rope.sin_cache", np.sin(freqs).astype(fdt))
    eps = float(c.rms_norm_eps)

    def norm(x: str, w: np.ndarray, name: str) -> str:
        return g.op("SimplifiedLayerNormalization", [x, g.init(f"{name}.weight", w.astype(fdt))],
                    name, axis=-1, epsilon=eps, stash_type=1)

    def skip_norm(x: str, skip: str, w: np.ndarray, name: str) -> tuple[str, str]:
        """(RMSNorm(x + skip) * w, x + skip) in one node."""
        outs = g.op("SkipSimplifiedLayerNormalization", [x, skip, g.init(f"{name}.weight", w.astype(fdt))],
                    name, n_out=4, domain=MS_DOMAIN, epsilon=eps)
        return outs[0], outs[3]

    delta: str | None = None  # the last sub-layer's output, not yet added to h
    for i in range(n_layers):
        p = f"model.layers.{i}"
        w_in = _get(weights, f"{p}.input_layernorm.weight", (hid,))
        if delta is None:
            x = norm(h, w_in, f"{p}.input_layernorm")
        else:
            x, h = skip_norm(h, delta, w_in, f"{p}.input_layernorm")
        qkv = linears(x, [(_get(weights, f"{p}.self_attn.{n}.weight", (o, hid)).T, f"{p}.self_attn.{n}",
                           f"{p}.self_attn.{n}.weight")
                          for n, o in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim))], split=False)
        attn = f"{p}.attn"
        model.graph.node.append(helper.make_node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
             "total_sequence_length", cos_cache, sin_cache],
            [attn, f"present.{i}.key", f"present.{i}.value"], name=f"{p}.gqa", domain=MS_DOMAIN,
            num_heads=nh, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0, scale=1.0 / math.sqrt(hd)))
        wo = _get(weights, f"{p}.self_attn.o_proj.weight", (hid, q_dim))
        o = linear(attn, wo.T, f"{p}.self_attn.o_proj", source=f"{p}.self_attn.o_proj.weight")
        x, h = skip_norm(h, o, _get(weights, f"{p}.post_attention_layernorm.weight", (hid,)),
                         f"{p}.post_attention_layernorm")
        gate, up = linears(x, [(_get(weights, f"{p}.mlp.{n}.weight", (inter, hid)).T, f"{p}.mlp.{n}",
                                f"{p}.mlp.{n}.weight") for n in ("gate_proj", "up_proj")])
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}.mlp.sigmoid")], f"{p}.mlp.silu")
        act = g.op("Mul", [act, up], f"{p}.mlp.swiglu")
        wd = _get(weights, f"{p}.mlp.down_proj.weight", (hid, inter))
        delta = linear(act, wd.T, f"{p}.mlp.down_proj", source=f"{p}.mlp.down_proj.weight")
        report("layers", i + 1, n_layers)

    # ---- head: one position per row (last_token_index), then norm and lm_head -------------
    h = g.op("Add", [h, delta], "final_residual") if delta is not None else h
    # A flat index into [B * S] tokens: no Shape node, so nothing of the graph is placed on the
    # CPU beside a CUDA session (what CUDA graph capture needs).
    flat = g.op("Reshape", [h, g.const([-1, hid])], "tokens_flat")                        # [B*S, hid]
    last = g.op("Unsqueeze", [g.op("Gather", [flat, "last_token_index"], "last_2d", axis=0),
                              g.const([1])], "last")                                      # [B, 1, hid]
    if bridge is not None:
        bw, bb = bridge
        if np.shape(bw) != (hid, hid) or np.shape(bb) != (hid,):
            raise ValueError(f"bridge must be ([{hid}, {hid}], [{hid}]), got {np.shape(bw)}, {np.shape(bb)}")
        last = g.op("MatMul", [last, g.init("bridge.weight", np.asarray(bw, fdt))], "bridge.matmul")
        last = g.op("Add", [last, g.init("bridge.bias", np.asarray(bb, fdt))], "bridge")
    x = norm(last, _get(weights, "model.norm.weight", (hid,)), "model.norm")
    logits_src = lm_head(x, embed, embed_name)
    if fdt != np.float32:  # the sampler reads float32 logits
        logits_src = g.op("Cast", [logits_src], "logits_f32", to=TensorProto.FLOAT)
    model.graph.node.append(helper.make_node("Identity", [logits_src], ["logits"], name="logits"))
    best = g.op("ArgMax", ["logits"], "argmax", axis=-1, keepdims=0)  # [B, 1]
    model.graph.node.append(helper.make_node("Reshape", [best, g.const([-1])], ["next_token"], name="next_token"))
