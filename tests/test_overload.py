"""Overload at 5× capacity on the real stack: admission by tokens sheds the excess at once
with a measured retry delay, and what it admits starts within the stated TTFT SLO instead of
waiting behind long generations."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import grpc
import pytest

from switchyard.v1 import generate_pb2, generate_pb2_grpc

from conftest import TINY, start_stack

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
TTFT_SLO_S = 5.0  # tiny model on the 2-core CI box: admitted requests wait at most ~half a generation


def test_five_times_capacity_sheds_fast_and_keeps_admitted_ttft_within_slo(tiny_models_dir: Path, tmp_path: Path) -> None:
    # Each request reserves 50 + 250 tokens; a replica's 1,500-token budget holds 5 of them, so
    # the fleet runs 10 at once and admits 15 (+50% queue). 50 concurrent requests = 5×.
    # One ORT thread per worker: two workers' thread pools on the 2-core box otherwise leave the
    # router (the process under test) queued behind them, and the shed latency measures that.
    # Each step also takes 2 ms more (the worker's test-only slow version): the probes must all
    # be shed while every admitted request is still short of its end, and as the tiny model's
    # steps got faster, a 250-token generation sometimes ended before the burst was decided.
    stack = start_stack(tiny_models_dir, {TINY: 2}, tmp_path, max_batch_size=8,
                        batcher_args=("--token-budget", "1500"),
                        worker_args={TINY: ("--threads", "1", "--fault-delay-per-token-ms", "2")})
    max_tokens, margin, fleet_slots = 250, 25, 10
    try:
        req = generate_pb2.GenerateRequest(model=TINY, token_ids=generate_pb2.TokenIds(ids=list(range(10, 60))),
                                           max_tokens=max_tokens, stop=generate_pb2.StopConditions(ignore_eos=True))
        received: list[int] = []  # tokens each admitted request of the burst has received so far
        shed_so_far: list[float] = []  # when each request of the burst was shed

        async def one(stub: generate_pb2_grpc.GenerationStub, slot: int | None = None) -> tuple[str, float, float | None, float | None]:
            start = time.perf_counter()
            ttft = None
            try:
                async for event in stub.Generate(req, timeout=120):
                    if event.HasField("tokens"):
                        ttft = time.perf_counter() - start if ttft is None else ttft
                        if slot is not None:
                            received[slot] += len(event.tokens.token_ids)
                return "ok", time.perf_counter() - start, ttft, None
            except grpc.aio.AioRpcError as exc:
                if slot is not None:
                    shed_so_far.append(time.perf_counter())
                retry = dict(exc.trailing_metadata() or ()).get("retry-after-s")
                return exc.code().name, time.perf_counter() - start, None, float(retry) if retry else None

        async def burst() -> tuple[list[tuple[str, float, float | None, float | None]], list[tuple[str, float, float | None, float | None]]]:
            async with grpc.aio.insecure_channel(stack.router_address) as ch:
                stub = generate_pb2_grpc.GenerationStub(ch)
                await one(stub)  # warm the channel and the engines
                received.extend([0] * 50)
                running = asyncio.gather(*(one(stub, slot) for slot in range(50)))
                # Once the fleet's slots all stream (the router has admitted the burst) and while
                # every admitted request is still `margin` tokens short of its end (no capacity
                # can have been freed), how long does one more request take to be shed?
                # The whole burst decided first: a probe racing burst requests still on their way
                # to the router could take a place one of them would have had. Sheds come at
                # once (probes: ~10 ms), so none for 30 ms means the router has seen them all.
                async def fleet_streaming() -> None:
                    while sum(1 for n in received if n) < fleet_slots or not shed_so_far or \
                            time.perf_counter() - shed_so_far[-1] < 0.03:
                        await asyncio.sleep(0.002)
                await asyncio.wait_for(fleet_streaming(), timeout=60)
                probes = []
                while len(probes) < 10 and max(received) < max_tokens - margin:
                    probes.append(await one(stub))
                return await running, probes

        results, probes = asyncio.run(burst())
        assert len(probes) >= 5, f"only {len(probes)} probes before the first admitted request neared its end"
        assert all(p[0] == "RESOURCE_EXHAUSTED" for p in probes), probes
        # Shed at once, not after waiting for capacity (that would take seconds here): p50 under
        # 25 ms. An idle router refuses in ~3 ms; during this burst, with seven processes on the
        # 2-core box and the router forwarding ~thousands of tokens/s, p50s of 7–16 ms were
        # measured (four runs, one with a core busy-looped; the slowest probe 94–257 ms). A 10 ms
        # bound failed ~1 run in 5 on a quiet machine.
        assert statistics.median(p[1] for p in probes) < 0.025, sorted(p[1] for p in probes)
        ok = [r for r in results if r[0] == "ok"]
        shed = [r for r in results if r[0] == "RESOURCE_EXHAUSTED"]
        assert len(ok) + len(shed) == 50, {r[0] for r in results}
        assert 10 <= len(ok) <= 20, len(ok)  # the token budgets, not the 16 batch slots + 64 queue
        assert all(r[3] is not None and 0 < r[3] <= 60 for r in shed)
        ttfts = sorted(r[2] for r in ok if r[2] is not None)
        assert len(ttfts) == len(ok) and ttfts[-1] < TTFT_SLO_S, ttfts
    finally:
        stack.stop()
