"""Stack overhead: the tiny model (or `--model`, a real one) through router → NATS → batcher
→ worker vs the same model called in-process, measured in one run.

Reports added time to first token (p50/p99) at concurrency 1 and 32, and the tokens/s the
stack carries next to the in-process engine's own rate; with several `--pipeline-depth`
values, one stack per depth, side by side.

    .venv/bin/python bench/stack_overhead.py [--requests 200] [--max-tokens 64] [--pipeline-depth 1 2]
        [--placement separate colocated]
    .venv/bin/python bench/stack_overhead.py --model models/smollm2-135m-instruct-int4 \
        --concurrency 1 8 --requests 16 --pipeline-depth 1 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from services.worker.engine import Engine
from services.worker.sampling import SamplingParams
from switchyard.model.tiny import build_tiny_model
from switchyard.runtime.stack import LocalStack, StackSpec
from switchyard.v1 import generate_pb2, generate_pb2_grpc

console = Console()
MODEL = "tiny-llama"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def inprocess(engine: Engine, prompt: list[int], concurrency: int, rounds: int, max_tokens: int) -> tuple[list[float], float]:
    """TTFTs and tokens/s of the engine driven directly (same scheduling as the batcher:
    prefill joins, then batched decode steps)."""
    ttfts: list[float] = []
    tokens = 0
    t_all = time.perf_counter()
    for r in range(rounds):
        ids = [f"r{r}-{i}" for i in range(concurrency)]
        start = time.perf_counter()
        for sid in ids:
            engine.add(sid, prompt, SamplingParams(), 0)
        result = engine.step([(sid, 0) for sid in ids], decode=False)
        now = time.perf_counter()
        ttfts += [now - start] * len(result.tokens)
        produced = {sid: 1 for sid in ids}
        while min(produced.values()) < max_tokens:
            result = engine.step([], decode=True)
            for sid, _, _ in result.tokens:
                produced[sid] += 1
        tokens += sum(produced.values())
        engine.remove(ids)
    return ttfts, tokens / (time.perf_counter() - t_all)


def separate_channels(address: str, n: int) -> list[grpc.aio.Channel]:
    """n channels to one address on n connections of their own (a local subchannel pool each:
    channels would otherwise share one connection, and so reach one router of several)."""
    return [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(max(1, n))]


async def through_stack(address: str, prompt: str, concurrency: int, requests: int, max_tokens: int,
                        progress: Progress, label: str, model: str = MODEL,
                        connections: int = 1) -> tuple[list[float], float]:
    """`concurrency` clients, each sending its share of `requests` one after another, over
    `connections` connections (several routers on one port: the kernel spreads connections)."""
    task = progress.add_task(label, total=requests)
    ttfts: list[float] = []
    tokens = 0
    per_worker = requests // concurrency
    channels = separate_channels(address, connections)
    try:
        req = generate_pb2.GenerateRequest(model=model, text=prompt, max_tokens=max_tokens,
                                           stop=generate_pb2.StopConditions(ignore_eos=True))

        async def client(i: int) -> None:
            nonlocal tokens
            stub = generate_pb2_grpc.GenerationStub(channels[i % len(channels)])
            for _ in range(per_worker):
                start = time.perf_counter()
                first = None
                async for event in stub.Generate(req):
                    if event.HasField("tokens"):
                        first = first or time.perf_counter()
                        tokens += len(event.tokens.token_ids)
                assert first is not None
                ttfts.append(first - start)
                progress.advance(task)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        return ttfts, tokens / (time.perf_counter() - t0)
    finally:
        for channel in channels:
            await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=192, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--decode-steps", type=int, default=1,
                        help="batcher decode steps per worker call at batch ≥ 8 (multi-step decode)")
    parser.add_argument("--pipeline-depth", type=int, nargs="+", default=[2],
                        help="batcher steps in flight; several values run one stack each, side by side")
    parser.add_argument("--placement", nargs="+", default=["separate"], choices=["separate", "colocated"],
                        help="batcher and worker as two processes over gRPC (separate), or the engine inside "
                             "the batcher's process (colocated, `--worker local`); several run side by side")
    parser.add_argument("--model", type=Path, help="a model folder to serve instead of the tiny model")
    args = parser.parse_args()
    if args.model:
        models, model = args.model.resolve().parent, args.model.name
    else:
        models, model = Path(tempfile.mkdtemp(prefix="bench-models-")), MODEL
        build_tiny_model(models, name=MODEL)
    prompt = "serving large language models at scale " * 4
    engine = Engine(models / model, max_sequences=64, threads=1)
    prompt_ids = engine_prompt(models / model, prompt)
    rows = []
    base: dict[int, tuple[list[float], float]] = {}
    inprocess(engine, prompt_ids, 1, 3, 4)  # warm-up
    for c in args.concurrency:
        base[c] = inprocess(engine, prompt_ids, c, max(args.requests // c, 1), args.max_tokens)
    configs = [(placement, depth) for placement in args.placement for depth in args.pipeline_depth]
    for placement, depth in configs:
        spec = StackSpec(models_dir=models, replicas={model: 1}, max_batch_size=64, worker_threads=1,
                         log_dir=Path(tempfile.mkdtemp(prefix="bench-logs-")), colocate=placement == "colocated",
                         batcher_args=("--decode-steps", str(args.decode_steps), "--pipeline-depth", str(depth)))
        with LocalStack(spec) as stack, Progress(console=console, transient=True) as progress:
            asyncio.run(through_stack(stack.router_address, prompt, 1, 5, 4, progress, "warm-up", model))
            for c in args.concurrency:
                ttft, tps = asyncio.run(through_stack(stack.router_address, prompt, c, args.requests, args.max_tokens,
                                                      progress, f"{placement} depth {depth} c={c}", model))
                rows.append((placement, depth, c, *base[c][:1], ttft, base[c][1], tps))
    table = Table(title=f"Stack overhead, {model}, {args.max_tokens} tokens/request, decode steps "
                        f"{args.decode_steps} ({platform.node()}, {os.cpu_count()} cores)")
    for col in ("placement", "pipeline depth", "concurrency", "in-process TTFT p50/p99 ms", "stack TTFT p50/p99 ms",
                "added TTFT p50 ms", "added TTFT p99 ms", "in-process tok/s", "stack tok/s", "stack/in-process",
                f"stack vs {configs[0][0]} depth {configs[0][1]}"):
        table.add_column(col, justify="right")
    first = {c: tps for placement, depth, c, *_, tps in rows if (placement, depth) == configs[0]}
    for placement, depth, c, base_ttft, ttft, base_tps, tps in rows:
        table.add_row(placement, str(depth), str(c), f"{pct(base_ttft, 50)*1e3:.2f} / {pct(base_ttft, 99)*1e3:.2f}",
                      f"{pct(ttft, 50)*1e3:.2f} / {pct(ttft, 99)*1e3:.2f}",
                      f"{(pct(ttft, 50) - pct(base_ttft, 50))*1e3:.2f}",
                      f"{(pct(ttft, 99) - pct(base_ttft, 99))*1e3:.2f}",
                      f"{base_tps:,.0f}", f"{tps:,.0f}", f"{tps / base_tps:.2f}×", f"{tps / first[c]:.2f}×")
    console.print(table)


def engine_prompt(folder: Path, prompt: str) -> list[int]:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(prompt, add_special_tokens=False).ids


if __name__ == "__main__":
    sys.exit(main())
