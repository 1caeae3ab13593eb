"""What tracing costs: the stack with tracing off vs on (every span exported), same run,
plus the per-request cost of the instrumentation calls when tracing is off.

    .venv/bin/python bench/tracing_overhead.py [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from stack_overhead import MODEL, through_stack  # noqa: E402

from services.router.observe import RequestObserver  # noqa: E402
from switchyard.model.tiny import build_tiny_model  # noqa: E402
from switchyard.runtime.stack import LocalStack, StackSpec  # noqa: E402

console = Console()


def instrumentation_cost_off(n: int = 20000) -> float:
    """Seconds per request of the router's observation calls with no tracer provider."""
    observer = RequestObserver(writer=None)
    t0 = time.perf_counter()
    for i in range(n):
        obs = observer.begin(MODEL, "bench", "grpc", "r")
        span = observer.prepare_span(obs)
        assert span is None and obs.context() is None
        for _ in range(8):
            obs.on_tokens(1)
        obs.finish(code="OK", replica_id="x", prompt_tokens=4)
    return (time.perf_counter() - t0) / n


def run_stack(models: Path, env: dict[str, str], requests: int, concurrency: int, progress: Progress,
              label: str) -> tuple[list[float], float]:
    spec = StackSpec(models_dir=models, replicas={MODEL: 1}, worker_threads=1, extra_env=env,
                     log_dir=Path(tempfile.mkdtemp(prefix="bench-trace-")))
    with LocalStack(spec) as stack:
        asyncio.run(through_stack(stack.router_address, "tracing overhead probe", 1, 5, 4, progress, "warm-up"))
        return asyncio.run(through_stack(stack.router_address, "tracing overhead probe", concurrency, requests, 32,
                                         progress, label))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    models = Path(tempfile.mkdtemp(prefix="bench-models-"))
    build_tiny_model(models, name=MODEL)
    per_request = instrumentation_cost_off()
    spans = Path(tempfile.mkdtemp(prefix="bench-spans-")) / "spans.jsonl"
    rows = []
    with Progress(console=console, transient=True) as progress:
        for c in (1, 8):
            off = run_stack(models, {}, args.requests, c, progress, f"tracing off c={c}")
            on = run_stack(models, {"SWITCHYARD_SPANS_FILE": str(spans)}, args.requests, c, progress,
                           f"tracing on c={c}")
            rows.append((c, off, on))
    table = Table(title="Tracing off vs on (tiny model through the stack, 32 tokens/request)")
    for col in ("concurrency", "off TTFT p50/p99 ms", "on TTFT p50/p99 ms", "off tok/s", "on tok/s", "on/off tok/s"):
        table.add_column(col, justify="right")
    for c, (off_t, off_tps), (on_t, on_tps) in rows:
        table.add_row(str(c), f"{np.percentile(off_t, 50)*1e3:.2f} / {np.percentile(off_t, 99)*1e3:.2f}",
                      f"{np.percentile(on_t, 50)*1e3:.2f} / {np.percentile(on_t, 99)*1e3:.2f}",
                      f"{off_tps:,.0f}", f"{on_tps:,.0f}", f"{on_tps / off_tps:.2f}×")
    console.print(table)
    ttft_off = np.percentile(rows[0][1][0], 50)
    console.print(f"router instrumentation with tracing off: {per_request*1e6:.1f} µs per request "
                  f"({per_request / ttft_off:.2%} of the c=1 TTFT p50 of {ttft_off*1e3:.2f} ms)")


if __name__ == "__main__":
    main()
