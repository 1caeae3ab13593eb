"""CPU time per process of the stack (client, router, batcher, worker, nats-server) under a
concurrency-32 load, from /proc/PID/stat: which process the tokens cost.

    .venv/bin/python bench/cpu_split.py [--decode-steps 1]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decode-steps", type=int, default=1)
    parser.add_argument("--requests", type=int, default=320)
    args = parser.parse_args()
    models = Path(tempfile.mkdtemp(prefix="bench-models-"))
    build_tiny_model(models, name=MODEL)
    spec = StackSpec(models_dir=models, replicas={MODEL: 1}, max_batch_size=64, worker_threads=1,
                     log_dir=Path(tempfile.mkdtemp(prefix="bench-logs-")),
                     batcher_args=("--decode-steps", str(args.decode_steps)))
    with LocalStack(spec) as stack, Progress(transient=True) as progress:
        assert stack.router is not None and stack.nats is not None and stack.nats.process is not None
        pids = {"bench client": os.getpid(), "router": stack.router.process.pid,
                "batcher": stack.batchers[0].process.pid, "worker": stack.workers[0].process.pid,
                "nats-server": stack.nats.process.pid}
        asyncio.run(through_stack(stack.router_address, "cpu split", 4, 16, 8, progress, "warm-up"))
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        start = time.monotonic()
        _, tokens_per_s = asyncio.run(through_stack(stack.router_address, "cpu split", 32, args.requests, 64,
                                                    progress, "load"))
        wall = time.monotonic() - start
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    table = Table(title=f"CPU per process, c=32, decode steps per call {args.decode_steps}: "
                        f"{tokens_per_s:,.0f} tokens/s")
    table.add_column("process")
    table.add_column("% of one core", justify="right")
    for name in pids:
        table.add_row(name, f"{100 * (after[name] - before[name]) / wall:.0f}%")
    Console().print(table)


if __name__ == "__main__":
    main()
