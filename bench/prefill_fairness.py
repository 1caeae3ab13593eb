"""Chunked prefill vs inter-token latency: one stream decodes while long prompts arrive; how
long does the running stream stall? Same run, two batcher settings: newcomer prompts fed in
512-token chunks vs 128-token chunks while others decode (`--prefill-chunk-decoding`).

    .venv/bin/python bench/prefill_fairness.py [--model smollm2-135m-instruct-int4]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from switchyard.runtime.stack import LocalStack, StackSpec
from switchyard.v1 import generate_pb2, generate_pb2_grpc

console = Console()
LONG_PROMPT = ("Serving large language models means batching many requests on few accelerators, "
               "streaming tokens back as they are produced, and keeping tail latency low. ") * 18


def measure(models_dir: Path, model: str, chunk_decoding: int, arrivals: int) -> tuple[list[float], list[float]]:
    """Inter-token gaps of the running stream, and the newcomers' TTFTs."""
    spec = StackSpec(models_dir=models_dir, replicas={model: 1}, log_dir=Path(tempfile.mkdtemp(prefix="bench-pf-")),
                     batcher_args=("--prefill-chunk-decoding", str(chunk_decoding)))
    gaps: list[float] = []
    ttfts: list[float] = []
    with LocalStack(spec) as stack, grpc.insecure_channel(stack.router_address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        running = generate_pb2.GenerateRequest(model=model, text="Tell me a long story.", max_tokens=220,
                                               stop=generate_pb2.StopConditions(ignore_eos=True))
        started = threading.Event()

        def newcomers() -> None:
            started.wait()
            time.sleep(1.0)
            for _ in range(arrivals):
                t0 = time.perf_counter()
                for event in stub.Generate(generate_pb2.GenerateRequest(model=model, text=LONG_PROMPT, max_tokens=1)):
                    if event.HasField("tokens"):
                        ttfts.append(time.perf_counter() - t0)
                time.sleep(0.7)

        thread = threading.Thread(target=newcomers)
        thread.start()
        last = None
        for event in stub.Generate(running):
            if event.HasField("tokens"):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                started.set()
        thread.join()
    return gaps, ttfts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct-int4")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--arrivals", type=int, default=5)
    args = parser.parse_args()
    table = Table(title=f"{args.model}: running stream's inter-token gaps while {args.arrivals} "
                        f"long prompts arrive (~{len(LONG_PROMPT.split())} words each)")
    for col in ("prefill tokens per step while decoding", "ITL p50 ms", "ITL p99 ms", "ITL max ms",
                "newcomer TTFT p50 ms"):
        table.add_column(col, justify="right")
    for chunk in (512, 128):
        with console.status(f"chunk {chunk}…"):
            gaps, ttfts = measure(args.models_dir, args.model, chunk, args.arrivals)
        g = np.asarray(gaps) * 1e3
        table.add_row(str(chunk), f"{np.percentile(g, 50):.0f}", f"{np.percentile(g, 99):.0f}", f"{g.max():.0f}",
                      f"{np.median(ttfts) * 1e3:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
