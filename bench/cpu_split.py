"""CPU time per process of the stack (client, routers, batcher, worker, nats-server) under a
concurrent load, from /proc/PID/stat: which process the tokens cost, as a share of a core and
as microseconds of CPU per token — the figure that says how many tokens/s one process of each
kind can carry on a machine with cores to spare (one Python router forwards every token of
its streams). Several `--routers` values run one stack each, side by side.

    .venv/bin/python bench/cpu_split.py [--decode-steps 1] [--concurrency 32] [--routers 1 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from stack_overhead import MODEL, through_stack  # noqa: E402

from switchyard.model.tiny import build_tiny_model  # noqa: E402
from switchyard.runtime.children import cpu_seconds  # noqa: E402
from switchyard.runtime.stack import LocalStack, StackSpec  # noqa: E402


def measure(models: Path, routers: int, args: argparse.Namespace, progress: Progress) -> tuple[float, dict[str, tuple[float, float]]]:
    """tokens/s and, per kind of process, (share of one core, CPU µs per token)."""
    spec = StackSpec(models_dir=models, replicas={MODEL: 1}, max_batch_size=max(64, args.concurrency),
                     worker_threads=1, log_dir=Path(tempfile.mkdtemp(prefix="bench-logs-")), routers=routers,
                     batcher_args=("--decode-steps", str(args.decode_steps), "--token-budget", "65536"))
    with LocalStack(spec) as stack:
        assert stack.nats is not None and stack.nats.process is not None
        pids = {"bench client": [os.getpid()], "router": [r.process.pid for r in stack.routers],
                "batcher": [stack.batchers[0].process.pid], "worker": [stack.workers[0].process.pid],
                "nats-server": [stack.nats.process.pid]}
        connections = max(1, args.connections)
        asyncio.run(through_stack(stack.router_address, "cpu split", 4, 16, 8, progress, "warm-up",
                                  connections=connections))
        before = {name: sum(map(cpu_seconds, ps)) for name, ps in pids.items()}
        start = time.monotonic()
        _, tokens_per_s = asyncio.run(through_stack(stack.router_address, "cpu split", args.concurrency,
                                                    args.requests, args.max_tokens, progress,
                                                    f"{routers} router(s)", connections=connections))
        wall = time.monotonic() - start
        after = {name: sum(map(cpu_seconds, ps)) for name, ps in pids.items()}
    tokens = tokens_per_s * wall
    return tokens_per_s, {name: ((after[name] - before[name]) / wall, 1e6 * (after[name] - before[name]) / tokens)
                          for name in pids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-steps", type=int, default=1)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--routers", type=int, nargs="+", default=[1], help="router counts, one stack each")
    parser.add_argument("--connections", type=int, default=8, help="client connections (spread over the routers)")
    args = parser.parse_args()
    models = Path(tempfile.mkdtemp(prefix="bench-models-"))
    build_tiny_model(models, name=MODEL)
    results = {}
    with Progress(transient=True) as progress:
        for routers in args.routers:
            results[routers] = measure(models, routers, args, progress)
    table = Table(title=f"CPU per process, c={args.concurrency}, {args.max_tokens} tokens per request, "
                        f"decode steps per call {args.decode_steps}, {args.connections} connections")
    table.add_column("process")
    for routers, (tokens_per_s, _) in results.items():
        table.add_column(f"{routers} router(s): % of a core", justify="right")
        table.add_column("CPU µs/token", justify="right")
    for name in next(iter(results.values()))[1]:
        table.add_row(name, *[cell for _, split in results.values()
                              for cell in (f"{100 * split[name][0]:.0f}%", f"{split[name][1]:.1f}")])
    table.add_row("tokens/s", *[cell for tokens_per_s, _ in results.values() for cell in (f"{tokens_per_s:,.0f}", "")])
    Console().print(table)


if __name__ == "__main__":
    main()
