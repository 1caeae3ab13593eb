"""Load-aware balancing vs round-robin on the real stack (issue 8 §2).

Replicas of the int4 model behind one router (nats-server, router, batchers and workers as
processes, as `switchyard up` runs them). One run:

1. capacity: a closed loop holding every batch slot busy (replicas × max batch clients) with
   requests drawn from the trace's length distribution; output tokens/s over the window,
   divided by the mean output length, is the capacity in requests/s;
2. one seeded open-loop trace: Poisson arrivals at `--load` (75%) of that capacity,
   heavy-tailed output lengths (90% of requests 4–32 tokens, 10% 512–576), exact lengths
   forced with `ignore_eos` + `max_tokens`, every prompt distinct (no prefix-cache reuse);
3. for each policy in `--policies`: a fresh stack started with `balancing=<policy>`, the same
   trace replayed, TTFT and end-to-end measured by a grpc.aio client, the serving replica
   taken from the final summary, and each replica's running + queued sampled from its NATS
   load reports (`switchyard.load.>`).

Prints a table (p50/p95/p99 per policy, ratio against round_robin), writes
docs/images/balancing-load.png (per-replica load over time, one panel per policy) and
docs/images/balancing-cdf.png (latency CDFs), and the raw per-request results as JSON.

    .venv/bin/python bench/balancing.py [--policies round_robin least_loaded power_of_two] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import nats
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from switchyard.bus import subjects
from switchyard.runtime.stack import LocalStack, StackSpec
from switchyard.v1 import bus_pb2, generate_pb2, generate_pb2_grpc

console = Console(width=int(os.environ.get("COLUMNS", "220")))
TOPICS = ["the history of the printing press", "how tides work", "a recipe for bread", "why the sky is blue",
          "the rules of chess", "how a compiler works", "the life of bees", "a trip to the mountains",
          "the water cycle", "how vaccines train the immune system", "the causes of inflation",
          "a lighthouse keeper's day"]


@dataclass
class TraceRequest:
    index: int
    at_s: float  # arrival, seconds after the trace starts
    prompt: str
    max_tokens: int
    long: bool


@dataclass
class Result:
    index: int
    long: bool
    max_tokens: int
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    replica: str = ""
    queue_wait_s: float = 0.0
    tokens: int = 0
    error: str = ""


@dataclass
class PolicyRun:
    policy: str
    results: list[Result] = field(default_factory=list)
    samples: list[tuple[float, str, int, int, int]] = field(default_factory=list)  # t, replica, running, queued, kv tokens
    load_avg: tuple[float, float] = (0.0, 0.0)  # 1-min load average before / after
    wall_s: float = 0.0
    failed: str = ""


# ---- the workload ----------------------------------------------------------------------
def draw_length(rng: np.random.Generator, args: argparse.Namespace) -> tuple[int, bool]:
    if rng.random() < args.long_fraction:
        return int(rng.integers(args.long[0], args.long[1] + 1)), True
    return int(rng.integers(args.short[0], args.short[1] + 1)), False


def prompt_for(i: int, rng: np.random.Generator) -> str:
    # The request number comes first, so no two prompts share a prefix block.
    topic = TOPICS[int(rng.integers(len(TOPICS)))]
    extra = " Be thorough, give examples and explain each step." * int(rng.integers(0, 4))
    return f"#{i}. Write about {topic}.{extra}"


def mean_output(args: argparse.Namespace) -> float:
    return ((1 - args.long_fraction) * (args.short[0] + args.short[1]) / 2
            + args.long_fraction * (args.long[0] + args.long[1]) / 2)


def make_trace(rate: float, args: argparse.Namespace) -> list[TraceRequest]:
    rng = np.random.default_rng(args.seed)
    trace, t, i = [], 0.0, 0
    while True:
        t += float(rng.exponential(1.0 / rate))
        if t > args.duration:
            return trace
        n, long = draw_length(rng, args)
        trace.append(TraceRequest(i, t, prompt_for(i, rng), n, long))
        i += 1


def request_of(model: str, prompt: str, max_tokens: int) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(model=model, text=prompt, max_tokens=max_tokens,
                                        sampling=generate_pb2.SamplingParams(temperature=0),
                                        stop=generate_pb2.StopConditions(ignore_eos=True))


# ---- the stack -------------------------------------------------------------------------
def stack_spec(args: argparse.Namespace, policy: str, log_dir: Path) -> StackSpec:
    return StackSpec(models_dir=args.models_dir, replicas={args.model: args.replicas}, http_port=-1,
                     max_batch_size=args.max_batch_size, worker_threads=args.worker_threads, balancing=policy,
                     batcher_args=("--token-budget", str(args.token_budget)), log_dir=log_dir)


async def warm_up(address: str, args: argparse.Namespace) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)

        async def one(i: int) -> None:
            async for _ in stub.Generate(request_of(args.model, f"warm-up {i}: say hello", 8)):
                pass
        await asyncio.gather(*(one(i) for i in range(2 * args.replicas)))


async def capacity(address: str, args: argparse.Namespace) -> float:
    """Output tokens/s with every batch slot busy, the trace's length mix, after a warm-up."""
    clients = args.replicas * args.max_batch_size
    warm, window = args.capacity_s * 0.25, args.capacity_s
    counted = 0
    t0 = time.perf_counter()
    stop = t0 + warm + window
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)

        async def client(c: int) -> None:
            nonlocal counted
            rng = np.random.default_rng(10_000 + c)
            k = 0
            while time.perf_counter() < stop:
                n, _ = draw_length(rng, args)
                call = stub.Generate(request_of(args.model, prompt_for(100_000 + c * 1000 + k, rng), n))
                k += 1
                async for event in call:
                    now = time.perf_counter()
                    if event.HasField("tokens") and t0 + warm <= now < stop:
                        counted += len(event.tokens.token_ids)
                    if now >= stop:
                        call.cancel()
                        return

        with console.status(f"capacity: {clients} clients, {warm:.0f} s warm-up + {window:.0f} s window…"):
            await asyncio.gather(*(client(c) for c in range(clients)), return_exceptions=True)
    return counted / window


async def replay(address: str, nats_url: str, trace: list[TraceRequest], args: argparse.Namespace,
                 run: PolicyRun, progress: Progress, nats_kwargs: dict | None = None) -> None:
    task = progress.add_task(f"{run.policy}", total=len(trace))
    nc = await nats.connect(nats_url, **(nats_kwargs or {}))  # the stack's observer user
    t0 = time.monotonic()

    async def on_load(msg: object) -> None:
        r = bus_pb2.LoadReport.FromString(msg.data)  # type: ignore[attr-defined]
        run.samples.append((time.monotonic() - t0, r.replica_id, r.running, r.queue_depth, r.tokens_in_flight))

    await nc.subscribe(subjects.LOAD_ALL, cb=on_load)
    results = {r.index: Result(r.index, r.long, r.max_tokens) for r in trace}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)

        async def one(req: TraceRequest) -> None:
            res = results[req.index]
            await asyncio.sleep(max(0.0, t0 + req.at_s - time.monotonic()))
            start = time.perf_counter()
            try:
                async for event in stub.Generate(request_of(args.model, req.prompt, req.max_tokens)):
                    kind = event.WhichOneof("event")
                    if kind == "tokens":
                        if res.tokens == 0:
                            res.ttft_s = time.perf_counter() - start
                        res.tokens += len(event.tokens.token_ids)
                    elif kind == "final":
                        res.e2e_s = time.perf_counter() - start
                        res.replica = event.final.replica_id
                        res.queue_wait_s = event.final.timings.queue_wait_s
                    else:
                        res.error = generate_pb2.ErrorCode.Name(event.error.code) + ": " + event.error.message
            except grpc.aio.AioRpcError as exc:
                res.error = f"{exc.code().name}: {exc.details()}"
            finally:
                progress.advance(task)

        tasks = [asyncio.create_task(one(r)) for r in trace]
        _, pending = await asyncio.wait(tasks, timeout=args.duration + args.drain_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for res in results.values():
        if res.e2e_s != res.e2e_s and not res.error:
            res.error = "unfinished at the drain deadline"
    run.results = sorted(results.values(), key=lambda r: r.index)
    run.wall_s = time.monotonic() - t0
    await nc.close()
    progress.remove_task(task)


def run_policy(policy: str, trace: list[TraceRequest], args: argparse.Namespace, log_root: Path,
               progress: Progress) -> PolicyRun:
    run = PolicyRun(policy)
    log_dir = log_root / policy
    log_dir.mkdir(parents=True, exist_ok=True)
    before = os.getloadavg()[0]
    try:
        with LocalStack(stack_spec(args, policy, log_dir)) as stack:
            asyncio.run(warm_up(stack.router_address, args))
            assert stack.nats is not None
            asyncio.run(replay(stack.router_address, stack.nats.url, trace, args, run, progress, stack.nats_observer))
    except (RuntimeError, TimeoutError) as exc:  # e.g. a policy name this router does not know
        run.failed = str(exc)
        console.print(f"[red]{policy}: stack failed: {exc}[/red]")
    run.load_avg = (before, os.getloadavg()[0])
    return run


# ---- reporting -------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def summarize(run: PolicyRun, args: argparse.Namespace) -> dict[str, object]:
    ok = [r for r in run.results if not r.error]
    ttft = [r.ttft_s for r in ok]
    e2e = [r.e2e_s for r in ok]
    replicas = sorted({r.replica for r in ok})
    # Time with some replica queueing (held > batch cap) while another had a free slot.
    by_t: dict[int, dict[str, int]] = {}
    for t, rid, running, queued, _ in run.samples:
        by_t.setdefault(int(t / 0.5), {})[rid] = running + queued
    both = [v for v in by_t.values() if len(v) == args.replicas]
    misplaced = sum(1 for v in both if max(v.values()) > args.max_batch_size and min(v.values()) < args.max_batch_size)
    return {
        "policy": run.policy, "n": len(run.results), "errors": len(run.results) - len(ok),
        "ttft": [pct(ttft, q) for q in (50, 95, 99)], "e2e": [pct(e2e, q) for q in (50, 95, 99)],
        "short_e2e_p99": pct([r.e2e_s for r in ok if not r.long], 99),
        "long_e2e_p99": pct([r.e2e_s for r in ok if r.long], 99),
        "short_ttft_p99": pct([r.ttft_s for r in ok if not r.long], 99),
        "queue_wait": [pct([r.queue_wait_s for r in ok], q) for q in (50, 99)],
        "per_replica": {rid: (sum(1 for r in ok if r.replica == rid), sum(1 for r in ok if r.replica == rid and r.long))
                        for rid in replicas},
        "misplaced_share": misplaced / len(both) if both else float("nan"),
        "exact_lengths": all(r.tokens == r.max_tokens for r in ok),
        "load_avg": run.load_avg,
    }


def print_tables(summaries: list[dict[str, object]], args: argparse.Namespace, title: str) -> list[str]:
    base = next((s for s in summaries if s["policy"] == "round_robin"), summaries[0])
    table = Table(title=title)
    cols = ("policy", "TTFT p50 / p95 / p99 s", "e2e p50 / p95 / p99 s", "e2e p99 vs RR", "TTFT p99 vs RR",
            "short e2e p99 s", "long e2e p99 s", "queue wait p50 / p99 s", "requests (long) per replica",
            "queueing while a slot is free", "errors", "load avg before→after")
    for c in cols:
        table.add_column(c, justify="right")
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in summaries:
        ttft, e2e, qw = s["ttft"], s["e2e"], s["queue_wait"]  # type: ignore[misc]
        per = s["per_replica"]  # type: ignore[assignment]
        row = [str(s["policy"]),
               " / ".join(f"{v:.2f}" for v in ttft), " / ".join(f"{v:.1f}" for v in e2e),  # type: ignore[union-attr]
               f"{base['e2e'][2] / e2e[2]:.2f}× lower", f"{base['ttft'][2] / ttft[2]:.2f}× lower",  # type: ignore[index]
               f"{s['short_e2e_p99']:.1f}", f"{s['long_e2e_p99']:.1f}",
               f"{qw[0]:.2f} / {qw[1]:.1f}",  # type: ignore[index]
               " · ".join(f"{n} ({k})" for n, k in per.values()),  # type: ignore[union-attr]
               f"{s['misplaced_share']:.0%}", str(s["errors"]),
               "{:.1f}→{:.1f}".format(*s["load_avg"])]  # type: ignore[str-format]
        table.add_row(*row)
        md.append("| " + " | ".join(row) + " |")
    console.print(table)
    return md


def plot(runs: list[PolicyRun], summaries: list[dict[str, object]], args: argparse.Namespace, rate: float) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.images.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 2.6 * len(runs)), sharex=True, sharey=True, squeeze=False)
    for ax, run, s in zip(axes[:, 0], runs, summaries):
        for rid in sorted({x[1] for x in run.samples}):
            pts = [(t, running + queued) for t, r, running, queued, _ in run.samples if r == rid]
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", label=f"{rid} running+queued", lw=1.2)
        ax.axhline(args.max_batch_size, color="grey", ls="--", lw=1, label="batch cap (above = queued)")
        e2e = s["e2e"]  # type: ignore[assignment]
        ax.set_title(f"{run.policy}: e2e p99 {e2e[2]:.1f} s, TTFT p99 {s['ttft'][2]:.2f} s", fontsize=10)  # type: ignore[index]
        ax.set_ylabel("requests held")
        ax.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds since the trace started")
    fig.suptitle(f"Per-replica load, same trace ({rate:.2f} req/s Poisson, {args.replicas} replicas × batch "
                 f"{args.max_batch_size})", fontsize=11)
    fig.tight_layout()
    load_png = args.images / "balancing-load.png"
    fig.savefig(load_png, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        ok = [r for r in run.results if not r.error]
        for ax, key in zip(axes, ("ttft_s", "e2e_s")):
            v = np.sort([getattr(r, key) for r in ok])
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=run.policy)
    for ax, name in zip(axes, ("time to first token (s)", "end-to-end (s)")):
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.axhline(0.99, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Latency CDFs, same trace for every policy (dotted: p99)", fontsize=11)
    fig.tight_layout()
    cdf_png = args.images / "balancing-cdf.png"
    fig.savefig(cdf_png, dpi=110)
    plt.close(fig)
    return [load_png, cdf_png]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=["round_robin", "least_loaded", "power_of_two"],
                        help="router --balancing names, each run on a fresh stack (round_robin is the baseline)")
    parser.add_argument("--model", default="smollm2-135m-instruct-int4")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--load", type=float, default=0.75, help="arrival rate as a fraction of measured capacity")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s instead of measuring capacity")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of arrivals")
    parser.add_argument("--drain-s", type=float, default=240.0, help="most seconds to wait for stragglers")
    parser.add_argument("--capacity-s", type=float, default=40.0, help="closed-loop measuring window")
    parser.add_argument("--long-fraction", type=float, default=0.10)
    parser.add_argument("--short", type=int, nargs=2, default=[4, 32], metavar=("MIN", "MAX"))
    parser.add_argument("--long", type=int, nargs=2, default=[512, 576], metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--images", type=Path, default=Path("docs/images"))
    parser.add_argument("--results", type=Path, default=Path("runs/balancing.json"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 30 s of arrivals, 12 s capacity window")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.capacity_s, args.drain_s = 30.0, 12.0, 120.0
        args.images = args.images / "quick"
    log_root = Path(tempfile.mkdtemp(prefix="bench-balancing-"))
    console.print(f"{platform.node()}: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; logs in {log_root}")

    rate = args.rate
    tok_s = 0.0
    if not rate:
        cap_policy = "least_loaded" if "least_loaded" in args.policies else args.policies[0]
        (log_root / "capacity").mkdir()
        with LocalStack(stack_spec(args, cap_policy, log_root / "capacity")) as stack:
            asyncio.run(warm_up(stack.router_address, args))
            tok_s = asyncio.run(capacity(stack.router_address, args))
        rate = args.load * tok_s / mean_output(args)
        console.print(f"capacity: {tok_s:.0f} output tokens/s with {args.replicas}×{args.max_batch_size} slots busy "
                      f"= {tok_s / mean_output(args):.2f} req/s at {mean_output(args):.1f} mean output tokens; "
                      f"trace at {args.load:.0%}: {rate:.2f} req/s")
    trace = make_trace(rate, args)
    n_long = sum(r.long for r in trace)
    console.print(f"trace: {len(trace)} requests over {args.duration:.0f} s ({n_long} long), seed {args.seed}")

    runs: list[PolicyRun] = []
    with Progress(console=console, transient=True) as progress:
        for policy in args.policies:
            run = run_policy(policy, trace, args, log_root, progress)
            console.print(f"{policy}: done in {run.wall_s:.0f} s, load average {run.load_avg[0]:.1f}→{run.load_avg[1]:.1f}")
            runs.append(run)
    runs = [r for r in runs if not r.failed]
    summaries = [summarize(r, args) for r in runs]
    title = (f"{args.model}, {args.replicas} replicas × batch {args.max_batch_size}, {len(trace)} requests "
             f"({n_long} long) at {rate:.2f} req/s ({args.load:.0%} of {tok_s:.0f} tok/s capacity), "
             f"{platform.node()} {os.cpu_count()} cores")
    md = print_tables(summaries, args, title)
    console.print("\n".join(md), markup=False, highlight=False)
    for s in summaries:
        if not s["exact_lengths"]:
            console.print(f"[yellow]{s['policy']}: some outputs differ from the drawn length[/yellow]")
    images = plot(runs, summaries, args, rate)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "capacity_tok_s": tok_s, "rate": rate, "summaries": summaries,
        "runs": [{"policy": r.policy, "results": [asdict(x) for x in r.results], "samples": r.samples} for r in runs],
    }, indent=1))
    console.print(f"plots: {', '.join(map(str, images))}; raw results: {args.results}")


if __name__ == "__main__":
    main()
