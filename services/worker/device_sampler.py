"""Temperature / top-k / top-p sampling as a small ONNX graph, run where the logits are.

A decode step that samples would otherwise bring a [batch, vocab] logits tensor to the host
and sort each row in numpy (`sampling.sample_token`, ~2 ms a row for top-p over a 49k
vocabulary on this project's CPUs). This graph takes the logits as the model left them (a
device OrtValue on CUDA), one uniform draw per row, and returns token ids.

It draws exactly what `sample_token` draws for the same uniform number: numpy's
`Generator.choice(p=...)` takes one `random()` and returns the first token id, in id order,
whose cumulative probability exceeds it; the graph keeps the same candidates (top-k, then
the smallest set of most likely tokens whose mass reaches top-p), orders them by token id,
and counts, accumulating in float64 like numpy. The probabilities themselves are float32 in
both, rounded differently, so a draw within ~1e-6 of a cumulative boundary may land on the
neighbouring token (tests check exactly that).

Repetition penalty needs each row's history and stays on the host (`Engine` sends such
batches there).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .sampling import SamplingParams

OPSET = 18
# Prefix sums run in blocks of this many elements (see `cumsum` in build_sampler_graph).
CUMSUM_BLOCK = 64


def build_sampler_graph(logits_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """Inputs: logits [B, 1, V] (a decode step's output), temperature [B] float, top_p and
    uniform [B] double (uniform: the row's `Generator.random()`), top_k [B] int64 (V when the row has none), k [1] int64 (candidates sorted per row).
    Outputs: token [B] int64, and complete [B] bool — false where the row's nucleus did not fit
    in its k candidates (the caller then runs again with k = V)."""
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def const(name: str, value: np.ndarray) -> str:
        nodes.append(helper.make_node("Constant", [], [name], name=name, value=helper.make_tensor(
            name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape, value.flatten().tolist())))
        return name

    axis0 = const("axis0", np.array([0], dtype=np.int64))
    axis1 = const("axis1", np.array([1], dtype=np.int64))
    zero, one = const("zero", np.array(0, dtype=np.int64)), const("one", np.array(1, dtype=np.int64))
    minus_inf = const("minus_inf", np.array(-np.inf, dtype=np.float32))
    zero_f = const("zero_f", np.array(0.0, dtype=np.float32))

    def column(name: str) -> str:  # [B] -> [B, 1]
        return node("Unsqueeze", [name, axis1], f"{name}_b1")

    def arange(n: str, name: str) -> str:  # [1, n]
        return node("Unsqueeze", [node("Range", [zero, n, one], f"{name}_range"), axis0], name)

    def cumsum(x: str, name: str, exclusive: bool = False) -> str:
        """Prefix sums of [B, N] along N, in blocks: ONNX Runtime's CUDA CumSum adds every
        output's whole prefix (O(N²) a row — for a 49k vocabulary ~110 ms a step at batch 256
        on an H200); sums within blocks of CUMSUM_BLOCK, then over the blocks' totals, are
        O(N·block + (N/block)²)."""
        block = const(f"{name}_block", np.array(CUMSUM_BLOCK, dtype=np.int64))
        n = node("Gather", [node("Shape", [x], f"{name}_shape"), one], f"{name}_n")
        blocks_n = node("Div", [node("Add", [n, const(f"{name}_block_m1", np.array(CUMSUM_BLOCK - 1, dtype=np.int64))],
                                     f"{name}_n_up"), block], f"{name}_blocks_n")
        pad = node("Sub", [node("Mul", [blocks_n, block], f"{name}_padded_n"), n], f"{name}_pad")
        zeros3 = const(f"{name}_zeros3", np.zeros(3, dtype=np.int64))
        pads = node("Concat", [zeros3, node("Unsqueeze", [pad, axis0], f"{name}_pad_1")], f"{name}_pads", axis=0)
        padded = node("Pad", [x, pads], f"{name}_padded", mode="constant")
        blocks = node("Reshape", [padded, const(f"{name}_shape_bnk", np.array([0, -1, CUMSUM_BLOCK], dtype=np.int64))],
                      f"{name}_blocks")  # [B, N/block, block]
        axis2 = const(f"{name}_axis2", np.array(2, dtype=np.int64))
        within = node("CumSum", [blocks, axis2], f"{name}_within", exclusive=int(exclusive))
        totals = node("ReduceSum", [blocks, const(f"{name}_axes2", np.array([2], dtype=np.int64))], f"{name}_totals",
                      keepdims=1)  # [B, N/block, 1]
        offsets = node("CumSum", [totals, const(f"{name}_axis1", np.array(1, dtype=np.int64))], f"{name}_offsets",
                       exclusive=1)
        flat_sums = node("Reshape", [node("Add", [within, offsets], f"{name}_sums"),
                                     const(f"{name}_shape_bn", np.array([0, -1], dtype=np.int64))], f"{name}_flat")
        return node("Slice", [flat_sums, const(f"{name}_start", np.array([0], dtype=np.int64)),
                              node("Unsqueeze", [n, axis0], f"{name}_end"), axis1], name)

    flat = node("Reshape", ["logits", const("shape_bv", np.array([0, -1], dtype=np.int64))], "logits_bv")
    if logits_type != TensorProto.FLOAT:
        flat = node("Cast", [flat], "logits_f32", to=TensorProto.FLOAT)
    x = node("Div", [flat, column("temperature")], "scaled")
    vocab = node("Gather", [node("Shape", [x], "scaled_shape"), one], "vocab")
    top_k, top_p, k = column("top_k"), column("top_p"), node("Squeeze", ["k"], "k_scalar")
    nodes.append(helper.make_node("TopK", [x, "k"], ["top_values", "_top_ids"], name="top_k_sort",
                                  axis=-1, largest=1, sorted=1))
    in_top_k = node("Less", [arange(k, "positions"), top_k], "in_top_k")
    # Probabilities as numpy's sampler normalizes them: over the row's top-k, or the vocabulary.
    lse_full = node("ReduceLogSumExp", [x, axis1], "lse_full", keepdims=1)
    lse_top_k = node("ReduceLogSumExp", [node("Where", [in_top_k, "top_values", minus_inf], "top_k_values"), axis1],
                     "lse_top_k", keepdims=1)
    has_top_k = node("Less", [top_k, vocab], "has_top_k")
    lse = node("Where", [has_top_k, lse_top_k, lse_full], "lse")
    p_sorted = node("Where", [in_top_k, node("Exp", [node("Sub", ["top_values", lse], "top_shifted")], "top_exp"),
                              zero_f], "p_sorted")
    # Top-p: a candidate is kept while the mass before it is below top_p (top_p 1: all of top-k).
    # (float64 sums, like numpy's sampler: a float32 sum drifts by ~1e-5 over 49k tokens)
    before = cumsum(node("Cast", [p_sorted], "p_sorted_f64", to=TensorProto.DOUBLE), "mass_before", exclusive=True)
    has_top_p = node("Less", [top_p, const("one_d", np.array(1.0, dtype=np.float64))], "has_top_p")
    under_p = node("Or", [node("Not", [has_top_p], "no_top_p"), node("Less", [before, top_p], "before_under_p")],
                   "under_p")
    in_nucleus = node("And", [in_top_k, under_p], "in_nucleus")
    n_kept = node("ReduceSum", [node("Cast", [in_nucleus], "in_nucleus_i", to=TensorProto.INT64), axis1],
                  "n_kept", keepdims=1)
    cut_value = node("GatherElements", ["top_values", node("Sub", [n_kept, one], "last_kept")], "cut_value", axis=1)
    needs_cut = node("Or", [has_top_k, has_top_p], "needs_cut")
    cutoff = node("Where", [needs_cut, cut_value, minus_inf], "cutoff")
    fits = node("Or", [node("Less", [n_kept, k], "stopped_inside"),
                       node("Or", [node("Equal", [k, vocab], "k_is_vocab"),
                                   node("LessOrEqual", [top_k, n_kept], "top_k_reached")], "whole")], "fits")
    node("Squeeze", [node("Or", [node("Not", [needs_cut], "uncut"), fits], "complete_b1"), axis1], "complete")
    # Sample over the vocabulary in token-id order, as numpy's choice walks it.
    kept = node("Where", [node("GreaterOrEqual", [x, cutoff], "kept_mask"),
                          node("Exp", [node("Sub", [x, lse], "shifted")], "p_full"), zero_f], "kept")
    # In float64, as numpy's choice accumulates: float32 sums over 49k tokens drift by ~1e-5.
    cumulative = cumsum(node("Cast", [kept], "kept_f64", to=TensorProto.DOUBLE), "cumulative")
    total = node("ReduceMax", [cumulative, axis1], "total", keepdims=1)
    threshold = node("Mul", [column("uniform"), total], "threshold")
    below = node("Cast", [node("LessOrEqual", [cumulative, threshold], "at_or_below")], "below", to=TensorProto.INT64)
    count = node("ReduceSum", [below, axis1], "count", keepdims=1)
    # Never past the last token with mass (u·total rounding up to total).
    last = node("ReduceMax", [node("Where", [node("Greater", [kept, zero_f], "has_mass"), arange(vocab, "ids"),
                                             zero], "mass_ids"), axis1], "last_with_mass", keepdims=1)
    node("Squeeze", [node("Min", [count, last], "token_b1"), axis1], "token")

    graph = helper.make_graph(
        nodes, "sampler",
        [helper.make_tensor_value_info("logits", logits_type, ["batch", 1, "vocab"]),
         helper.make_tensor_value_info("temperature", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("top_k", TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info("top_p", TensorProto.DOUBLE, ["batch"]),
         helper.make_tensor_value_info("uniform", TensorProto.DOUBLE, ["batch"]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("token", TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info("complete", TensorProto.BOOL, ["batch"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def sampling_inputs(params: list[SamplingParams], uniforms: list[float], vocab: int,
                    candidates: int) -> dict[str, np.ndarray]:
    """Per-row inputs; a greedy row samples its single most likely token (top-k 1). `k` covers
    every row's top-k and at least `candidates` for top-p rows."""
    rows = len(params)
    temperature = np.ones(rows, dtype=np.float32)
    top_k = np.ones(rows, dtype=np.int64)
    top_p = np.ones(rows, dtype=np.float64)
    k = 1
    for row, p in enumerate(params):
        if p.greedy:
            continue
        temperature[row] = p.temperature
        top_k[row] = p.top_k if 0 < p.top_k < vocab else vocab
        top_p[row] = p.top_p if 0.0 < p.top_p < 1.0 else 1.0
        if top_k[row] < vocab:
            k = max(k, int(top_k[row]))
        elif top_p[row] < 1.0:
            k = max(k, candidates)
    return dict(temperature=temperature, top_k=top_k, top_p=top_p,
                uniform=np.asarray(uniforms, dtype=np.float64), k=np.array([min(k, vocab)], dtype=np.int64))


class DeviceSampler:
    """One session of the sampler graph on the model's provider. Top-p rows sort only their
    `candidates` most likely tokens; a row whose nucleus is wider is sampled again over the
    whole vocabulary (the graph says which)."""

    def __init__(self, providers: list, logits_type: int = TensorProto.FLOAT, threads: int = 0,
                 candidates: int = 1024) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(build_sampler_graph(logits_type).SerializeToString(),
                                            sess_options=options, providers=providers)
        self.candidates = candidates
        self.full_vocab_runs = 0  # sampled again with k = V (a nucleus wider than `candidates`)

    def sample(self, logits: ort.OrtValue | np.ndarray, params: list[SamplingParams],
               uniforms: list[float]) -> np.ndarray:
        """Token ids [B] for logits [B, 1, V] (an OrtValue where the model left it, or numpy)."""
        if isinstance(logits, np.ndarray):
            if logits.ndim == 2:
                logits = logits[:, None, :]
            logits = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(logits))
        vocab = int(logits.shape()[-1])
        inputs = sampling_inputs(params, uniforms, vocab, self.candidates)
        tokens, complete = self._run(logits, inputs)
        if not complete.all():
            self.full_vocab_runs += 1
            tokens, _ = self._run(logits, dict(inputs, k=np.array([vocab], dtype=np.int64)))
        return tokens

    def _run(self, logits: ort.OrtValue, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("token", "cpu")
        binding.bind_output("complete", "cpu")
        self.session.run_with_iobinding(binding)
        tokens, complete = binding.copy_outputs_to_cpu()
        return tokens, complete
