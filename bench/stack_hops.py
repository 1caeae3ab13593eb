"""Where a request's time goes, hop by hop, from the stack's own OpenTelemetry spans.

The stack (tiny model, one replica) runs with `SWITCHYARD_SPANS_FILE`: every service writes
its spans as JSON lines. `--requests` requests at concurrency 1 (`--max-tokens` each), then
per span name: its p50/p99 duration and the p50 of where it starts and ends, in ms from the
start of the trace's root span (`router.request`). The client's own time to first token is
printed beside them: what the spans do not cover is the client → router and router → client
hops.

    .venv/bin/python bench/stack_hops.py [--requests 100] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from stack_overhead import MODEL, through_stack  # noqa: E402

from switchyard.model.tiny import build_tiny_model  # noqa: E402
from switchyard.runtime.stack import LocalStack, StackSpec  # noqa: E402

console = Console()


def hop_table(spans: list[dict[str, object]]) -> list[tuple[str, int, float, float, float, float]]:
    """(service/span, count, p50 ms, p99 ms, start p50 ms, end p50 ms) per span name, ordered
    by where the span starts; offsets from the earliest span of its trace."""
    traces: dict[str, list[dict[str, object]]] = defaultdict(list)
    for span in spans:
        traces[str(span["trace_id"])].append(span)
    rows: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for members in traces.values():
        t0 = min(float(s["start_unix_s"]) for s in members)  # type: ignore[arg-type]
        for s in members:
            start, end = float(s["start_unix_s"]), float(s["end_unix_s"])  # type: ignore[arg-type]
            rows[f"{s['service']}/{s['name']}"].append((1e3 * (end - start), 1e3 * (start - t0), 1e3 * (end - t0)))
    out = []
    for name, values in rows.items():
        durations = np.array([d for d, _, _ in values])
        out.append((name, len(values), float(np.percentile(durations, 50)), float(np.percentile(durations, 99)),
                    statistics.median(s for _, s, _ in values), statistics.median(e for _, _, e in values)))
    return sorted(out, key=lambda row: (row[4], -row[5]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    models = Path(tempfile.mkdtemp(prefix="bench-models-"))
    build_tiny_model(models, name=MODEL)
    spans_file = Path(tempfile.mkdtemp(prefix="bench-spans-")) / "spans.jsonl"
    spec = StackSpec(models_dir=models, replicas={MODEL: 1}, worker_threads=1,
                     log_dir=Path(tempfile.mkdtemp(prefix="bench-logs-")), extra_env={"SWITCHYARD_SPANS_FILE": str(spans_file)})
    with LocalStack(spec) as stack, Progress(transient=True) as progress:
        asyncio.run(through_stack(stack.router_address, "hops", 1, 10, args.max_tokens, progress, "warm-up"))
        time.sleep(2)  # the warm-up's spans are exported in batches: let them land before the mark
        started_unix = time.time()
        ttfts, _ = asyncio.run(through_stack(stack.router_address, "hops", 1, args.requests, args.max_tokens,
                                             progress, "requests"))
        time.sleep(6)  # the batch span processors export every few seconds
    spans = [json.loads(line) for line in spans_file.read_text().splitlines() if line.strip()]
    measured = {s["trace_id"] for s in spans if s["name"] == "router.request" and s["start_unix_s"] >= started_unix}
    table = Table(title=f"Per-hop spans, concurrency 1, {len(measured)} requests of {args.max_tokens} tokens "
                        f"(client TTFT p50 {1e3 * statistics.median(ttfts):.2f} ms)")
    for column in ("service/span", "n", "p50 ms", "p99 ms", "starts at (p50 ms)", "ends at (p50 ms)"):
        table.add_column(column, justify="right" if column != "service/span" else "left")
    for name, n, p50, p99, start, end in hop_table([s for s in spans if s["trace_id"] in measured]):
        table.add_row(name, str(n), f"{p50:.3f}", f"{p99:.3f}", f"{start:.3f}", f"{end:.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
