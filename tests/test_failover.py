"""Failover: retry policies in isolation, sampling that resumes exactly at a position, and
streams that survive their replica dying (kill -9) or stalling (SIGSTOP) mid-generation on
the real stack, with output identical to an undisturbed run."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest

from services.worker.engine import Engine
from services.worker.sampling import SamplingParams
from switchyard.resilience.outliers import OutlierDetector
from switchyard.resilience.retry import RetryBudget, backoff_s
from switchyard.runtime.stack import LocalStack, Service
from switchyard.v1 import generate_pb2, generate_pb2_grpc

from conftest import TINY, start_stack, wait_for_replicas


# ---- policies --------------------------------------------------------------------------------
@pytest.mark.unit
def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    rng = random.Random(1)
    for attempt, ceiling in ((0, 0.05), (1, 0.1), (3, 0.4), (10, 2.0)):
        delays = [backoff_s(attempt, base_s=0.05, cap_s=2.0, rng=rng) for _ in range(400)]
        assert 0.0 <= min(delays) and max(delays) <= ceiling
        assert max(delays) > 0.8 * ceiling and min(delays) < 0.2 * ceiling  # spread over the whole range


@pytest.mark.unit
def test_retry_budget_caps_retries_at_a_share_of_recent_requests() -> None:
    budget = RetryBudget(ratio=0.2, window_s=10.0, min_per_window=2)
    for i in range(100):
        budget.on_request(now=float(i) * 0.01)
    granted = sum(budget.try_retry(now=1.0) for _ in range(100))
    assert granted == 22  # 2 + 20% of 100
    assert not budget.try_retry(now=1.0)
    assert budget.try_retry(now=12.0)  # the window moved on: requests and retries forgotten


@pytest.mark.unit
def test_outlier_detector_ejects_after_consecutive_failures_and_panics_when_all_are_out() -> None:
    out = OutlierDetector(consecutive=3, base_eject_s=5.0, max_eject_s=60.0)
    assert not out.failure("a", now=0.0) and not out.failure("a", now=0.1)
    assert out.failure("a", now=0.2) and out.ejected("a", now=1.0) and not out.ejected("a", now=5.3)
    out.failure("b", now=0.0)
    out.success("b")
    assert not out.failure("b", now=0.1) and not out.failure("b", now=0.2)  # the success reset b's count
    assert out.admit(["a", "b"], key=str, now=1.0) == ["b"]
    out.failure("b", now=0.3)
    assert out.admit(["a", "b"], key=str, now=1.0) == ["a", "b"]  # every one ejected: use them all
    for t in (6.0, 6.1, 6.2):
        out.failure("a", now=t)
    assert out.ejected("a", now=15.0) and not out.ejected("a", now=16.3)  # second ejection lasts twice as long
    out.forget("a")  # it left the fleet: a new incarnation is not ejected
    assert not out.ejected("a", now=15.0)


# ---- sampling resumes at a position ----------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.9, top_k=40, top_p=0.95),
                                    SamplingParams(temperature=1.2, repetition_penalty=1.3)])
def test_a_continuation_samples_exactly_what_the_original_would_have(tiny_models_dir: Path,
                                                                     params: SamplingParams) -> None:
    engine = Engine(tiny_models_dir / TINY, max_sequences=8, threads=1)
    prompt = np.random.default_rng(3).integers(5, 250, size=40).tolist()
    whole = engine.generate(prompt, 30, params, seed=1234)
    for cut in (1, 12, 29):
        engine.add("cont", prompt + whole[:cut], params, 1234, generated_offset=cut)
        out: list[int] = []
        result = engine.step([("cont", 0)], decode=False)
        while True:
            out += [t for s, t, _ in result.tokens if s == "cont"]
            if len(out) >= 30 - cut:
                break
            result = engine.step([], decode=True)
        engine.remove(["cont"])
        assert whole[:cut] + out[:30 - cut] == whole, cut


# ---- the real stack ----------------------------------------------------------------------------
@pytest.fixture(params=["separate", "colocated"])
def two_replicas(request: pytest.FixtureRequest, tiny_models_dir: Path, tmp_path: Path) -> Iterator[LocalStack]:
    """Two replicas: each a worker and its batcher, or (colocated) one process holding both."""
    stack = start_stack(tiny_models_dir, {TINY: 2}, tmp_path, router_args=("--stall-timeout-s", "1.0"),
                        colocate=request.param == "colocated")
    yield stack
    for svc in stack.services():  # a test may leave one stopped
        if svc.process.poll() is None:
            os.kill(svc.process.pid, signal.SIGCONT)
    stack.stop()


def engine_process(stack: LocalStack, i: int) -> Service:
    """The process running replica i's model: its worker, or its batcher when co-located."""
    return (stack.workers or stack.batchers)[i]


def requests(n: int, max_tokens: int) -> list[generate_pb2.GenerateRequest]:
    rng = np.random.default_rng(11)
    out = []
    for i in range(n):
        sampling = generate_pb2.SamplingParams(temperature=0.8, top_k=50, seed=100 + i) if i % 2 else \
            generate_pb2.SamplingParams()
        out.append(generate_pb2.GenerateRequest(
            model=TINY, token_ids=generate_pb2.TokenIds(ids=rng.integers(5, 250, size=30).tolist()),
            max_tokens=max_tokens, sampling=sampling, stop=generate_pb2.StopConditions(ignore_eos=True)))
    return out


async def stream_all(address: str, reqs: list[generate_pb2.GenerateRequest], started: asyncio.Event | None = None,
                     min_tokens: int = 0, ended: list[bool] | None = None, progress: list[int] | None = None
                     ) -> list[tuple[list[int], generate_pb2.FinalSummary | None, str]]:
    """Each request's tokens, final summary and error; `started` is set once every stream has
    at least `min_tokens` tokens; `ended[i]` turns True when stream i got its final event and
    `progress[i]` counts its tokens so far (both optional, for a caller to look at mid-run)."""
    progress = progress if progress is not None else [0] * len(reqs)

    async def one(i: int, stub: generate_pb2_grpc.GenerationStub) -> tuple[list[int], generate_pb2.FinalSummary | None, str]:
        tokens: list[int] = []
        indices: list[int] = []
        try:
            async for event in stub.Generate(reqs[i], timeout=60):
                if event.HasField("tokens"):
                    indices.append(event.tokens.index)
                    assert event.tokens.index == len(tokens)  # no token lost or repeated
                    tokens += event.tokens.token_ids
                    progress[i] = len(tokens)
                    if started is not None and min(progress) >= min_tokens:
                        started.set()
                elif event.HasField("final"):
                    if ended is not None:
                        ended[i] = True
                    return tokens, event.final, ""
                else:
                    return tokens, None, event.error.message
        except grpc.aio.AioRpcError as exc:
            return tokens, None, f"{exc.code().name}: {exc.details()}"
        return tokens, None, "stream ended without a final event"

    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        return await asyncio.gather(*(one(i, stub) for i in range(len(reqs))))


def mid_stream_failovers(stack: LocalStack) -> float:
    """Streams the router continued on another replica after theirs failed (its metric)."""
    import httpx
    assert stack.router is not None and stack.router.metrics_port
    text = httpx.get(f"http://127.0.0.1:{stack.router.metrics_port}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("switchyard_failovers_total{") and 'phase="mid_stream"' in line)


def disturbed_run(stack: LocalStack, reqs: list[generate_pb2.GenerateRequest], disturb: "callable[[], None]",
                  at_disturbance: list[tuple[bool, int]] | None = None
                  ) -> list[tuple[list[int], generate_pb2.FinalSummary | None, str]]:  # type: ignore[valid-type]
    """Streams `reqs`, and disturbs the stack once every stream has 5 tokens; `at_disturbance`
    (when given) gets each stream's (ended, tokens received) at that moment (a fast one may be
    done or nearly)."""
    async def run() -> list[tuple[list[int], generate_pb2.FinalSummary | None, str]]:
        started = asyncio.Event()
        ended, progress = [False] * len(reqs), [0] * len(reqs)
        task = asyncio.create_task(stream_all(stack.router_address, reqs, started, min_tokens=5, ended=ended,
                                              progress=progress))
        await asyncio.wait_for(started.wait(), 60)
        disturb()  # synchronous: no stream moves while it runs
        if at_disturbance is not None:
            at_disturbance[:] = list(zip(ended, progress))
        return await task
    return asyncio.run(run())


@pytest.mark.integration
@pytest.mark.chaos
def test_streams_survive_kill_9_of_a_worker_with_identical_output(two_replicas: LocalStack) -> None:
    stack = two_replicas
    wait_for_replicas(stack, 2)
    reqs = requests(40, max_tokens=150)  # 40 streams across the two replicas, half greedy, half seeded
    undisturbed = asyncio.run(stream_all(stack.router_address, reqs))
    assert all(final is not None for _, final, _ in undisturbed)
    assert len({final.replica_id for _, final, _ in undisturbed if final is not None}) == 2  # both served
    victim = engine_process(stack, 0)
    at_kill: list[tuple[bool, int]] = []
    moved_before = mid_stream_failovers(stack)
    results = disturbed_run(stack, reqs, lambda: os.kill(victim.process.pid, signal.SIGKILL), at_kill)
    errors = [err for _, final, err in results if final is None]
    assert not errors, errors[:3]
    for (tokens, final, _), (expected, _, _) in zip(results, undisturbed):
        assert tokens == expected  # greedy and seeded sampling continue exactly
        assert final is not None and final.usage.completion_tokens == 150
    # every stream still mid-way at the kill finished on the survivor, those that were on the
    # killed replica included. (Each had ≥ 5 of its 150 tokens; one within 10 of its end may
    # have had the rest generated and in transit when the worker died: it ends where it was.)
    running = [final for (_, final, _), (done, got) in zip(results, at_kill) if not done and got < 140]
    assert mid_stream_failovers(stack) > moved_before, "no stream was mid-way on the killed replica"
    survivor = stack.batchers[1].name.replace("batcher-", "", 1)
    assert {final.replica_id for final in running if final is not None} == {survivor}


@pytest.mark.integration
@pytest.mark.chaos
def test_streams_move_off_a_stopped_worker_within_the_stall_timeout(two_replicas: LocalStack) -> None:
    stack = two_replicas
    wait_for_replicas(stack, 2)
    reqs = requests(10, max_tokens=120)
    undisturbed = asyncio.run(stream_all(stack.router_address, reqs))
    victim = engine_process(stack, 0)
    t0 = time.monotonic()
    results = disturbed_run(stack, reqs, lambda: os.kill(victim.process.pid, signal.SIGSTOP))
    elapsed = time.monotonic() - t0
    assert [err for _, final, err in results if final is None] == []
    assert [tokens for tokens, _, _ in results] == [tokens for tokens, _, _ in undisturbed]
    assert elapsed < 15  # stall noticed within heartbeat + 1 s stall timeout, not a hang
