"""Retry storm and its cure: one struggling replica, an open-loop arrival trace with a spike
slightly above capacity, and clients that retry every failure

  (a) immediately,
  (b) after exponential backoff with full jitter (`switchyard.resilience.retry.backoff_s`),
  (c) after backoff + jitter, within a client-side retry budget (`RetryBudget`),

next to (none) the same trace with no retries at all, the spike's own cost. Callers retry until
their request's deadline (5 s after it arrived) unless `--max-attempts` caps them.

The replica struggles for real: one tiny-model replica with a small batch cap, the router's
admission control (`--queue-limit`) sheds beyond it with RESOURCE_EXHAUSTED, and every attempt
carries a gRPC deadline, so a request that waits too long in the queue (or is still
generating when its deadline hits) fails with DEADLINE_EXCEEDED — its slot's work wasted.
Capacity is measured first (closed loop, same run); the trace is then base rate → spike →
base rate, in multiples of it. Every strategy replays the same seeded trace on a fresh stack.

Reports, per strategy: amplification (attempts / first tries) in each phase, goodput
(successful requests/s) during and after the spike, the share of requests that eventually
succeed, and the time to recover after the spike ends. Plots goodput and offered load (first
tries vs retries) over time, one panel per strategy, to docs/images/retry-storm.png.

    .venv/bin/python bench/retry_storm.py            # ~4.5 min
    .venv/bin/python bench/retry_storm.py --quick    # ~2.5 min
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from switchyard.model.tiny import build_tiny_model
from switchyard.resilience.retry import RetryBudget, backoff_s
from switchyard.runtime.stack import LocalStack, StackSpec
from switchyard.v1 import generate_pb2, generate_pb2_grpc

console = Console(width=160)
MODEL = "tiny-llama"
STRATEGIES = ("none", "immediate", "backoff", "budget")
TITLES = {"none": "no retries (the spike alone)", "immediate": "(a) immediate retries", "backoff": "(b) backoff + full jitter",
          "budget": "(c) backoff + jitter + retry budget"}


@dataclass
class Attempt:
    start: float  # seconds since the trace began
    end: float
    retry: bool
    outcome: str  # "OK" or a status code name


@dataclass
class Outcome:
    arrival: float
    ok: bool
    attempts: list[Attempt] = field(default_factory=list)
    gave_up: str = ""  # why it stopped retrying (budget, attempts, deadline)


@dataclass
class Phases:
    base_s: float
    spike_s: float
    after_s: float

    @property
    def spike_start(self) -> float:
        return self.base_s

    @property
    def spike_end(self) -> float:
        return self.base_s + self.spike_s

    @property
    def total(self) -> float:
        return self.base_s + self.spike_s + self.after_s


def arrival_trace(phases: Phases, base_rps: float, spike_rps: float, seed: int) -> list[float]:
    """Poisson arrivals, piecewise-constant rate (base → spike → base), seeded."""
    rng = np.random.default_rng(seed)
    out: list[float] = []
    for start, end, rate in ((0.0, phases.spike_start, base_rps), (phases.spike_start, phases.spike_end, spike_rps),
                             (phases.spike_end, phases.total, base_rps)):
        t = start
        while True:
            t += float(rng.exponential(1.0 / rate))
            if t >= end:
                break
            out.append(t)
    return out


def make_request(i: int, rng: random.Random, max_tokens: int, vocab: int) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        request_id=f"storm-{i}", model=MODEL,
        token_ids=generate_pb2.TokenIds(ids=[rng.randrange(100, vocab - 1) for _ in range(16)]),
        max_tokens=max_tokens, stop=generate_pb2.StopConditions(ignore_eos=True))


async def attempt_once(stub: generate_pb2_grpc.GenerationStub, req: generate_pb2.GenerateRequest,
                       timeout_s: float) -> str:
    """One try: "OK" on the final event, else the status code name."""
    try:
        async for event in stub.Generate(req, timeout=timeout_s):
            if event.HasField("final"):
                return "OK"
            if event.HasField("error"):
                return generate_pb2.ErrorCode.Name(event.error.code).removeprefix("ERROR_CODE_")
        return "NO_FINAL"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def calibrate(address: str, concurrency: int, seconds: float, max_tokens: int, vocab: int) -> float:
    """Completed requests/s of a closed loop that keeps the batch (and a little queue) full."""
    rng = random.Random(1)
    done = 0
    stop_at = time.perf_counter() + seconds

    async def loop(stub: generate_pb2_grpc.GenerationStub, k: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop_at:
            if await attempt_once(stub, make_request(k * 100_000 + i, rng, max_tokens, vocab), 30.0) == "OK":
                done += 1
            i += 1

    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        await attempt_once(stub, make_request(0, rng, max_tokens, vocab), 30.0)  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(stub, k) for k in range(concurrency)))
        return done / (time.perf_counter() - t0)


@dataclass
class ClientPolicy:
    strategy: str
    attempt_timeout_s: float
    max_attempts: int
    request_deadline_s: float  # the caller gives up on a request this long after it arrived
    backoff_base_s: float
    backoff_cap_s: float
    budget_ratio: float


async def replay(address: str, arrivals: list[float], policy: ClientPolicy, max_tokens: int, vocab: int,
                 seed: int) -> list[Outcome]:
    """Every arrival is one request from its own caller; its retries follow the strategy. One
    channel and (for "budget") one RetryBudget shared by all, as in one client process."""
    jitter = random.Random(seed)
    prompts = random.Random(seed + 1)
    budget = RetryBudget(ratio=policy.budget_ratio) if policy.strategy == "budget" else None
    outcomes: list[Outcome] = []

    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        t0 = time.perf_counter()

        async def caller(i: int, arrival: float) -> None:
            req = make_request(i, prompts, max_tokens, vocab)
            out = Outcome(arrival, False)
            outcomes.append(out)
            give_up_at = arrival + policy.request_deadline_s
            if budget is not None:
                budget.on_request()
            for n in range(policy.max_attempts or 1_000_000):
                now = time.perf_counter() - t0
                if now >= give_up_at:
                    out.gave_up = "deadline"
                    return
                timeout = min(policy.attempt_timeout_s, give_up_at - now)
                code = await attempt_once(stub, req, timeout)
                out.attempts.append(Attempt(now, time.perf_counter() - t0, n > 0, code))
                if code == "OK":
                    out.ok = True
                    return
                if n + 1 == policy.max_attempts:
                    out.gave_up = "attempts"
                    return
                if policy.strategy == "none":
                    out.gave_up = "no retries"
                    return
                if budget is not None and not budget.try_retry():
                    out.gave_up = "budget"
                    return
                if policy.strategy != "immediate":
                    await asyncio.sleep(backoff_s(n, policy.backoff_base_s, policy.backoff_cap_s, jitter))

        tasks = []
        for i, arrival in enumerate(arrivals):
            delay = arrival - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(caller(i, arrival)))
        await asyncio.gather(*tasks)
    return outcomes


@dataclass
class Series:
    edges: np.ndarray
    first: np.ndarray  # first tries started per second
    retries: np.ndarray  # retries started per second
    good: np.ndarray  # successes per second (by completion time)
    arrivals: np.ndarray  # requests arriving per second


def series(outcomes: list[Outcome], horizon: float, bin_s: float) -> Series:
    edges = np.arange(0.0, horizon + bin_s, bin_s)
    starts_first = [a.start for o in outcomes for a in o.attempts if not a.retry]
    starts_retry = [a.start for o in outcomes for a in o.attempts if a.retry]
    good = [a.end for o in outcomes for a in o.attempts if a.outcome == "OK"]
    hist = lambda xs: np.histogram(xs, bins=edges)[0] / bin_s  # noqa: E731
    return Series(edges, hist(starts_first), hist(starts_retry), hist(good), hist([o.arrival for o in outcomes]))


def recovery_s(s: Series, phases: Phases, window_s: float = 5.0) -> float:
    """Seconds after the spike ends until goodput keeps up with arrivals: the first moment from
    which every `window_s` window until the end of the trace has goodput ≥ 80% of the requests
    that arrived in it. NaN when it never does."""
    bin_s = s.edges[1] - s.edges[0]
    k = max(1, int(round(window_s / bin_s)))
    end_bin = int(phases.total / bin_s)
    good = np.convolve(s.good[:end_bin], np.ones(k), "valid")
    arrived = np.convolve(s.arrivals[:end_bin], np.ones(k), "valid")
    ok = good >= 0.8 * arrived  # window starting at bin j
    first = int(phases.spike_end / bin_s)
    for j in range(first, len(ok)):
        if ok[j:].all():
            return j * bin_s - phases.spike_end
    return float("nan")


def summarise(outcomes: list[Outcome], phases: Phases, s: Series) -> dict[str, float]:
    def in_phase(t: float, a: float, b: float) -> bool:
        return a <= t < b
    spans = {"spike": (phases.spike_start, phases.spike_end), "after": (phases.spike_end, phases.total)}
    row: dict[str, float] = {}
    attempts = [a for o in outcomes for a in o.attempts]
    firsts = sum(not a.retry for a in attempts)
    row["amp_all"] = len(attempts) / max(firsts, 1)
    for name, (a, b) in spans.items():
        f = sum(1 for x in attempts if not x.retry and in_phase(x.start, a, b))
        r = sum(1 for x in attempts if x.retry and in_phase(x.start, a, b))
        row[f"amp_{name}"] = (f + r) / max(f, 1)
        row[f"offered_{name}"] = (f + r) / (b - a)
        row[f"good_{name}"] = sum(1 for x in attempts if x.outcome == "OK" and in_phase(x.end, a, b)) / (b - a)
        arrived = [o for o in outcomes if in_phase(o.arrival, a, b)]
        row[f"succ_{name}"] = sum(o.ok for o in arrived) / max(len(arrived), 1)
    row["succ_all"] = sum(o.ok for o in outcomes) / max(len(outcomes), 1)
    row["recover_s"] = recovery_s(s, phases)
    row["wasted"] = sum(1 for a in attempts if a.outcome == "DEADLINE_EXCEEDED")
    return row


def plot(results: dict[str, tuple[Series, dict[str, float]]], phases: Phases, capacity: float, path: Path,
         title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.9 * len(results)), sharex=True, sharey=True)
    for ax, (name, (s, row)) in zip(np.atleast_1d(axes), results.items()):
        x = s.edges[:-1]
        w = s.edges[1] - s.edges[0]
        ax.bar(x, s.first, width=w, align="edge", color="#9ecae1", label="offered: first tries/s")
        ax.bar(x, s.retries, width=w, align="edge", bottom=s.first, color="#fdae6b", label="offered: retries/s")
        ax.step(np.append(x, x[-1] + w), np.append(s.good, s.good[-1]), where="post", color="#2ca02c", lw=2.2,
                label="goodput: successes/s")
        ax.axhline(capacity, color="k", ls="--", lw=1, label="measured capacity")
        ax.axvspan(phases.spike_start, phases.spike_end, color="red", alpha=0.07, label="spike")
        rec = row["recover_s"]
        rec_txt = f"recovered {rec:.0f} s after the spike" if rec == rec else "not recovered by the end"
        ax.set_title(f"{TITLES[name]} — amplification ×{row['amp_all']:.2f}, {rec_txt}", fontsize=10)
        ax.set_ylabel("requests/s (log)")
        ax.set_yscale("log")
        ax.set_ylim(1, max(float((r.first + r.retries).max()) for r, _ in results.values()) * 1.5)
        ax.set_xlim(0, s.edges[-1])
    np.atleast_1d(axes)[-1].set_xlabel("seconds since the trace began")
    np.atleast_1d(axes)[0].legend(loc="upper right", fontsize=8, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    console.print(f"plot: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter phases (about half the run time)")
    parser.add_argument("--max-batch", type=int, default=4, help="the replica's batch cap")
    parser.add_argument("--queue-limit", type=int, default=40, help="router admission: requests queued beyond the batch")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--base-load", type=float, default=0.6, help="arrival rate outside the spike, × capacity")
    parser.add_argument("--spike-load", type=float, default=1.3, help="arrival rate during the spike, × capacity")
    parser.add_argument("--attempt-timeout-s", type=float, default=0.5, help="gRPC deadline of each attempt")
    parser.add_argument("--request-deadline-s", type=float, default=5.0,
                        help="a caller retries until this long after its request arrived")
    parser.add_argument("--max-attempts", type=int, default=0, help="per request (0: until the deadline)")
    parser.add_argument("--backoff-base-s", type=float, default=0.1)
    parser.add_argument("--backoff-cap-s", type=float, default=4.0)
    parser.add_argument("--budget-ratio", type=float, default=0.2)
    parser.add_argument("--capacity", type=float, default=0.0, help="requests/s (0: measure it)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--plot", type=Path, default=Path("docs/images/retry-storm.png"))
    args = parser.parse_args()
    phases = Phases(6, 8, 16) if args.quick else Phases(8, 12, 25)
    strategies = [s for s in args.strategies.split(",") if s]

    models = Path(tempfile.mkdtemp(prefix="bench-retry-storm-models-"))
    build_tiny_model(models, name=MODEL)
    from switchyard.model.config import ModelManifest
    vocab = ModelManifest.load(models / MODEL).config.vocab_size

    def spec() -> StackSpec:
        return StackSpec(models_dir=models, replicas={MODEL: 1}, http_port=-1, metrics=False,
                         max_batch_size=args.max_batch, router_args=("--queue-limit", str(args.queue_limit)),
                         log_dir=Path(tempfile.mkdtemp(prefix="bench-retry-storm-logs-")))

    capacity = args.capacity
    if not capacity:
        with LocalStack(spec()) as stack:
            capacity = asyncio.run(calibrate(stack.router_address, 2 * args.max_batch, 4.0 if args.quick else 6.0,
                                             args.max_tokens, vocab))
    base_rps, spike_rps = args.base_load * capacity, args.spike_load * capacity
    arrivals = arrival_trace(phases, base_rps, spike_rps, args.seed)
    console.print(f"capacity {capacity:.1f} req/s (batch {args.max_batch}, {args.max_tokens} tokens); trace: "
                  f"{base_rps:.1f} req/s for {phases.base_s:.0f} s, {spike_rps:.1f} for {phases.spike_s:.0f} s, "
                  f"{base_rps:.1f} for {phases.after_s:.0f} s — {len(arrivals)} requests")

    results: dict[str, tuple[Series, dict[str, float]]] = {}
    codes: dict[str, Counter[str]] = {}
    for name in strategies:
        policy = ClientPolicy(name, args.attempt_timeout_s, args.max_attempts, args.request_deadline_s,
                              args.backoff_base_s, args.backoff_cap_s, args.budget_ratio)
        with LocalStack(spec()) as stack:
            asyncio.run(calibrate(stack.router_address, args.max_batch, 1.0, args.max_tokens, vocab))  # warm-up
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            outcomes = asyncio.run(replay(stack.router_address, arrivals, policy, args.max_tokens, vocab, args.seed))
            console.print(f"{name}: replayed in {time.perf_counter() - t0:.1f} s")
        horizon = max(phases.total, max(a.end for o in outcomes for a in o.attempts))
        s = series(outcomes, float(np.ceil(horizon)), 1.0)
        results[name] = (s, summarise(outcomes, phases, s))
        results[name][1]["load"] = load
        codes[name] = Counter(a.outcome for o in outcomes for a in o.attempts)
        codes[name].update(f"gave up: {o.gave_up}" for o in outcomes if o.gave_up)

    machine = f"{platform.node()}, {os.cpu_count()} cores"
    table = Table(title=f"Retry storm: 1 replica of {MODEL}, batch {args.max_batch}, queue limit {args.queue_limit}, "
                        f"capacity {capacity:.1f} req/s; spike {args.spike_load}× for {phases.spike_s:.0f} s, "
                        f"else {args.base_load}× ({machine})")
    for col in ("strategy", "amplification all / spike / after", "offered req/s spike / after",
                "goodput req/s spike / after", "requests OK spike / after / all", "recovery after spike s",
                "attempts timed out", "load avg at start"):
        table.add_column(col, justify="right")
    for name, (_, r) in results.items():
        rec = f"{r['recover_s']:.0f}" if r["recover_s"] == r["recover_s"] else "never"
        table.add_row(name, f"×{r['amp_all']:.2f} / ×{r['amp_spike']:.2f} / ×{r['amp_after']:.2f}",
                      f"{r['offered_spike']:.1f} / {r['offered_after']:.1f}",
                      f"{r['good_spike']:.1f} / {r['good_after']:.1f}",
                      f"{r['succ_spike']:.0%} / {r['succ_after']:.0%} / {r['succ_all']:.0%}", rec, str(int(r["wasted"])), f"{r['load']:.1f}")
    console.print(table)
    for name, c in codes.items():
        console.print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    if not results:
        return 0
    plot(results, phases, capacity, args.plot,
         f"Retry storm — 1 replica, capacity {capacity:.1f} req/s, arrivals {args.base_load}× → {args.spike_load}× "
         f"→ {args.base_load}× capacity, attempt deadline {args.attempt_timeout_s:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
