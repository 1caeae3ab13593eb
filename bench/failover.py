"""Mid-stream failover under a kill -9: N concurrent streams over two replicas, one worker
killed once every stream has tokens. The same requests (greedy and seeded sampling) run
undisturbed first, in the same run, as the reference.

Reports the completed fraction, output identity with the undisturbed run, how many streams
failed over (router records), their stall (longest gap between two token chunks) and their
extra end-to-end latency against their own undisturbed run.

    .venv/bin/python bench/failover.py                       # 200 streams, int4 model
    .venv/bin/python bench/failover.py --model tiny-llama    # builds the tiny model if needed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from switchyard.runtime.stack import LocalStack, StackSpec
from switchyard.v1 import generate_pb2, generate_pb2_grpc

console = Console(width=160)


@dataclass
class Stream:
    tokens: list[int]
    ok: bool
    error: str
    e2e_s: float
    max_gap_s: float
    replica: str


def make_requests(model: str, n: int, max_tokens: int, vocab: int) -> list[generate_pb2.GenerateRequest]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        sampling = generate_pb2.SamplingParams(temperature=0.8, top_k=50, seed=1000 + i) if i % 2 else \
            generate_pb2.SamplingParams()
        out.append(generate_pb2.GenerateRequest(
            request_id=f"failover-bench-{i}", model=model, token_ids=generate_pb2.TokenIds(ids=rng.integers(100, vocab - 1, size=24).tolist()),
            max_tokens=max_tokens, sampling=sampling, stop=generate_pb2.StopConditions(ignore_eos=True)))
    return out


async def run_all(address: str, reqs: list[generate_pb2.GenerateRequest], min_tokens: int = 0,
                  on_started: "asyncio.Event | None" = None) -> list[Stream]:
    progress = [0] * len(reqs)

    async def one(i: int, stub: generate_pb2_grpc.GenerationStub) -> Stream:
        tokens: list[int] = []
        t0 = last = time.perf_counter()
        gap = 0.0
        try:
            async for event in stub.Generate(reqs[i], timeout=600):
                now = time.perf_counter()
                if event.HasField("tokens"):
                    if tokens:
                        gap = max(gap, now - last)
                    last = now
                    tokens += event.tokens.token_ids
                    progress[i] = len(tokens)
                    if on_started is not None and min(progress) >= min_tokens:
                        on_started.set()
                elif event.HasField("final"):
                    return Stream(tokens, True, "", now - t0, gap, event.final.replica_id)
                else:
                    return Stream(tokens, False, event.error.message, now - t0, gap, "")
        except grpc.aio.AioRpcError as exc:
            return Stream(tokens, False, f"{exc.code().name}: {exc.details()}", time.perf_counter() - t0, gap, "")
        return Stream(tokens, False, "no final event", time.perf_counter() - t0, gap, "")

    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        return await asyncio.gather(*(one(i, stub) for i in range(len(reqs))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default="smollm2-135m-instruct-int4")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--stall-timeout-s", type=float, default=1.0)
    args = parser.parse_args()
    if args.model == "tiny-llama" and not (args.models_dir / args.model).exists():
        from switchyard.model.tiny import build_tiny_model
        build_tiny_model(args.models_dir, name=args.model)
    from switchyard.model.config import ModelManifest
    vocab = ModelManifest.load(args.models_dir / args.model).config.vocab_size
    reqs = make_requests(args.model, args.streams, args.max_tokens, vocab)
    records = Path(tempfile.mkdtemp(prefix="bench-failover-records-"))
    spec = StackSpec(models_dir=args.models_dir, replicas={args.model: 2}, http_port=-1, metrics=False,
                     max_batch_size=args.max_batch, records_dir=records,
                     router_args=("--stall-timeout-s", str(args.stall_timeout_s)),
                     log_dir=Path(tempfile.mkdtemp(prefix="bench-failover-logs-")))
    with LocalStack(spec) as stack:
        console.print(f"undisturbed run: {args.streams} streams × {args.max_tokens} tokens …")
        reference = asyncio.run(run_all(stack.router_address, reqs))
        # The noise floor: batched decode is not bit-stable across batch compositions (other
        # GEMM shapes), so near-ties can flip even with no failure at all. Measured, not assumed.
        again = asyncio.run(run_all(stack.router_address, reqs))
        console.print("disturbed run: kill -9 one worker once every stream has 4 tokens …")
        lines_before = len((records / "requests.jsonl").read_text().splitlines())

        async def disturbed() -> list[Stream]:
            started = asyncio.Event()
            task = asyncio.create_task(run_all(stack.router_address, reqs, 4, started))
            await asyncio.wait_for(started.wait(), 600)
            os.kill(stack.workers[0].process.pid, signal.SIGKILL)
            return await task
        t0 = time.perf_counter()
        results = asyncio.run(disturbed())
        wall = time.perf_counter() - t0
    time.sleep(0.5)
    rows = [json.loads(x) for x in (records / "requests.jsonl").read_text().splitlines()[lines_before:]]
    failed_over_ids = {r["request_id"] for r in rows if r.get("failovers")}
    # (the undisturbed runs used the same request ids: only the disturbed run's records count)
    completed = sum(r.ok for r in results)
    identical = sum(r.ok and r.tokens == ref.tokens for r, ref in zip(results, reference))
    baseline = sum(r.ok and r.tokens == ref.tokens for r, ref in zip(again, reference))

    moved = [(r, ref) for req, r, ref in zip(reqs, results, reference) if r.ok and req.request_id in failed_over_ids]
    stalls = [r.max_gap_s for r, _ in moved]
    extra = [r.e2e_s - ref.e2e_s for r, ref in moved]
    table = Table(title=f"Failover: {args.streams} streams × {args.max_tokens} tokens, 2 replicas of {args.model}, "
                        f"one worker killed (kill -9) mid-run ({platform.node()}, {os.cpu_count()} cores)")
    for col in ("completed", "identical to undisturbed", "undisturbed run vs itself", "failed over (records)",
                "stall p50 / p99 / max s",
                "extra e2e p50 / p99 s", "disturbed run wall s"):
        table.add_column(col, justify="right")
    pct = (lambda v, q: float(np.percentile(v, q)) if v else float("nan"))
    table.add_row(f"{completed}/{len(results)} ({completed / len(results):.0%})",
                  f"{identical}/{len(results)} ({identical / len(results):.0%})",
                  f"{baseline}/{len(results)} ({baseline / len(results):.0%})", str(len(failed_over_ids)),
                  f"{pct(stalls, 50):.2f} / {pct(stalls, 99):.2f} / {max(stalls, default=float('nan')):.2f}",
                  f"{pct(extra, 50):.2f} / {pct(extra, 99):.2f}", f"{wall:.1f}")
    console.print(table)
    errors = [r.error for r in results if not r.ok]
    if errors:
        console.print(f"[red]errors:[/red] {errors[:5]}")
    return 0 if completed == len(results) and identical >= baseline else 1


if __name__ == "__main__":
    sys.exit(main())
