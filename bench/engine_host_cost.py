"""The engine's own Python per decode step at a large batch (issue 13 §5): what a step costs
beside its ONNX Runtime call.

On a GPU a decode step of 256 rows replays from a CUDA graph in ~2 ms (H200), and everything the
engine does around the call — the rows' inputs, the sampled or argmax ids back into each
sequence, the step's token list — holds the GIL that a co-located batcher's event loop needs.
This times `Engine.step(decode=True)` for `--rows` greedy rows and splits it into the time
inside ONNX Runtime's run call and the rest. The CUDA-graph decode path runs on the CPU provider
here (the graph id is ignored there, the Python is the same), next to the eager path.

    .venv/bin/python bench/engine_host_cost.py --model models/smollm2-135m-instruct-int4 [--rows 256]

The tiny test model (`tests/conftest.py` build_tiny_model) keeps the ONNX Runtime part small.
Compare commits by running it at each, side by side on one machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "libs"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def measure(model: Path, rows: int, steps: int, graph_path: bool) -> dict[str, float]:
    from services.worker.engine import Engine
    from services.worker.fused_batch import FusedBatch
    from services.worker.sampling import SamplingParams
    engine = Engine(model, max_sequences=rows, threads=1)
    if graph_path:
        if engine.graph != "fused":
            raise SystemExit(f"{model.name}: the CUDA-graph path needs a fused graph")
        c = engine.config
        engine.batch = FusedBatch(engine.session, ["CPUExecutionProvider"], "cpu", c.num_hidden_layers,
                                  c.num_key_value_heads, c.head_dim, max_rows=rows,
                                  max_length=engine.context_length, cuda_graph=True)
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(rows)]
    for sid in ids:
        engine.add(sid, rng.integers(3, engine.config.vocab_size, 32).tolist(), SamplingParams(), 0)
    engine.step([(sid, 0) for sid in ids], decode=False)
    session: Any = engine.session
    run = session.run_with_iobinding
    inside = [0.0]

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - t

    session.run_with_iobinding = timed
    for _ in range(3):
        engine.step([], decode=True)
    inside[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step([], decode=True)
    total = time.perf_counter() - t0
    return {"step_ms": 1e3 * total / steps, "ort_ms": 1e3 * inside[0] / steps,
            "python_ms": 1e3 * (total - inside[0]) / steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m-instruct-int4")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    table = Table(title=f"engine decode step, {args.rows} greedy rows, {args.steps} steps, {args.model.name}")
    for column in ("path", "step ms", "in ONNX Runtime ms", "the engine's Python ms", "µs per row"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, graph_path in (("eager", False), ("CUDA-graph path (on the CPU provider)", True)):
        r = measure(args.model, args.rows, args.steps, graph_path)
        table.add_row(name, f"{r['step_ms']:.3f}", f"{r['ort_ms']:.3f}", f"{r['python_ms']:.3f}",
                      f"{1e3 * r['python_ms'] / args.rows:.2f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
