"""ONNX llama builder (fp32 / int4), int4 quantizer, tiny model folder.

Ground truth is tests/reference_llama.py, an independent float64 numpy forward pass.
Tolerances: fp32 graph vs reference max |Δlogit| ≤ 1e-4 (observed ~1e-6 on logits of size ~0.5);
int4 graph vs reference on the dequantized weights ≤ 1e-3 (accuracy_level 0: MatMulNBits computes
in float32 with the dequantized weights, so this is float32 rounding too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from onnx import TensorProto, helper, numpy_helper

from switchyard.model.config import MANIFEST_FILE, LlamaConfig, ModelManifest
from switchyard.model.folder import load_manifest
from switchyard.model.graph_io import prompt_feeds
from switchyard.model.onnx_builder import build_llama_onnx
from switchyard.model.quantize import (
    BlockQuantized,
    concat_outputs,
    dequantize_int4_blockwise,
    from_ggml,
    quantize_blockwise,
    quantize_int4_blockwise,
)
from switchyard.model.tiny import (
    SPECIAL_TOKENS,
    TINY_CONFIG,
    build_tiny_model,
    byte_tokenizer,
    random_weights,
    tiny_manifest,
)

try:
    from reference_llama import reference_logits
except ImportError:  # tests/ imported as a package
    from tests.reference_llama import reference_logits

pytestmark = pytest.mark.unit

CFG = TINY_CONFIG
FP32_TOL = 1e-4
INT4_TOL = 1e-3
PROMPTS = [
    [5],
    [17, 300, 42, 7],
    [1, 64, 65, 66, 200, 201, 383, 0, 2, 99, 100, 101, 150, 151, 152, 153, 154],
]
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# --------------------------------------------------------------------------------------------
# helpers / fixtures
# --------------------------------------------------------------------------------------------


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _empty_past(batch: int, cfg: LlamaConfig = CFG) -> dict[str, np.ndarray]:
    shape = (batch, cfg.num_key_value_heads, 0, cfg.head_dim)
    return {f"past_key_values.{i}.{kind}": np.zeros(shape, np.float32)
            for i in range(cfg.num_hidden_layers) for kind in ("key", "value")}


def _step(sess: ort.InferenceSession, ids, past: dict[str, np.ndarray], attention_mask=None,
          position_ids=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One graph call; returns (logits [B, V], next past built from the presents)."""
    ids = np.atleast_2d(np.asarray(ids, dtype=np.int64))
    batch, seq = ids.shape
    n_past = next(iter(past.values())).shape[2]
    if attention_mask is None:
        attention_mask = np.ones((batch, n_past + seq), np.int64)
    if position_ids is None:
        position_ids = np.tile(np.arange(n_past, n_past + seq), (batch, 1))
    feeds = {"input_ids": ids, "attention_mask": np.asarray(attention_mask, np.int64),
             "position_ids": np.asarray(position_ids, np.int64), **past}
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feeds)))
    logits = out.pop("logits")
    assert logits.shape == (batch, 1, CFG.vocab_size)
    nxt = {name.replace("present.", "past_key_values."): v for name, v in out.items()}
    return logits[:, 0], nxt


def _dequantized(weights: dict[str, np.ndarray], block_size: int = 32,
                 lm_head_bits: int = 32) -> dict[str, np.ndarray]:
    """The weights an int4 graph built from float weights computes with (projections 4-bit;
    the tied lm_head float32 at accuracy_level 0, or 8-bit)."""
    def rt(w_out_in: np.ndarray, bits: int = 4) -> np.ndarray:
        return quantize_blockwise(w_out_in.T, block_size, bits).dequantize().T

    out = dict(weights)
    for i in range(CFG.num_hidden_layers):
        for proj in PROJECTIONS:
            name = f"model.layers.{i}.{proj}.weight"
            out[name] = rt(weights[name])
    if lm_head_bits == 8:
        out["lm_head.weight"] = rt(weights["model.embed_tokens.weight"], 8)
    return out


def _ggml_blocks(w_out_in: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """gguf-py's own quantizer: (raw blocks [rows, K/32, bytes], gguf-py's dequantization)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[qtype]
    raw = quantize(np.ascontiguousarray(w_out_in, dtype=np.float32), t)
    deq = dequantize(raw, t).reshape(w_out_in.shape).astype(np.float32)
    rows, k = w_out_in.shape
    return raw.reshape(rows, k // 32, -1), deq


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return random_weights(CFG, seed=0)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory, weights) -> ort.InferenceSession:
    return _session(build_llama_onnx(CFG, weights, tmp_path_factory.mktemp("fp32")))


@pytest.fixture(scope="module")
def int4(tmp_path_factory: pytest.TempPathFactory, weights) -> ort.InferenceSession:
    return _session(build_llama_onnx(CFG, weights, tmp_path_factory.mktemp("int4"), variant="int4"))


# --------------------------------------------------------------------------------------------
# (a) fp32 graph vs numpy reference
# --------------------------------------------------------------------------------------------


def test_graph_files_and_external_data(tmp_path: Path, weights) -> None:
    calls: list[tuple[str, int, int]] = []
    path = build_llama_onnx(CFG, weights, tmp_path, progress=lambda *a: calls.append(a))
    assert path == tmp_path / "model.onnx"
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    assert (tmp_path / "model.onnx.data").stat().st_size > 4 * CFG.vocab_size * CFG.hidden_size
    assert path.stat().st_size < 200_000
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in model.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    onnx.checker.check_model(str(path))
    assert ("layers", CFG.num_hidden_layers, CFG.num_hidden_layers) in calls
    assert calls[-1] == ("save", 1, 1)


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"len{len(p)}")
def test_fp32_prefill_matches_reference(fp32, weights, prompt) -> None:
    logits, past = _step(fp32, prompt, _empty_past(1))
    ref = reference_logits(CFG, weights, prompt)[-1]
    np.testing.assert_allclose(logits[0], ref, rtol=0, atol=FP32_TOL)
    assert past["past_key_values.0.key"].shape == (1, CFG.num_key_value_heads, len(prompt), CFG.head_dim)


def test_greedy_outputs_vary_across_prompts(weights) -> None:
    """The tiny model is not degenerate: greedy continuations differ and do not just repeat."""
    continuations = []
    for prompt in ([10, 11, 12], [200, 3], [77, 78, 79, 80, 81]):
        ids = list(prompt)
        for _ in range(8):
            ids.append(int(np.argmax(reference_logits(CFG, weights, ids)[-1])))
        continuations.append(tuple(ids[len(prompt):]))
    assert len(set(continuations)) == len(continuations)
    assert all(len(set(c)) >= 3 for c in continuations), continuations


# --------------------------------------------------------------------------------------------
# (b) incremental decoding with past KV
# --------------------------------------------------------------------------------------------


def test_incremental_decode_matches_full_recompute(fp32, weights) -> None:
    ids = [17, 300, 42, 7, 8]
    logits, past = _step(fp32, ids, _empty_past(1))
    for step in range(6):
        ref = reference_logits(CFG, weights, ids)[-1]
        np.testing.assert_allclose(logits[0], ref, rtol=0, atol=FP32_TOL, err_msg=f"step {step}")
        if step == 5:
            break
        ids.append(int(np.argmax(ref)))
        logits, past = _step(fp32, [ids[-1]], past)
        assert past["past_key_values.1.value"].shape[2] == len(ids)


def test_chunked_prefill_with_past(fp32, weights) -> None:
    """seq > 1 with past > 0: query s sees keys t <= past + s."""
    ids = [5, 6, 7, 8, 9, 10, 11]
    _, past = _step(fp32, ids[:4], _empty_past(1))
    logits, past = _step(fp32, ids[4:], past)
    np.testing.assert_allclose(logits[0], reference_logits(CFG, weights, ids)[-1], rtol=0, atol=FP32_TOL)
    # the presents of the chunked run equal those of a one-shot prefill
    _, full = _step(fp32, ids, _empty_past(1))
    for name, v in full.items():
        np.testing.assert_allclose(past[name], v, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# (c) ragged batches
# --------------------------------------------------------------------------------------------


def test_left_padded_batch_prefill_and_decode(fp32, weights) -> None:
    a, b = [17, 300, 42, 7, 8, 9], [100, 101, 102]
    pad = len(a) - len(b)
    ids = np.array([a, [0] * pad + b])
    mask = np.array([[1] * len(a), [0] * pad + [1] * len(b)])
    pos = np.array([list(range(len(a))), [0] * pad + list(range(len(b)))])
    logits, past = _step(fp32, ids, _empty_past(2), mask, pos)
    assert np.isfinite(logits).all()
    seqs = [list(a), list(b)]
    for step in range(4):
        for row, seq in enumerate(seqs):
            solo, _ = _step(fp32, seq, _empty_past(1))
            np.testing.assert_allclose(logits[row], solo[0], rtol=0, atol=FP32_TOL, err_msg=f"{step} {row}")
            np.testing.assert_allclose(logits[row], reference_logits(CFG, weights, seq)[-1],
                                       rtol=0, atol=FP32_TOL)
        nxt = [int(np.argmax(logits[r])) for r in range(2)]
        for seq, t in zip(seqs, nxt):
            seq.append(t)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos = np.array([[len(seqs[0]) - 1], [len(seqs[1]) - 1]])
        logits, past = _step(fp32, np.array(nxt)[:, None], past, mask, pos)


def test_middle_padding_in_kv_is_ignored(fp32, weights) -> None:
    """Each sequence's KV sits at arbitrary slots with garbage in between (attention_mask 0)."""
    rng = np.random.default_rng(5)
    a, b = [3, 4, 5, 6, 7, 8, 9, 10], [200, 201, 202]
    _, past_a = _step(fp32, a, _empty_past(1))
    _, past_b = _step(fp32, b, _empty_past(1))
    n_past = len(a)
    b_slots = [0, 1, 5]  # b's three keys; slots 2-4 and 6-7 are padding
    mask = np.zeros((2, n_past + 1), np.int64)
    mask[0] = 1
    mask[1, b_slots] = 1
    mask[1, -1] = 1
    past = {}
    for name, va in past_a.items():
        vb = (100 * rng.standard_normal(va.shape)).astype(np.float32)  # loud garbage
        vb[0][:, b_slots] = past_b[name][0]
        past[name] = np.concatenate([va, vb], axis=0)
    new = np.array([[50], [51]])
    logits, present = _step(fp32, new, past, mask, [[len(a)], [len(b)]])

    solo_a, _ = _step(fp32, [50], past_a)
    solo_b, _ = _step(fp32, [51], past_b)
    np.testing.assert_allclose(logits[0], solo_a[0], rtol=0, atol=FP32_TOL)
    np.testing.assert_allclose(logits[1], solo_b[0], rtol=0, atol=FP32_TOL)
    np.testing.assert_allclose(logits[1], reference_logits(CFG, weights, b + [51])[-1], rtol=0, atol=FP32_TOL)
    for name, v in present.items():  # present = concat(past, new) along the sequence axis
        np.testing.assert_array_equal(v[:, :, :n_past], past[name])


# --------------------------------------------------------------------------------------------
# (d) int4
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n,block", [(64, 24, 32), (100, 17, 32), (80, 8, 16), (576, 40, 64)])
def test_quantize_roundtrip_error_bounded(k, n, block) -> None:
    rng = np.random.default_rng(k + n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, 0] = 0.0  # an all-zero column stays exactly zero
    packed, scales, zp = quantize_int4_blockwise(w, block)
    k_blocks = -(-k // block)
    assert packed.dtype == np.uint8 and packed.shape == (n, k_blocks, block // 2)
    assert scales.dtype == np.float32 and scales.shape == (n, k_blocks)
    assert zp.dtype == np.uint8 and zp.shape == (n, (k_blocks + 1) // 2)
    deq = dequantize_int4_blockwise(packed, scales, zp, k)
    assert deq.shape == (k, n)
    # error ≤ half a quantization step (+ float slack) in every block
    step = np.repeat(scales.T, block, axis=0)[:k]  # [K, N]
    assert np.all(np.abs(deq - w) <= 0.5 * step * (1 + 1e-5) + 1e-7)
    np.testing.assert_array_equal(deq[:, 0], 0.0)
    # dequantized weights are fixed points of the quantizer
    again = dequantize_int4_blockwise(*quantize_int4_blockwise(deq, block), k)
    np.testing.assert_allclose(again, deq, rtol=0, atol=1e-6)


def test_quantize_blockwise_covers_one_signed_blocks_with_offsets() -> None:
    rng = np.random.default_rng(3)
    k, n, block = 96, 6, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:32, 1] = np.abs(w[:32, 1]) + 2.0  # all positive, far from 0
    w[32:64, 2] = -np.abs(w[32:64, 2]) - 1.0  # all negative
    w[64:, 3] = 0.75  # constant
    bq = quantize_blockwise(w, block)
    assert bq.offsets is not None and bq.offsets.shape == (n, k // block)
    assert np.count_nonzero(bq.offsets) == 3  # only the blocks whose range excludes 0
    deq = bq.dequantize()
    step = np.repeat(np.asarray(bq.scales).T, block, axis=0)
    assert np.all(np.abs(deq - w) <= 0.5 * step * (1 + 1e-5) + 1e-7)
    np.testing.assert_array_equal(deq[64:, 3], 0.75)
    # the same-sign block keeps its own range [min, max]
    assert bq.scales[1, 0] == pytest.approx((w[:32, 1].max() - w[:32, 1].min()) / 15, rel=1e-6)
    # the plain scheme widens the range to include 0 instead and needs no offsets
    plain = quantize_blockwise(w, block, allow_offsets=False)
    assert plain.offsets is None and plain.scales[1, 0] > 1.5 * bq.scales[1, 0]
    err_plain = np.abs(plain.dequantize() - w)[:32, 1].max()
    assert err_plain > 1.5 * np.abs(deq - w)[:32, 1].max()
    # random normal blocks straddle 0: no offsets needed
    assert quantize_blockwise(rng.standard_normal((64, 8)), 32).offsets is None


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_blockwise_8bit_and_ragged(bits) -> None:
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((100, 9)).astype(np.float32)
    bq = quantize_blockwise(w, 32, bits)
    assert bq.packed.shape == (9, 4, 32 * bits // 8)
    assert bq.zero_points is not None and bq.zero_points.shape == (9, 4 if bits == 8 else 2)
    step = np.repeat(np.asarray(bq.scales).T, 32, axis=0)[:100]
    assert np.all(np.abs(bq.dequantize() - w) <= 0.5 * step * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_from_ggml_is_exact(qtype) -> None:
    rng = np.random.default_rng(11)
    w = (0.05 * rng.standard_normal((24, 96))).astype(np.float32)  # HF [out, in]
    w[3, :32] = np.abs(w[3, :32]) + 0.1  # a block of one sign: Q4_1's m > 0
    w[5, 32:64] = 0.0  # d = 0
    raw, deq = _ggml_blocks(w, qtype)
    bq = from_ggml(qtype, raw)
    assert (bq.k, bq.n, bq.bits, bq.block_size) == (96, 24, 4 if qtype == "Q4_1" else 8, 32)
    assert (bq.offsets is not None) == (qtype == "Q4_1")
    np.testing.assert_allclose(bq.dequantize(), deq.T, rtol=0, atol=1e-7)
    assert np.abs(deq - w).max() > 0  # gguf really quantized
    if qtype == "Q4_1":
        # offsets are the part of m that an integer zero point cannot hold: within half a step,
        # except for the all-positive block (m > 0, zero point 0), where the offset is m itself
        small = np.abs(bq.offsets) <= 0.5 * np.asarray(bq.scales) * (1 + 1e-6) + 1e-12
        assert not small[3, 0] and small.sum() == small.size - 1
        assert bq.offsets[3, 0] == pytest.approx(deq[3, :32].min(), rel=1e-6)


def test_concat_outputs_matches_parts() -> None:
    rng = np.random.default_rng(2)
    a = quantize_blockwise(rng.standard_normal((64, 10)), 32)
    b = from_ggml("Q4_1", _ggml_blocks(rng.standard_normal((6, 64)).astype(np.float32), "Q4_1")[0])
    both = concat_outputs([a, b])
    assert both.n == 16 and both.offsets is not None
    np.testing.assert_array_equal(both.dequantize(), np.concatenate([a.dequantize(), b.dequantize()], axis=1))
    with pytest.raises(ValueError):
        concat_outputs([a, quantize_blockwise(rng.standard_normal((64, 3)), 32, 8)])


def test_nibble_order_low_nibble_is_even_element() -> None:
    # one column, one block of 16: values 0..15 map to q = 0..15 (scale 1, zero point 0)
    w = np.arange(16, dtype=np.float32)[:, None]
    packed, scales, zp = quantize_int4_blockwise(w, 16)
    assert scales[0, 0] == 1.0 and zp[0, 0] == 0
    assert packed[0, 0, 0] == 0x10 and packed[0, 0, 1] == 0x32  # (0,1) and (2,3)


@pytest.mark.parametrize("k,n,block", [(96, 40, 32), (100, 33, 32), (80, 24, 16), (64, 8, 64)])
def test_matmulnbits_node_matches_numpy(k, n, block) -> None:
    rng = np.random.default_rng(k * n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed, scales, zp = quantize_int4_blockwise(w, block)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zp"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block)
    graph = helper.make_graph(
        [node], "nbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales"),
         numpy_helper.from_array(zp, "zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8  # the builder's; onnx's default (newest) can be ahead of ONNX Runtime's
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((5, k)).astype(np.float32)
    y = sess.run(None, {"A": a})[0]
    ref = a.astype(np.float64) @ dequantize_int4_blockwise(packed, scales, zp, k).astype(np.float64)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_int4_graph_matches_reference_on_dequantized_weights(int4, weights) -> None:
    deq = _dequantized(weights)
    for prompt in PROMPTS:
        logits, _ = _step(int4, prompt, _empty_past(1))
        np.testing.assert_allclose(logits[0], reference_logits(CFG, deq, prompt)[-1], rtol=0, atol=INT4_TOL)
    # and with past KV
    ids = [17, 300, 42]
    _, past = _step(int4, ids, _empty_past(1))
    logits, _ = _step(int4, [9], past)
    np.testing.assert_allclose(logits[0], reference_logits(CFG, deq, ids + [9])[-1], rtol=0, atol=INT4_TOL)
    # quantization changed something, but not everything
    fp = reference_logits(CFG, weights, ids + [9])[-1]
    assert 1e-4 < np.abs(logits[0] - fp).max() < 0.5 * np.abs(fp).max()


def _ggml_model(weights: dict[str, np.ndarray]) -> tuple[dict[str, BlockQuantized], dict[str, np.ndarray]]:
    """The tiny weights as a Q4_1/Q8_0 GGUF would hold them: (prequantized, dequantized)."""
    pre: dict[str, BlockQuantized] = {}
    deq = dict(weights)
    names = [f"model.layers.{i}.{p}.weight" for i in range(CFG.num_hidden_layers) for p in PROJECTIONS]
    for name in names + ["model.embed_tokens.weight"]:
        qtype = "Q8_0" if name == "model.embed_tokens.weight" else "Q4_1"
        raw, deq[name] = _ggml_blocks(weights[name], qtype)
        pre[name] = from_ggml(qtype, raw)
    return pre, deq


@pytest.mark.parametrize("lm_head_bits", [32, 8])
def test_int4_graph_carries_prequantized_weights_exactly(tmp_path: Path, weights, lm_head_bits) -> None:
    """GGUF-style Q4_1 projections and a Q8_0 tied embedding: the int4 graph computes exactly
    the dequantized model (block offsets included), with a float32 or 8-bit lm_head."""
    pre, deq = _ggml_model(weights)
    path = build_llama_onnx(CFG, deq, tmp_path, variant="int4", prequantized=pre,
                            lm_head_bits=lm_head_bits)
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * CFG.num_hidden_layers + (lm_head_bits == 8)
    bits = sorted({helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "bits"})
    assert bits == ([4, 8] if lm_head_bits == 8 else [4])
    assert sum(n.op_type == "ReduceSum" for n in model.graph.node) == 4 * CFG.num_hidden_layers
    sess = _session(path)
    for prompt in PROMPTS:
        logits, _ = _step(sess, prompt, _empty_past(1))
        np.testing.assert_allclose(logits[0], reference_logits(CFG, deq, prompt)[-1], rtol=0, atol=FP32_TOL)
    # without the offsets (integer zero points only) the graph is measurably off
    rounded = {k: BlockQuantized(**{**v.__dict__, "offsets": None}) for k, v in pre.items()}
    off = _session(build_llama_onnx(CFG, deq, tmp_path / "rounded", variant="int4", prequantized=rounded))
    logits, _ = _step(off, PROMPTS[2], _empty_past(1))
    assert np.abs(logits[0] - reference_logits(CFG, deq, PROMPTS[2])[-1]).max() > 10 * FP32_TOL


def test_int4_accuracy_level_4_graph(tmp_path: Path, weights) -> None:
    """accuracy_level 4 (int8 activations) reaches every MatMulNBits, picks the 8-bit lm_head,
    and stays close to the exact result."""
    path = build_llama_onnx(CFG, weights, tmp_path, variant="int4", accuracy_level=4)
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * CFG.num_hidden_layers + 1
    assert all(helper.get_attribute_value(a) == 4 for n in nbits for a in n.attribute
               if a.name == "accuracy_level")
    deq = _dequantized(weights, lm_head_bits=8)
    logits, _ = _step(_session(path), PROMPTS[1], _empty_past(1))
    ref = reference_logits(CFG, deq, PROMPTS[1])[-1]
    assert np.abs(logits[0] - ref).max() < 0.05 * np.abs(ref).max()
    with pytest.raises(ValueError):
        build_llama_onnx(CFG, weights, tmp_path / "bad", variant="int4", lm_head_bits=4)


def _nbits_tensors(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Per MatMulNBits node: its attributes and every initializer it (and its block-offset
    MatMul) reads, keyed by the node's weight name."""
    import onnx

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out: dict[str, dict[str, np.ndarray]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        base = node.input[1].removesuffix(".qweight")
        tensors = {name.removeprefix(base): inits[name] for name in node.input[1:]}
        if base + ".offsets" in inits:
            tensors[".offsets"] = inits[base + ".offsets"]
        tensors["attrs"] = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        out[base] = tensors
    return out


def _at_accuracy_level_0(path: Path) -> ort.InferenceSession:
    """The graph at ``path`` with every MatMulNBits switched to accuracy_level 0 (exact)."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_convert_carries_gguf_blocks_into_every_int4_variant(tmp_path: Path, weights,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """convert_gguf hands the GGUF's own blocks to "int4-fast" too, also when it is converted
    alone: its weights are the int4 folder's, bit for bit, and at accuracy_level 0 it computes
    the dequantized model exactly. (Format 2 re-quantized int4-fast from the dequantized Q4_1
    values: every weight off by up to half a step, 2% greedy agreement on SmolLM2.)"""
    import switchyard.model.convert as convert_mod
    from switchyard.model.gguf_source import GgmlBlocks, GgufModel

    pre, deq = _ggml_model(weights)
    quantized = {}
    for name in pre:
        qtype = "Q8_0" if name == "model.embed_tokens.weight" else "Q4_1"
        quantized[name] = GgmlBlocks(qtype, 32, _ggml_blocks(weights[name], qtype)[0])
    model = GgufModel(config=CFG, weights=deq, tokenizer=byte_tokenizer(CFG.vocab_size),
                      chat_template=None, bos_token_id=1, eos_token_ids=(2,),
                      metadata={"name": "tiny"}, quantized=quantized)
    monkeypatch.setattr(convert_mod, "read_gguf", lambda path, progress=None: model)
    models = tmp_path / "models"
    (fast,) = convert_mod.convert_gguf(models, variants=("int4-fast",), gguf_path=tmp_path / "x.gguf")
    (exact,) = convert_mod.convert_gguf(models, variants=("int4",), gguf_path=tmp_path / "x.gguf")
    assert ModelManifest.load(fast).extra["int4_accuracy_level"] == 4

    fast_t, exact_t = _nbits_tensors(fast / "model.onnx"), _nbits_tensors(exact / "model.onnx")
    # int4's lm_head is the float32 Gemm; int4-fast's the Q8_0 embedding as 8-bit blocks
    assert set(fast_t) == set(exact_t) | {"lm_head"} and len(exact_t) == 4 * CFG.num_hidden_layers
    for name, tensors in exact_t.items():
        assert fast_t[name]["attrs"] == {**tensors["attrs"], "accuracy_level": 4}, name
        assert tensors.keys() == fast_t[name].keys() and ".offsets" in tensors, name
        for key, value in tensors.items():
            if key != "attrs":
                np.testing.assert_array_equal(fast_t[name][key], value, err_msg=f"{name}{key}")
    head = pre["model.embed_tokens.weight"]
    np.testing.assert_array_equal(fast_t["lm_head"][".qweight"], head.packed)
    np.testing.assert_array_equal(fast_t["lm_head"][".scales"], head.scales)

    sess = _at_accuracy_level_0(fast / "model.onnx")
    manifest = ModelManifest.load(fast)  # built as convert's DEFAULT_GRAPH: feeds for either kind
    for prompt in PROMPTS:
        (logits,) = sess.run(["logits"], prompt_feeds(manifest, list(prompt)))
        np.testing.assert_allclose(logits[0, 0], reference_logits(CFG, deq, prompt)[-1], rtol=0, atol=FP32_TOL)


# --------------------------------------------------------------------------------------------
# (e) tokenizer and model folder
# --------------------------------------------------------------------------------------------


def test_byte_tokenizer() -> None:
    tok = byte_tokenizer(CFG.vocab_size)
    assert tok.get_vocab_size() == CFG.vocab_size
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i
    for text in ["héllo 日本", "The quick brown fox.", "emoji 🦊 and tabs\tand\nnewlines", ""]:
        ids = tok.encode(text).ids
        assert all(0 <= t < CFG.vocab_size for t in ids)
        assert tok.decode(ids) == text
    assert len(tok.encode("the quick brown fox").ids) < len("the quick brown fox")  # merges exist
    assert byte_tokenizer(CFG.vocab_size).get_vocab() == tok.get_vocab()  # deterministic
    special = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert special[0] == 1 and special[-1] == 2


def test_tiny_model_folder(tmp_path: Path, weights) -> None:
    folder = build_tiny_model(tmp_path, name="tiny", seed=0, graph="plain")  # genai's and _step's contract
    assert folder == tmp_path / "tiny"
    names = {p.name for p in folder.iterdir()}
    assert names == {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json",
                     "tokenizer_config.json", MANIFEST_FILE}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    manifest = load_manifest(folder)
    assert manifest == tiny_manifest("tiny", 0, graph="plain")
    assert manifest.config == CFG and manifest.variant == "fp32"
    assert manifest.eos_token_ids == (2, 0) and manifest.bos_token_id == 1

    genai = json.loads((folder / "genai_config.json").read_text())
    m = genai["model"]
    assert m["type"] == "llama"
    assert m["context_length"] == 512 and m["vocab_size"] == CFG.vocab_size
    assert m["bos_token_id"] == 1 and m["eos_token_id"] == [2, 0] and m["pad_token_id"] == 2
    d = m["decoder"]
    assert d["filename"] == "model.onnx"
    assert (d["head_size"], d["hidden_size"], d["num_attention_heads"], d["num_hidden_layers"],
            d["num_key_value_heads"]) == (16, 64, 4, 2, 2)
    assert d["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"}
    assert d["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"}
    assert genai["search"]["max_length"] == 512 and genai["search"]["do_sample"] is False

    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tcfg["bos_token"] == "<|im_start|>" and tcfg["eos_token"] == "<|im_end|>"
    assert tcfg["chat_template"] == manifest.chat_template

    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.decode(tok.encode("héllo 日本").ids) == "héllo 日本"

    # the chat template renders ChatML (same Jinja settings as the catalog)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(manifest.chat_template).render(
        messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

    # the folder's graph is the tiny model
    ids = tok.encode(text).ids
    logits, _ = _step(_session(folder / "model.onnx"), ids, _empty_past(1))
    np.testing.assert_allclose(logits[0], reference_logits(CFG, weights, ids)[-1], rtol=0, atol=FP32_TOL)

    # idempotent: a second call rewrites nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    os.utime(folder / MANIFEST_FILE, ns=(1, 1))  # make any rewrite visible regardless of clock
    stamps[MANIFEST_FILE] = 1
    assert build_tiny_model(tmp_path, name="tiny", seed=0, graph="plain") == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_tiny_int4_folder_and_incomplete_folder_rebuilt(tmp_path: Path) -> None:
    stale = tmp_path / "tiny-int4"
    stale.mkdir()
    (stale / "model.onnx").write_text("half-written")  # no manifest: incomplete
    folder = build_tiny_model(tmp_path, name="tiny-int4", variant="int4", graph="plain")
    manifest = ModelManifest.load(folder)
    assert manifest.variant == "int4"
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    # q/k/v fused, o, gate/up fused, down; the tied lm_head is a float32 Gemm at accuracy_level 0
    assert ops.count("MatMulNBits") == 4 * CFG.num_hidden_layers
    assert "MatMul" in ops and "Gemm" in ops  # attention score/context matmuls stay float
    logits, _ = _step(_session(folder / "model.onnx"), [1, 2, 3], _empty_past(1))
    assert np.isfinite(logits).all()
