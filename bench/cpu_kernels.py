"""The CPU kernels behind the int4 model's decode step, measured alone in one run, and the sizes
of the plain and fused graphs (docs/benchmarks.md, "Fused graph and KV pool on the CPU").

    .venv/bin/python bench/cpu_kernels.py [--threads 2] [--models-dir models]

1. MatMulNBits on SmolLM2's gate/up shape (K = 576 → N = 1536, 4-bit, block 32, integer zero
   points as our Q4_1 carry-over writes them) at accuracy level 0 (float32 compute: exact) and 4
   (int8 activations), for one token (decode) and 128 tokens (prefill); and level 0 with float zero
   points (the exact Q4_1 alternative to the offset terms). Ratios against level 0.
2. The lm_head (576 → 49,152): the float32 Gemm the exact model uses against MatMulNBits with
   8-bit weights at level 4 (int8 activations) and at level 0.
3. Node counts of the plain and fused graphs of the model folders found (built by `make model`;
   the plain ones by `bench/model_throughput.py --plain` in .cache/plain-models).

Random weights of the real shapes; times are the best of 3 repeats of many calls.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
K, N, HEAD_N, BLOCK = 576, 1536, 49152, 32


def session(node: onnx.NodeProto, inits: list[onnx.TensorProto], k: int, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph([node], "kernel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the stack runs the worker
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def nbits(k: int, n: int, bits: int, level: int, zero_points: str, threads: int,
          rng: np.random.Generator) -> ort.InferenceSession:
    kb = k // BLOCK
    per_block = BLOCK * bits // 8
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, kb, per_block), dtype=np.uint8), "w"),
             numpy_helper.from_array(rng.uniform(0.01, 0.02, n * kb).astype(np.float32), "s")]
    if zero_points == "uint8":
        per_byte = 8 // bits
        inits.append(numpy_helper.from_array(rng.integers(0, 256, n * -(-kb // per_byte), dtype=np.uint8), "z"))
    elif zero_points == "float":
        inits.append(numpy_helper.from_array(rng.uniform(0, 2 ** bits - 1, n * kb).astype(np.float32), "z"))
    node = helper.make_node("MatMulNBits", ["x", "w", "s"] + (["z"] if zero_points != "none" else []), ["y"],
                            domain="com.microsoft", K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=level)
    return session(node, inits, k, threads)


def gemm(k: int, n: int, threads: int, rng: np.random.Generator) -> ort.InferenceSession:
    weight = numpy_helper.from_array(rng.standard_normal((n, k)).astype(np.float32), "w")
    return session(helper.make_node("Gemm", ["x", "w"], ["y"], transB=1), [weight], k, threads)


def best_us(sess: ort.InferenceSession, x: np.ndarray, calls: int) -> float:
    for _ in range(3):
        sess.run(None, {"x": x})
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            sess.run(None, {"x": x})
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def node_counts(models_dir: Path) -> list[tuple[str, str, int]]:
    from switchyard.model.config import FP16_MODEL_FILE, MODEL_FILE
    from switchyard.model.convert import MODEL_NAMES

    rows = []
    for variant in ("int4", "fp32"):
        for label, folder in (("served", models_dir / MODEL_NAMES[variant]),
                              ("plain", REPO / ".cache" / "plain-models" / MODEL_NAMES[variant])):
            for file in (MODEL_FILE, FP16_MODEL_FILE):
                path = folder / file
                if path.is_file():
                    graph = onnx.load(str(path), load_external_data=False).graph
                    rows.append((variant, f"{label} {file}", len(graph.node)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    args = ap.parse_args()
    console = Console()
    rng = np.random.default_rng(0)

    table = Table(title=f"MatMulNBits {K}→{N}, 4-bit, block {BLOCK}, {args.threads} threads")
    for col in ("kernel", "1 token µs", "× level 0", "128 tokens µs", "× level 0"):
        table.add_column(col)
    cases = [("level 0, uint8 zero points (exact, served)", 4, 0, "uint8"),
             ("level 4, uint8 zero points (int8 activations)", 4, 4, "uint8"),
             ("level 0, float zero points (exact Q4_1, no offset terms)", 4, 0, "float"),
             ("level 0, no zero points", 4, 0, "none")]
    base: dict[int, float] = {}
    for name, bits, level, zp in cases:
        sess = nbits(K, N, bits, level, zp, args.threads, rng)
        row = [name]
        for m, calls in ((1, 300), (128, 20)):
            us = best_us(sess, rng.standard_normal((m, K)).astype(np.float32), calls)
            base.setdefault(m, us)
            row += [f"{us:,.0f}", f"{us / base[m]:.2f}×"]
        table.add_row(*row)
    console.print(table)

    head = Table(title=f"lm_head {K}→{HEAD_N}, one token, {args.threads} threads")
    for col in ("kernel", "ms", "× float32 Gemm", "weight bytes"):
        head.add_column(col)
    x = rng.standard_normal((1, K)).astype(np.float32)
    gemm_ms = best_us(gemm(K, HEAD_N, args.threads, rng), x, 20) / 1000
    head.add_row("float32 Gemm (exact, served)", f"{gemm_ms:.2f}", "1.00×", f"{K * HEAD_N * 4 / 1e6:.0f} MB")
    for level, calls in ((4, 50), (0, 3)):
        ms = best_us(nbits(K, HEAD_N, 8, level, "none", args.threads, rng), x, calls) / 1000
        head.add_row(f"MatMulNBits 8-bit, level {level}", f"{ms:.2f}", f"{ms / gemm_ms:.2f}×",
                     f"{K * HEAD_N * (1 + 4 / BLOCK) / 1e6:.0f} MB")
    console.print(head)

    counts = node_counts(args.models_dir)
    if counts:
        nodes = Table(title="graph nodes")
        for col in ("variant", "graph", "nodes"):
            nodes.add_column(col)
        for variant, label, n in counts:
            nodes.add_row(variant, label, f"{n:,}")
        console.print(nodes)


if __name__ == "__main__":
    main()
