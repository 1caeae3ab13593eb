"""The batcher's own CPU per step at a large batch (issue 13 §5): what its event loop spends
between two worker steps, without the worker, NATS or the network.

With the engine on a GPU a decode step of 256 sequences takes ~2–3 ms (H200), and the batcher's
Python — building the next StepRequest, taking the worker's answer (co-located, `--worker local`:
made from the engine's result in the process; a separate worker: the StepResponse built there
and read here), turning it into each request's token event — runs beside it under the same GIL
in a co-located replica. This times those parts per step for `--sequences` decoding sequences,
one token each per step, events batched per router as the stack's routers take them; publishing
is a no-op, so the figure is the scheduler's own cost.

    .venv/bin/python bench/batcher_step_cost.py [--sequences 256] [--steps 300]

Compare commits by running it at each, side by side on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "libs"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from services.batcher.config import BatcherConfig  # noqa: E402
from services.batcher.local_worker import answer_from_result  # noqa: E402
from services.batcher.scheduler import Active, Scheduler  # noqa: E402
from services.batcher.step_answer import answer_from_proto  # noqa: E402
from services.worker.engine import StepResult  # noqa: E402
from services.worker.server import step_response_to_proto  # noqa: E402
from switchyard.v1 import bus_pb2, worker_pb2  # noqa: E402


class DiscardingBus:
    """Takes the batcher's NATS publishes and drops them (only the batcher's own CPU is timed)."""

    async def publish(self, subject: str, payload: bytes) -> None:
        return None


async def measure(sequences: int, steps: int, routers: int) -> dict[str, list[float]]:
    info = worker_pb2.InfoResponse(model="m", context_length=1 << 20, max_sequences=sequences,
                                   execution_provider="CUDAExecutionProvider")
    scheduler = Scheduler(BatcherConfig(max_batch_size=sequences, token_budget=1 << 40), "replica", info,
                          DiscardingBus(), None, None)  # type: ignore[arg-type]
    now = time.time()
    for i in range(sequences):
        rid = f"request-{i:05d}"
        request = bus_pb2.DispatchRequest(request_id=rid, prompt_token_ids=[1] * 32, max_tokens=1 << 30,
                                          reply_subject=f"reply.{i}", batch_reply_subject=f"router.{i % routers}")
        scheduler.active[rid] = Active(request, now, prefill_left=0, generated=1)
    ids = list(scheduler.active)
    times: dict[str, list[float]] = {"next step request": [], "answer, co-located": [], "apply the answer": [],
                                     "answer over gRPC (not in the total)": []}
    for step in range(steps):
        result = StepResult(tokens=[(rid, 100 + step % 7, False) for rid in ids], prefill_remaining={},
                            decode_batch_size=sequences, decode_steps=1)
        t0 = time.perf_counter()
        scheduler._next_request()
        t1 = time.perf_counter()
        answer = answer_from_result(result, {})
        t2 = time.perf_counter()
        await scheduler._apply(scheduler._in_flight.popleft(), answer)
        t3 = time.perf_counter()
        answer_from_proto(step_response_to_proto(result))
        t4 = time.perf_counter()
        for name, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[name].append(seconds)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--routers", type=int, default=4)
    args = ap.parse_args()
    times = asyncio.run(measure(args.sequences, args.steps, args.routers))
    table = Table(title=f"batcher CPU per step, {args.sequences} sequences decoding, {args.steps} steps")
    for column in ("part", "median ms", "p90 ms", "µs per sequence"):
        table.add_column(column, justify="right" if column != "part" else "left")
    total = [sum(parts[:3]) for parts in zip(*times.values())]
    for name, values in [*times.items(), ("co-located, all", total)]:
        ordered = sorted(values)
        median = statistics.median(values)
        table.add_row(name, f"{1e3 * median:.3f}", f"{1e3 * ordered[int(0.9 * len(ordered))]:.3f}",
                      f"{1e6 * median / args.sequences:.2f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
