"""Cache-aware routing against round-robin and least-loaded, on multi-turn conversations.

Sessions share a long system prompt and each holds a conversation whose history grows turn
by turn (to ~1,000 tokens by the last turn). Every turn is a new request carrying the whole
history, as chat clients send it. The same seeded trace — session arrivals, user messages,
think times — is replayed against a fresh stack per policy (caches start empty); every worker
has the same prefix cache, so only the router's choice differs. A follow-up turn can reuse
KV only on the replica that served its previous turn.

Reports TTFT p50/p95/p99, end-to-end p50/p99, prompt tokens prefilled vs served from cache,
hit rate and throughput per policy with ratios against round-robin, and plots TTFT by turn.

    .venv/bin/python bench/cache_routing.py                 # 32 sessions × 6 turns, 3 replicas
    .venv/bin/python bench/cache_routing.py --quick         # 8 sessions × 4 turns
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from switchyard.runtime.stack import LocalStack, StackSpec
from switchyard.v1 import generate_pb2, generate_pb2_grpc

console = Console(width=200)
MODEL = "smollm2-135m-instruct-int4"
IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"

SYSTEM_PROMPT = (
    "You are the support assistant of Northwind Rail, a regional train operator. Follow these rules. "
    "Answer in at most three short sentences. Be polite and concrete. Tickets: single, return, day pass "
    "and monthly pass; children under five travel free; students get 30 percent off monthly passes with "
    "a valid card. Refunds: unused tickets are refunded in full up to one hour before departure, and at "
    "half price after that until the train leaves; day passes are refunded only if unused. Delays: a delay "
    "of more than thirty minutes gives a voucher worth a quarter of the fare, more than an hour half the "
    "fare, and a cancelled train the whole fare. Bicycles travel free outside the peak hours from seven to "
    "nine in the morning and from four to seven in the evening. Dogs travel free on a lead. Lost property "
    "is kept for thirty days at the central station. Never invent timetables; point to the journey planner "
    "instead. Never ask for card numbers. If a question is about safety, tell the person to contact staff "
    "on the train or call the emergency number. Stations with step-free access: Central, Harbour, "
    "University, Airport and Old Town. Wi-Fi is free on every train; power sockets are in every carriage "
    "except on the old class 150 units. Quiet coaches are the first and the last carriage. Food trolleys run "
    "on the coastal line only. Season tickets can be paused for up to four weeks a year for illness."
)
TOPICS = ["refunds", "delays", "bicycles", "dogs", "student passes", "lost property", "step-free access",
          "quiet coaches", "Wi-Fi", "food on board", "pausing a season ticket", "children's fares"]
OPENERS = ["Hello, I have a question about {t}.", "Hi! Could you explain the rules on {t}?",
           "Good morning. My trip tomorrow involves {t}; what should I know?",
           "I am travelling with family next week and wonder about {t}."]
FOLLOW_UPS = ["What if my train is {n} minutes late?", "Does that also apply on the coastal line?",
              "And if I booked the ticket {n} days ago?", "Is there anything different at the Airport station?",
              "Can you say that again more briefly?", "What happens with a monthly pass in that case?",
              "My friend says it is different for groups of {n}; is that right?",
              "Could you also tell me about {t}?"]


@dataclass
class Turn:
    user: str
    think_s: float  # pause before sending this turn (after the previous answer)


@dataclass
class Session:
    start_s: float  # offset of the first turn from the start of the run
    turns: list[Turn]


@dataclass
class Result:
    session: int
    turn: int
    ttft_s: float
    e2e_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    replica: str
    ok: bool = True
    error: str = ""


@dataclass
class PolicyRun:
    policy: str
    wall_s: float
    results: list[Result] = field(default_factory=list)


def make_trace(sessions: int, turns: int, arrival_rate: float, think_mean_s: float, seed: int) -> list[Session]:
    """Seeded: every policy replays exactly these sessions."""
    rng = random.Random(seed)
    out: list[Session] = []
    t = 0.0
    for _ in range(sessions):
        t += rng.expovariate(arrival_rate)
        topic = rng.choice(TOPICS)
        msgs = [rng.choice(OPENERS).format(t=topic)]
        for _ in range(turns - 1):
            msgs.append(rng.choice(FOLLOW_UPS).format(n=rng.randint(2, 90), t=rng.choice(TOPICS)))
        out.append(Session(t, [Turn(m, rng.expovariate(1 / think_mean_s) if i else 0.0) for i, m in enumerate(msgs)]))
    return out


async def run_session(stub: generate_pb2_grpc.GenerationStub, index: int, session: Session, max_tokens: int,
                      t0: float, results: list[Result], progress: Progress, task: int) -> None:
    await asyncio.sleep(max(0.0, t0 + session.start_s - time.perf_counter()))
    history = [generate_pb2.ChatMessage(role="system", content=SYSTEM_PROMPT)]
    for k, turn in enumerate(session.turns):
        await asyncio.sleep(turn.think_s)
        history.append(generate_pb2.ChatMessage(role="user", content=turn.user))
        request = generate_pb2.GenerateRequest(
            model=MODEL, chat=generate_pb2.ChatInput(messages=history), max_tokens=max_tokens,
            sampling=generate_pb2.SamplingParams(temperature=0.0), session_id=f"s{index}")
        start = time.perf_counter()
        first: float | None = None
        text: list[str] = []
        try:
            async for event in stub.Generate(request, timeout=300):
                if event.HasField("tokens"):
                    first = first or time.perf_counter()
                    text.append(event.tokens.text)
                elif event.HasField("final"):
                    f = event.final
                    results.append(Result(index, k, (first or time.perf_counter()) - start, time.perf_counter() - start,
                                          f.usage.prompt_tokens, f.usage.cached_prompt_tokens,
                                          f.usage.completion_tokens, f.replica_id))
        except grpc.aio.AioRpcError as exc:
            results.append(Result(index, k, 0.0, time.perf_counter() - start, 0, 0, 0, "", False, exc.details() or ""))
            progress.advance(task, len(session.turns) - k)
            return
        history.append(generate_pb2.ChatMessage(role="assistant", content="".join(text)))
        progress.advance(task)


async def replay(address: str, trace: list[Session], max_tokens: int, progress: Progress, label: str) -> tuple[list[Result], float]:
    results: list[Result] = []
    task = progress.add_task(label, total=sum(len(s.turns) for s in trace))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        t0 = time.perf_counter()
        await asyncio.gather(*(run_session(stub, i, s, max_tokens, t0, results, progress, task)
                               for i, s in enumerate(trace)))
        return results, time.perf_counter() - t0


async def warm_up(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        # Not the benchmark's system prompt: the caches stay cold for the run.
        req = generate_pb2.GenerateRequest(model=MODEL, text="Warm up the engine.", max_tokens=4)
        for _ in range(6):
            async for _event in stub.Generate(req, timeout=120):
                pass


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def shared_prefix_tokens(models_dir: Path) -> int:
    """Tokens of the rendered system turn: the prefix every request shares, which every
    replica caches whatever the routing (so it says nothing about routing)."""
    from switchyard.model.catalog import ModelCatalog
    entry = ModelCatalog(models_dir).get(MODEL)
    assert entry is not None
    return len(entry.encode(entry.render_chat([("system", SYSTEM_PROMPT)]))) - 4  # less the generation prompt


def summarize(run: PolicyRun, shared: int) -> dict[str, float]:
    ok = [r for r in run.results if r.ok]
    follow = [r for r in ok if r.turn > 0]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    history = sum(max(r.prompt_tokens - shared, 0) for r in follow)
    history_cached = sum(max(r.cached_tokens - shared, 0) for r in follow)
    return {
        "history_hit_rate": history_cached / history if history else 0.0,
        "requests": len(run.results), "errors": len(run.results) - len(ok),
        "ttft_p50": pct([r.ttft_s for r in ok], 50), "ttft_p95": pct([r.ttft_s for r in ok], 95),
        "ttft_p99": pct([r.ttft_s for r in ok], 99),
        "followup_ttft_p50": pct([r.ttft_s for r in follow], 50),
        "e2e_p50": pct([r.e2e_s for r in ok], 50), "e2e_p99": pct([r.e2e_s for r in ok], 99),
        "prompt_tokens": prompt, "cached_tokens": cached, "prefilled_tokens": prompt - cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "tokens_per_s": sum(r.completion_tokens for r in ok) / run.wall_s, "wall_s": run.wall_s,
        "max_prompt_tokens": max((r.prompt_tokens for r in ok), default=0),
    }


def plot(runs: list[PolicyRun], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        ok = [r for r in run.results if r.ok]
        ttfts = np.sort([r.ttft_s * 1e3 for r in ok])
        ax1.plot(ttfts, np.arange(1, len(ttfts) + 1) / len(ttfts), label=run.policy)
        turns = sorted({r.turn for r in ok})
        ax2.plot([t + 1 for t in turns], [pct([r.ttft_s * 1e3 for r in ok if r.turn == t], 50) for t in turns],
                 marker="o", label=run.policy)
    ax1.set_xscale("log")
    ax1.set_xlabel("time to first token (ms, log)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("TTFT distribution")
    ax1.legend()
    ax2.set_xlabel("turn of the conversation")
    ax2.set_ylabel("TTFT p50 (ms)")
    ax2.set_title("TTFT as histories grow")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--policies", nargs="+", default=["round_robin", "least_loaded", "prefix_aware"])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=48, help="answer length per turn")
    parser.add_argument("--arrival-rate", type=float, default=1.0, help="new sessions per second")
    parser.add_argument("--think-s", type=float, default=1.0, help="mean pause between turns")
    parser.add_argument("--cache-mib", type=int, default=512, help="prefix cache per worker")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="8 sessions × 4 turns")
    parser.add_argument("--out", type=Path, default=None, help="write the raw results here as JSON")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.turns = 8, 4
    if not (args.models_dir / MODEL).exists():
        console.print(f"[red]{args.models_dir / MODEL} is missing: run `make model`[/red]")
        return 2
    trace = make_trace(args.sessions, args.turns, args.arrival_rate, args.think_s, args.seed)
    runs: list[PolicyRun] = []
    with Progress(console=console) as progress:
        for policy in args.policies:
            spec = StackSpec(models_dir=args.models_dir, replicas={MODEL: args.replicas}, http_port=-1,
                             max_batch_size=args.max_batch, balancing=policy, metrics=False,
                             log_dir=Path(tempfile.mkdtemp(prefix=f"bench-cache-{policy}-")),
                             extra_env={"SWITCHYARD_PREFIX_CACHE_MIB": str(args.cache_mib)})
            with LocalStack(spec) as stack:
                asyncio.run(warm_up(stack.router_address))
                results, wall = asyncio.run(replay(stack.router_address, trace, args.max_tokens, progress, policy))
            runs.append(PolicyRun(policy, wall, results))
    shared = shared_prefix_tokens(args.models_dir)
    stats = {run.policy: summarize(run, shared) for run in runs}
    base = stats.get("round_robin")
    table = Table(title=f"Cache-aware routing: {args.sessions} sessions × {args.turns} turns, {args.replicas} replicas "
                        f"of {MODEL}, {args.max_tokens}-token answers ({platform.node()}, {os.cpu_count()} cores)")
    for col in ("policy", "TTFT p50 ms", "p95", "p99", "follow-up TTFT p50", "e2e p50 / p99 ms", "prefilled tokens",
                "hit rate", "history hit rate", "tok/s", "errors", "TTFT p50 vs RR", "hit rate vs RR",
                "history hit rate vs RR"):
        table.add_column(col, justify="right")
    for policy, s in stats.items():
        table.add_row(policy, f"{s['ttft_p50']*1e3:.0f}", f"{s['ttft_p95']*1e3:.0f}", f"{s['ttft_p99']*1e3:.0f}",
                      f"{s['followup_ttft_p50']*1e3:.0f}", f"{s['e2e_p50']*1e3:.0f} / {s['e2e_p99']*1e3:.0f}",
                      f"{s['prefilled_tokens']:,}", f"{s['hit_rate']:.1%}", f"{s['history_hit_rate']:.1%}",
                      f"{s['tokens_per_s']:.0f}", str(s["errors"]),
                      f"{base['ttft_p50'] / s['ttft_p50']:.2f}× lower" if base else "-",
                      f"{s['hit_rate'] / base['hit_rate']:.2f}×" if base and base["hit_rate"] else "-",
                      f"{s['history_hit_rate'] / base['history_hit_rate']:.2f}×" if base and base["history_hit_rate"] else "-")
    console.print(table)
    console.print(f"longest prompt: {max(s['max_prompt_tokens'] for s in stats.values())} tokens; shared system "
                  f"prefix: {shared} tokens (history hit rate = follow-up turns' tokens beyond it served from cache)")
    IMAGES.mkdir(parents=True, exist_ok=True)
    plot(runs, IMAGES / "cache-routing-ttft.png")
    console.print(f"plot: {IMAGES / 'cache-routing-ttft.png'}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "stats": stats,
                                        "results": {r.policy: [asdict(x) for x in r.results] for r in runs}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
