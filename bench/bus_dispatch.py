"""Request dispatch over NATS: core NATS vs a JetStream work queue, measured in one run.

For each transport, the time from the router publishing a request to the batcher holding
it (what dispatch adds to time to first token), at p50/p99, with the batcher pulling the
way services/batcher does (JetStream: an outstanding fetch(batch=1) long-poll). Then what
each guarantees when the batcher is down: requests published while it is away are counted
when it comes back.

    .venv/bin/python bench/bus_dispatch.py [--messages 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import nats
import numpy as np
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from switchyard.bus.queue import flushed
from switchyard.bus.server import NatsServer

console = Console()
PAYLOAD = b"x" * 600  # about a DispatchRequest with a 128-token prompt


async def core_latency(url: str, n: int, progress: Progress) -> list[float]:
    pub, sub = await nats.connect(url), await nats.connect(url)
    got: asyncio.Queue[float] = asyncio.Queue()
    async def on_msg(msg: object) -> None:
        got.put_nowait(time.perf_counter())
    await sub.subscribe("bench.core", cb=on_msg)
    await flushed(sub)
    task = progress.add_task("core NATS", total=n)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await pub.publish("bench.core", PAYLOAD)
        await pub.flush()
        out.append(await got.get() - t0)
        progress.advance(task)
    await pub.close()
    await sub.close()
    return out


async def jetstream_setup(url: str, storage: StorageType) -> tuple[nats.NATS, nats.NATS, object]:
    pub, sub = await nats.connect(url), await nats.connect(url)
    js = pub.jetstream()
    name = f"BENCH_{storage.name}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"bench.{storage.name}.>"],
                                     retention=RetentionPolicy.WORK_QUEUE, storage=storage))
    psub = await sub.jetstream().pull_subscribe(f"bench.{storage.name}.r0", durable="r0", stream=name,
                                                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT))
    return pub, sub, psub


async def jetstream_latency(url: str, n: int, storage: StorageType, progress: Progress) -> list[float]:
    pub, sub, psub = await jetstream_setup(url, storage)
    js = pub.jetstream()
    got: asyncio.Queue[float] = asyncio.Queue()

    async def puller() -> None:
        while True:
            try:
                msgs = await psub.fetch(batch=1, timeout=1.0)  # type: ignore[attr-defined]
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            for m in msgs:
                got.put_nowait(time.perf_counter())
                await m.ack()

    pull = asyncio.create_task(puller())
    task = progress.add_task(f"JetStream ({storage.name.lower()})", total=n)
    out = []
    await asyncio.sleep(0.2)
    for _ in range(n):
        t0 = time.perf_counter()
        await js.publish(f"bench.{storage.name}.r0", PAYLOAD)
        out.append(await got.get() - t0)
        progress.advance(task)
    pull.cancel()
    await pub.close()
    await sub.close()
    return out


async def survives_batcher_outage(url: str) -> tuple[int, int]:
    """Publish 10 requests while the 'batcher' is away, then bring it back: how many arrive."""
    n = 10
    # core NATS: nobody subscribed while publishing
    pub = await nats.connect(url)
    for _ in range(n):
        await pub.publish("bench.outage.core", PAYLOAD)
    await pub.flush()
    sub = await nats.connect(url)
    seen = []
    async def on_msg(msg: object) -> None:
        seen.append(1)
    await sub.subscribe("bench.outage.core", cb=on_msg)
    await asyncio.sleep(0.5)
    core = len(seen)
    # JetStream: the consumer exists but nobody pulls while publishing
    js = pub.jetstream()
    await js.add_stream(StreamConfig(name="BENCH_OUTAGE", subjects=["bench.outage.js"],
                                     retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.MEMORY))
    await js.add_consumer("BENCH_OUTAGE", ConsumerConfig(durable_name="r0", ack_policy=AckPolicy.EXPLICIT))
    for _ in range(n):
        await js.publish("bench.outage.js", PAYLOAD)
    psub = await sub.jetstream().pull_subscribe("bench.outage.js", durable="r0", stream="BENCH_OUTAGE")
    msgs = await psub.fetch(batch=n, timeout=2)
    await pub.close()
    await sub.close()
    return core, len(msgs)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1e3


async def run(n: int) -> None:
    with NatsServer() as server, Progress(console=console, transient=True) as progress:
        await core_latency(server.url, 200, progress)  # warm-up
        core = await core_latency(server.url, n, progress)
        js_mem = await jetstream_latency(server.url, n, StorageType.MEMORY, progress)
        js_file = await jetstream_latency(server.url, n, StorageType.FILE, progress)
        outage_core, outage_js = await survives_batcher_outage(server.url)
    table = Table(title=f"Request dispatch, publish → batcher holds it ({n} messages, {len(PAYLOAD)} B)")
    for col in ("transport", "p50 ms", "p99 ms", "added vs core p50 ms", "requests kept through a batcher outage"):
        table.add_column(col, justify="right")
    table.add_row("core NATS", f"{pct(core, 50):.3f}", f"{pct(core, 99):.3f}", "—", f"{outage_core}/10")
    for name, xs in (("JetStream work queue (memory)", js_mem), ("JetStream work queue (file)", js_file)):
        table.add_row(name, f"{pct(xs, 50):.3f}", f"{pct(xs, 99):.3f}", f"{pct(xs, 50) - pct(core, 50):+.3f}",
                      f"{outage_js}/10" if "memory" in name else "(same)")
    console.print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    asyncio.run(run(parser.parse_args().messages))
