"""The router's CPU per streamed SSE chunk on the OpenAI-compatible HTTP API, for each HTTP/1.1
protocol implementation uvicorn can run (`--http-impl httptools`, the default, or `h11`),
in alternating rounds of one run: what an OpenAI SDK client's tokens cost the router.

`--concurrency` clients each stream `--per-client` completions of `--max-tokens` tokens
(`ignore_eos`) through one router and one tiny-model replica; the router's CPU time comes from
/proc/PID/stat around each round. The client (httpx) is the slower side on a small machine,
so chunks/s says little; the router's µs per chunk is the figure.

    .venv/bin/python bench/http_router_cost.py [--impls httptools h11] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "libs"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from stack_overhead import MODEL  # noqa: E402

from switchyard.model.tiny import build_tiny_model  # noqa: E402
from switchyard.runtime.children import cpu_seconds  # noqa: E402
from switchyard.runtime.stack import LocalStack, StackSpec  # noqa: E402

console = Console()


async def stream_completions(url: str, args: argparse.Namespace) -> int:
    """Chunks received by `args.concurrency` clients streaming `args.per_client` completions each."""
    chunks = 0
    body = {"model": MODEL, "prompt": "hello", "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=args.concurrency)) as client:
        async def one() -> None:
            nonlocal chunks
            for _ in range(args.per_client):
                async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        chunks += line.startswith("data: {")
        await asyncio.gather(*(one() for _ in range(args.concurrency)))
    return chunks


def measure(models: Path, impl: str, args: argparse.Namespace) -> tuple[float, float]:
    """(router CPU µs per chunk, chunks/s) for one round on a fresh stack."""
    spec = StackSpec(models_dir=models, replicas={MODEL: 1}, max_batch_size=max(64, args.concurrency),
                     worker_threads=1, log_dir=Path(tempfile.mkdtemp(prefix="bench-http-")),
                     router_args=("--http-impl", impl), batcher_args=("--token-budget", "65536"))
    with LocalStack(spec) as stack:
        assert stack.router is not None
        pid = stack.router.process.pid
        warm = argparse.Namespace(**{**vars(args), "per_client": 1})
        asyncio.run(stream_completions(stack.http_url, warm))
        before, start = cpu_seconds(pid), time.monotonic()
        chunks = asyncio.run(stream_completions(stack.http_url, args))
        wall, cpu = time.monotonic() - start, cpu_seconds(pid) - before
    return 1e6 * cpu / chunks, chunks / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", nargs="+", default=["httptools", "h11"])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per implementation")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--per-client", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    models = Path(tempfile.mkdtemp(prefix="bench-models-"))
    build_tiny_model(models, name=MODEL)
    results: dict[str, list[tuple[float, float]]] = {impl: [] for impl in args.impls}
    for round_ in range(args.rounds):
        for impl in args.impls:
            results[impl].append(measure(models, impl, args))
            console.log(f"round {round_ + 1} {impl}: {results[impl][-1][0]:.1f} µs/chunk, {results[impl][-1][1]:,.0f} chunks/s")
    base = statistics.median(us for us, _ in results[args.impls[0]])
    table = Table(title=f"Router CPU per SSE chunk, {args.concurrency} streams × {args.per_client} × {args.max_tokens} tokens")
    for column in ("--http-impl", "router µs/chunk (each round)", "median", f"vs {args.impls[0]}", "chunks/s (median)"):
        table.add_column(column, justify="right")
    for impl, rows in results.items():
        median = statistics.median(us for us, _ in rows)
        table.add_row(impl, ", ".join(f"{us:.1f}" for us, _ in rows), f"{median:.1f}", f"{median / base:.2f}×",
                      f"{statistics.median(r for _, r in rows):,.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
