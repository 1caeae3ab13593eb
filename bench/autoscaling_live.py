"""Predictive vs reactive autoscaling on the live local stack, beside the simulator's prediction.

The issue's third benchmark: the same comparison as bench/autoscaling_sim.py, but on real
processes — a LocalStack serving the real int4 SmolLM2 model (the tiny test model only if that
is missing, with a loud note), the autoscaler service's loop (`AutoscalerThread`, as `switchyard
up --autoscale` runs it) driving the local lifecycle backend, and an open-loop gRPC client
replaying a spiky arrival trace. Then the simulator (`switchyard.autoscaling.simulator`, the
same policy objects) replays the *same* arrivals with a fleet calibrated from figures measured
in this run, and both are printed side by side.

Phases, all in one invocation:

1. Calibration stack (one replica): TTFT and decode rate of a single stream; completions/s with
   every slot busy (the service rate per replica, fed to the live policies and to the
   simulator); a cold start of a replica added through the lifecycle API (the figure the
   autoscaler measures, fed to it as its starting cold start); completions/s of two replicas
   together (how far two replicas are from twice one on this machine — the simulator assumes
   they add up).
2. For each policy, a fresh stack starting at one replica, the autoscaler (min 1, max
   `--max-replicas`), the trace replayed: per request TTFT (first streamed token at the client)
   and errors; replicas asked for / ready, sampled every 0.25 s; the autoscaler's decisions.
3. The simulator on the same arrivals, fleet calibrated from phase 1 and the cold starts the
   autoscaler measured in phase 2.

The trace is the simulator's generator (`TraceSpec`) compressed in time: 120 s with two ×2.5
spikes that ramp up in 6 and 10 s, the base rate 0.4 of the measured service rate. A real cold
start here is ~1 s, shorter than a spike's ramp, so the replicas' workers wait `--start-delay-s` after
loading the model (the worker's TEST-ONLY `--fault-start-delay-s`) — a stand-in for a
production-size model's load; the cold start used everywhere is the one measured with it.

    .venv/bin/python bench/autoscaling_live.py --markdown --plot docs/img/autoscaling_live.png
    .venv/bin/python bench/autoscaling_live.py --policies reactive --duration 40   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from services.autoscaler.config import AutoscalerConfig  # noqa: E402
from services.autoscaler.server import AutoscalerThread  # noqa: E402
from switchyard.autoscaling import make_scaling_policy  # noqa: E402
from switchyard.autoscaling.policy import ScalingLimits  # noqa: E402
from switchyard.autoscaling.simulator import Arrival, FleetModel, SimResult, Spike, TraceSpec, generate_arrivals, simulate  # noqa: E402
from switchyard.config import load_config  # noqa: E402
from switchyard.runtime.lifecycle import DRAINING, READY, STARTING, LocalFleetBackend  # noqa: E402
from switchyard.runtime.stack import LocalStack, StackSpec  # noqa: E402
from switchyard.v1 import generate_pb2, generate_pb2_grpc  # noqa: E402

console = Console(width=200)
REAL = "smollm2-135m-instruct-int4"
TINY = "tiny-llama"
RATE_WINDOW_S = 10.0  # the router's demand window (services/router/demand.py): the simulator uses the same


# ---- the client --------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One request as the client saw it (times relative to the trace's start)."""

    arrival: float
    prompt_tokens: int
    output_tokens: int
    first_token: float | None = None
    done: float | None = None
    error: str = ""
    replica: str = ""
    tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None or self.error else self.first_token - self.arrival


VOCAB = [49152]  # set from the model's manifest in main()


def prompt_ids(i: int, n: int, seed: int) -> list[int]:
    """Distinct random token ids per request: no prefix-cache hit (the simulator has no cache)."""
    rng = np.random.default_rng(seed * 1_000_003 + i)
    return [int(x) for x in rng.integers(min(300, VOCAB[0] // 4), VOCAB[0] - 1, size=n)]


async def replay(address: str, model: str, arrivals: list[Arrival], timeout_s: float, seed: int, t0: float,
                 metadata: tuple[tuple[str, str], ...] = ()) -> list[Outcome]:
    """Open loop: each request is sent at `t0` (time.monotonic) + its arrival time whatever the
    others are doing, and streamed; TTFT is the first token chunk at the client."""
    loop = asyncio.get_running_loop()  # its clock is time.monotonic
    outcomes = [Outcome(a.t, a.prompt_tokens, a.output_tokens) for a in arrivals]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)

        async def one(i: int, out: Outcome) -> None:
            await asyncio.sleep(max(0.0, t0 + out.arrival - loop.time()))
            req = generate_pb2.GenerateRequest(
                model=model, token_ids=generate_pb2.TokenIds(ids=prompt_ids(i, out.prompt_tokens, seed)),
                max_tokens=out.output_tokens, stop=generate_pb2.StopConditions(ignore_eos=True))
            try:
                async for resp in stub.Generate(req, timeout=timeout_s, metadata=metadata):
                    kind = resp.WhichOneof("event")
                    if kind == "tokens":
                        out.tokens += len(resp.tokens.token_ids)
                        if out.first_token is None:
                            out.first_token = loop.time() - t0
                    elif kind == "final":
                        out.replica = resp.final.replica_id
                    elif kind == "error":
                        out.error = f"{generate_pb2.ErrorCode.Name(resp.error.code)}: {resp.error.message}"
            except grpc.aio.AioRpcError as exc:
                out.error = f"{exc.code().name}: {exc.details()}"
            out.done = loop.time() - t0
            if not out.error and out.tokens != out.output_tokens:
                out.error = f"short: {out.tokens} of {out.output_tokens} tokens"

        await asyncio.gather(*(one(i, o) for i, o in enumerate(outcomes)))
    return outcomes


def closed_loop(address: str, model: str, clients: int, seconds: float, prompt: int, output: int,
                seed: int, warmup_s: float = 2.0) -> float:
    """`clients` streams back to back for `seconds`: completions/s in steady state, read as the
    output tokens streamed after `warmup_s` (the batch filled) per second over the output length
    (finer than counting completions, which come in bursts of a whole batch)."""
    stamps: list[tuple[float, int]] = []
    stop = time.monotonic() + seconds
    start = time.monotonic() + warmup_s

    def client(c: int) -> None:
        with grpc.insecure_channel(address) as ch:
            stub = generate_pb2_grpc.GenerationStub(ch)
            n = 0
            while time.monotonic() < stop:
                n += 1
                req = generate_pb2.GenerateRequest(
                    model=model, token_ids=generate_pb2.TokenIds(ids=prompt_ids(10_000 * (c + 1) + n, prompt, seed + 7)),
                    max_tokens=output, stop=generate_pb2.StopConditions(ignore_eos=True))
                for resp in stub.Generate(req, timeout=120):
                    if resp.WhichOneof("event") == "tokens":
                        stamps.append((time.monotonic(), len(resp.tokens.token_ids)))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens = sum(n for t, n in stamps if start <= t <= stop)
    return tokens / (stop - start) / output


def single_stream(address: str, model: str, prompt: int, output: int, seed: int, runs: int = 3) -> tuple[float, float]:
    """(TTFT s, decode tokens/s) of one stream alone, medians of `runs`."""
    ttfts, rates = [], []
    with grpc.insecure_channel(address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        for i in range(runs):
            req = generate_pb2.GenerateRequest(
                model=model, token_ids=generate_pb2.TokenIds(ids=prompt_ids(900 + i, prompt, seed + 3)),
                max_tokens=output, stop=generate_pb2.StopConditions(ignore_eos=True))
            sent, first, n = time.monotonic(), None, 0
            for resp in stub.Generate(req, timeout=120):
                if resp.WhichOneof("event") == "tokens":
                    n += len(resp.tokens.token_ids)
                    first = first or time.monotonic()
            end = time.monotonic()
            assert first is not None and n == output, f"single stream got {n} of {output} tokens"
            ttfts.append(first - sent)
            rates.append((n - 1) / (end - first))
    return statistics.median(ttfts), statistics.median(rates)


# ---- the stack ---------------------------------------------------------------------------------
def stack_spec(models_dir: Path, model: str, slots: int, log_dir: Path) -> StackSpec:
    """One replica to start with; one ONNX Runtime thread per worker, so two replicas can use
    the two cores; the router holds a request up to 30 s for a replica (never at zero here)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    return StackSpec(models_dir=models_dir, replicas={model: 1}, max_batch_size=slots, worker_threads=1,
                     heartbeat_s=0.25, metrics=False, balancing="least_loaded", log_dir=log_dir,
                     router_args=("--demand-interval-s", "0.5", "--heartbeat-misses", "10", "--replica-wait-s", "30"))


def delay_added_replicas(stack: LocalStack, model: str, start_delay_s: float) -> None:
    """From now on, replicas added to `stack` (the lifecycle backend spawns them from its spec)
    wait `start_delay_s` after loading the model before serving; the one it started with did not."""
    if start_delay_s:
        stack.spec.worker_args = {model: ("--fault-start-delay-s", str(start_delay_s))}


@dataclass
class Calibration:
    slots: int
    prompt_tokens: int
    output_tokens: int
    ttft_1_s: float
    decode_1_tok_s: float
    service_rate_1: float  # completions/s, one replica, every slot busy
    service_rate_2: float  # completions/s, two replicas together
    cold_start_s: float  # one replica added through the lifecycle API: process start → serving

    @property
    def prefill_cost(self) -> float:
        """Decode-token units per prompt token (the simulator's unit of work)."""
        return self.ttft_1_s * self.decode_1_tok_s / self.prompt_tokens

    def fleet(self, cold_start_s: float, slo_s: float, timeout_s: float, shared: bool = False) -> FleetModel:
        """The simulator's replica: single-stream rate at batch 1, and at full batch the rate that
        reproduces the measured completions/s for requests of the calibration's size. `shared`:
        two busy replicas together complete what two were measured to (they share the cores)."""
        work = self.prompt_tokens * self.prefill_cost + self.output_tokens
        full = max(self.service_rate_1 * work, self.decode_1_tok_s * 1.0001)
        points = ((1, self.decode_1_tok_s), (self.slots, full)) if self.slots > 1 else ((1, full),)
        return FleetModel(slots_per_replica=self.slots, batch_points=points, prefill_cost=self.prefill_cost,
                          cold_start_s=cold_start_s, queue_timeout_s=timeout_s, ttft_slo_s=slo_s,
                          replica_scaling=(1.0, self.service_rate_2 / self.service_rate_1) if shared else ())


def calibrate(models_dir: Path, model: str, args: argparse.Namespace, log_dir: Path) -> Calibration:
    spec = stack_spec(models_dir, model, args.slots, log_dir / "calibration")
    with LocalStack(spec) as stack:
        delay_added_replicas(stack, model, args.start_delay_s)
        address = stack.router_address
        single_stream(address, model, args.prompt_tokens, 4, args.seed, runs=2)  # warm-up
        ttft1, rate1 = single_stream(address, model, args.prompt_tokens, args.output_tokens, args.seed)
        sr1 = closed_loop(address, model, args.slots, args.calibrate_s, args.prompt_tokens, args.output_tokens,
                             args.seed)
        backend = LocalFleetBackend(stack, start_timeout_s=120)
        rid = backend.add_replica(model)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rep = next(r for r in backend.replicas(model) if r.replica_id == rid)
            if rep.state == READY:
                break
            if rep.state not in (STARTING, READY):
                raise RuntimeError(f"calibration replica failed to start: {rep.error}")
            time.sleep(0.02)
        cold = rep.cold_start_s
        assert cold is not None, "the added replica did not become ready"
        time.sleep(1.0)  # the router sees its heartbeats
        sr2 = closed_loop(address, model, 2 * args.slots, args.calibrate_s, args.prompt_tokens, args.output_tokens,
                             args.seed + 1)
    return Calibration(args.slots, args.prompt_tokens, args.output_tokens, ttft1, rate1, sr1, sr2, cold)


# ---- one policy, live ------------------------------------------------------------------------------
@dataclass
class LiveRun:
    policy: str
    outcomes: list[Outcome]
    samples: list[tuple[float, int, int, int]]  # (t, starting, ready, draining) every 0.25 s
    decisions: list[tuple[float, str]]  # (t, "N: reason") whenever the decision changed
    cold_starts: list[float] = field(default_factory=list)  # of the replicas the autoscaler added
    duration_s: float = 0.0
    measured_rate: float | None = None  # service rate per replica the autoscaler measured from heartbeats


def run_live(models_dir: Path, model: str, policy: str, arrivals: list[Arrival], calib: Calibration,
             args: argparse.Namespace, options: tuple[str, ...], log_dir: Path) -> LiveRun:
    spec = stack_spec(models_dir, model, args.slots, log_dir / policy)
    with LocalStack(spec) as stack:
        delay_added_replicas(stack, model, args.start_delay_s)
        assert stack.nats is not None
        backend = LocalFleetBackend(stack, start_timeout_s=120)
        creds = stack.nats_credentials("autoscaler")
        config = load_config(AutoscalerConfig, [], nats_url=stack.nats.url, backend="local", grpc_port=0,
                             nats_user=creds.get("user"), nats_password=creds.get("password"),
                             models=(f"{model}=1:{args.max_replicas}:{policy}",), policy_options=options,
                             tick_s=args.tick_s, service_rate_per_replica=calib.service_rate_1,
                             default_cold_start_s=calib.cold_start_s, default_slots=args.slots, heartbeat_misses=10.0)
        samples: list[tuple[float, int, int, int]] = []
        cold: dict[str, float] = {}
        stop = threading.Event()
        with AutoscalerThread(config, backend) as scaler:
            t0_box: list[float] = []

            def sample() -> None:
                while not stop.is_set():
                    reps = backend.replicas(model)
                    now = time.monotonic()
                    if t0_box:
                        samples.append((now - t0_box[0], sum(r.state == STARTING for r in reps),
                                        sum(r.state == READY for r in reps), sum(r.state == DRAINING for r in reps)))
                    for r in reps:
                        if r.state == READY and r.cold_start_s and "-s" in r.replica_id:
                            cold.setdefault(r.replica_id, r.cold_start_s)
                    time.sleep(0.25)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0_box.append(time.monotonic() + 0.5)
            events_from = len(scaler.autoscaler.events)
            outcomes = asyncio.run(replay(stack.router_address, model, arrivals, args.timeout_s, args.seed, t0_box[0]))
            stop.set()
            sampler.join()
            start = t0_box[0]
            decisions = [(e.at - start, e.detail) for e in scaler.autoscaler.events[events_from:]
                         if e.kind == "decision"]
        rates = scaler.autoscaler.models[model].rates
        measured = rates.rate() if rates is not None else None
    return LiveRun(policy, outcomes, samples, decisions, sorted(cold.values()), args.duration, measured)


def live_result(run: LiveRun, slo_s: float, window_s: float) -> SimResult:
    """The live run in the simulator's result shape (same definitions: SLO attainment over
    arrived requests with an error counting as a miss; replica-seconds of replicas asked for,
    ready or draining, over the trace; per-window arrivals, replicas and TTFT p99 with an
    error counted as infinite)."""
    end = run.duration_s
    ttfts = np.array([o.ttft for o in run.outcomes if o.ttft is not None])
    errors = [o for o in run.outcomes if o.error]
    # replicas asked for and not stopped (starting, ready, draining), piecewise constant between samples
    replica_seconds = 0.0
    for (t, s, r, d), (t_next, *_) in zip(run.samples, run.samples[1:]):
        replica_seconds += (s + r + d) * max(0.0, min(t_next, end) - max(t, 0.0))
    n_windows = max(1, math.ceil(end / window_s))
    series: dict[str, list[float]] = {k: [] for k in ("t", "arrival_rate", "ready", "starting", "ttft_p99_s", "dropped")}
    for w in range(n_windows):
        lo, hi = w * window_s, (w + 1) * window_s
        ins = [o for o in run.outcomes if lo <= o.arrival < hi]
        vals = [o.ttft if o.ttft is not None else math.inf for o in ins]
        at_end = [s for s in run.samples if s[0] <= hi]
        last = at_end[-1] if at_end else (0.0, 0, 1, 0)
        series["t"].append(lo)
        series["arrival_rate"].append(len(ins) / window_s)
        series["ready"].append(last[2])
        series["starting"].append(last[1])
        series["ttft_p99_s"].append(float(np.percentile(vals, 99, method="higher")) if vals else float("nan"))
        series["dropped"].append(sum(1 for o in ins if o.error))
    peak = max((s + r for _, s, r, _ in run.samples), default=1)
    return SimResult(policy=f"{run.policy} (live)", arrived=len(run.outcomes),
                     completed=sum(1 for o in run.outcomes if not o.error), dropped=len(errors), in_flight=0,
                     within_slo=int(np.sum(ttfts <= slo_s + 1e-9)) if len(ttfts) else 0,
                     replica_seconds=replica_seconds,
                     ttft_p50_s=float(np.percentile(ttfts, 50)) if len(ttfts) else float("nan"),
                     ttft_p99_s=float(np.percentile(ttfts, 99)) if len(ttfts) else float("nan"),
                     max_replicas=peak, decisions=[(t, int(d.split(":")[0]), d) for t, d in run.decisions],
                     series=series)


# ---- output ------------------------------------------------------------------------------------
def plot(pairs: list[tuple[SimResult, SimResult]], path: Path, slo_s: float, timeout_s: float, title: str) -> None:
    """One column per policy: demand, replicas (ready solid, ready+starting dashed) and TTFT p99
    per window, the live run in colour and the simulator's prediction in grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, len(pairs), figsize=(6 * len(pairs), 8), sharex=True, sharey="row", squeeze=False)
    fig.suptitle(title, fontsize=9)
    top = max(max(r.series["ready"][i] + r.series["starting"][i] for i in range(len(r.series["t"])))
              for pair in pairs for r in pair)
    for col, (sim, live) in enumerate(pairs):
        ax_d, ax_r, ax_t = axes[0][col], axes[1][col], axes[2][col]
        for res, color, label in ((live, f"C{col}", "live"), (sim, "grey", "simulator")):
            t = res.series["t"]
            if label == "live":
                ax_d.step(t, res.series["arrival_rate"], where="post", color="black", lw=1)
            ax_r.step(t, res.series["ready"], where="post", color=color, label=f"{label} ready")
            ax_r.step(t, [a + b for a, b in zip(res.series["ready"], res.series["starting"])], where="post",
                      color=color, ls="--", lw=0.8, label=f"{label} ready+starting")
            p99 = [min(v, timeout_s) if not math.isnan(v) else math.nan for v in res.series["ttft_p99_s"]]
            ax_t.plot(t, p99, color=color, lw=1.2 if label == "live" else 1.0, ls="-" if label == "live" else "--",
                      label=label)
            drops = [(x, timeout_s) for x, d in zip(t, res.series["dropped"]) if d]
            if drops:
                ax_t.scatter(*zip(*drops), marker="x", color=color, label=f"{label} errors")
        ax_d.set_title(live.policy.split()[0], fontsize=10)
        ax_d.set_ylabel("arrivals (req/s)")
        ax_d.set_ylim(bottom=0)
        ax_r.set_ylabel("replicas")
        ax_r.set_ylim(0, top + 0.5)
        ax_r.set_yticks(range(0, int(top) + 1))
        ax_r.legend(fontsize=7)
        ax_t.axhline(slo_s, color="grey", ls=":", lw=0.8)
        ax_t.set_yscale("log")
        ax_t.set_ylabel("TTFT p99 per window (s)")
        ax_t.set_xlabel("seconds")
        ax_t.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def load_raw(path: Path) -> tuple[str, Calibration, list[Arrival], list[LiveRun]]:
    """What --json wrote: the model, the calibration, the arrivals and the live runs."""
    import json
    raw = json.loads(path.read_text())
    duration = float(raw["args"]["duration"])
    runs = [LiveRun(r["policy"], [Outcome(**o) for o in r["outcomes"]], [tuple(x) for x in r["samples"]],  # type: ignore[misc]
                    [tuple(x) for x in r["decisions"]], r["cold_starts"], duration, r["measured_rate"])  # type: ignore[misc]
            for r in raw["runs"]]
    return raw["model"], Calibration(**raw["calibration"]), [Arrival(**a) for a in raw["arrivals"]], runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--model", default=REAL, help="model folder under --models-dir (tiny-llama: built in a temp dir)")
    ap.add_argument("--policies", default="reactive,predictive")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=120.0, help="trace length, s (per policy)")
    ap.add_argument("--base-util", type=float, default=0.4, help="base arrival rate as a share of one replica's measured service rate")
    ap.add_argument("--spike", type=float, default=2.5, help="spike multiplier over the base rate")
    ap.add_argument("--slots", type=int, default=8, help="max batch per replica")
    ap.add_argument("--max-replicas", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=32, help="mean output length (geometric, capped at 3×)")
    ap.add_argument("--start-delay-s", type=float, default=8.0,
                    help="worker TEST-ONLY --fault-start-delay-s: a longer cold start (0: the real ~1 s one)")
    ap.add_argument("--slo-s", type=float, default=1.5, help="TTFT SLO, s")
    ap.add_argument("--timeout-s", type=float, default=30.0, help="client deadline per request (= simulator queue timeout)")
    ap.add_argument("--tick-s", type=float, default=1.0, help="autoscaler decision interval (live and simulated)")
    ap.add_argument("--scale-up-window-s", type=float, default=2.0)
    ap.add_argument("--scale-down-window-s", type=float, default=15.0)
    ap.add_argument("--calibrate-s", type=float, default=10.0, help="seconds of each full-batch calibration run")
    ap.add_argument("--window-s", type=float, default=5.0, help="timeline window, s")
    ap.add_argument("--calibrate-only", action="store_true", help="stop after the calibration (to size a trace)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the calibration, arrivals, outcomes and samples here")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="no live run: redo the simulation, tables and plot from a --json file (pass the same options)")
    args = ap.parse_args()
    started = time.monotonic()

    d = args.duration
    if args.from_json:  # the analysis again from a run's raw data (no processes started)
        model, calib, arrivals, runs = load_raw(args.from_json)
        console.print(f"from {args.from_json}: {model}, {len(arrivals)} requests, policies {[r.policy for r in runs]}")
    else:
        models_dir, model = args.models_dir, args.model
        if model == TINY or not (models_dir / model / "switchyard.json").exists():
            from switchyard.model.tiny import build_tiny_model
            if model != TINY:
                console.print(f"[bold red]!!! {model} not found under {models_dir}: FALLING BACK TO THE TINY TEST MODEL. "
                              "These figures are NOT the real model's. Run `make model` for the real one. !!![/bold red]")
            models_dir, model = Path(tempfile.mkdtemp(prefix="autoscaling-live-")), TINY
            build_tiny_model(models_dir, name=TINY, seed=0)
        import json
        VOCAB[0] = int(json.loads((models_dir / model / "switchyard.json").read_text())["config"]["vocab_size"])
        log_dir = Path(tempfile.mkdtemp(prefix="autoscaling-live-logs-"))
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        options = (f"scale_up_window_s={args.scale_up_window_s}", f"scale_down_window_s={args.scale_down_window_s}")

        console.print(f"model {model}; {args.slots} slots per replica, 1 ONNX Runtime thread per worker, max "
                      f"{args.max_replicas} replicas; worker start delay {args.start_delay_s:g} s "
                      f"({'TEST-ONLY --fault-start-delay-s: a stand-in for a bigger model' if args.start_delay_s else 'none'}); "
                      f"logs {log_dir}")
        calib = calibrate(models_dir, model, args, log_dir)
        console.print(f"calibration: single stream TTFT {calib.ttft_1_s * 1e3:.0f} ms, {calib.decode_1_tok_s:.1f} tok/s; "
                      f"full batch {calib.service_rate_1:.2f} req/s per replica ({args.prompt_tokens}+{args.output_tokens} "
                      f"tokens); two replicas {calib.service_rate_2:.2f} req/s = {calib.service_rate_2 / calib.service_rate_1:.2f}× "
                      f"one; cold start (lifecycle API, with the delay) {calib.cold_start_s:.2f} s")

        if args.calibrate_only:
            return
        base = args.base_util * calib.service_rate_1
        spec = TraceSpec(duration_s=d, base_rate=base, diurnal_amplitude=0.0,
                         spikes=(Spike(0.12 * d, 0.05 * d, 0.17 * d, args.spike), Spike(0.68 * d, 0.08 * d, 0.12 * d, args.spike)),
                         prompt_tokens=args.prompt_tokens, output_tokens_mean=args.output_tokens,
                         output_tokens_max=3 * args.output_tokens)
        arrivals = generate_arrivals(spec, args.seed)
        console.print(f"trace: {len(arrivals)} requests over {d:g} s, base {base:.2f} req/s, two ×{args.spike:g} spikes "
                      f"(ramp {0.05 * d:.0f} s at {0.12 * d:.0f} s, {0.08 * d:.0f} s at {0.68 * d:.0f} s); TTFT SLO {args.slo_s:g} s")

        runs = []
        for policy in policies:
            before = os.getloadavg()[0]
            run = run_live(models_dir, model, policy, arrivals, calib, args, options, log_dir)
            runs.append(run)
            console.print(f"{policy} live done (load average {before:.2f} before, {os.getloadavg()[0]:.2f} after): "
                          f"{sum(1 for o in run.outcomes if o.error)} errors, "
                          f"cold starts measured by the autoscaler {[round(c, 2) for c in run.cold_starts]}, "
                          f"service rate it measured from heartbeats "
                          f"{'none (never saturated 5 s)' if run.measured_rate is None else f'{run.measured_rate:.2f} req/s'}")
    measured_cold = [c for r in runs for c in r.cold_starts] or [calib.cold_start_s]
    cold = statistics.median([calib.cold_start_s, *measured_cold])
    limits = ScalingLimits(1, args.max_replicas)
    runs.sort(key=lambda r: (r.policy != "reactive", r.policy))  # the baseline first, whatever ran first
    pairs, independent = [], []
    for run in runs:
        opts: dict[str, object] = {"scale_up_window_s": args.scale_up_window_s, "scale_down_window_s": args.scale_down_window_s}
        sims = []
        for shared in (False, True):
            sim = simulate(make_scaling_policy(run.policy, limits, **opts), arrivals,
                           calib.fleet(cold, args.slo_s, args.timeout_s, shared=shared), tick_s=args.tick_s,
                           rate_window_s=RATE_WINDOW_S, window_s=args.window_s, initial_replicas=1, duration_s=d)
            sim.policy = f"{run.policy} (simulator)"
            sims.append(sim)
        independent.append(sims[0])
        pairs.append((sims[1], live_result(run, args.slo_s, args.window_s)))
    elapsed = time.monotonic() - started
    scaling = calib.service_rate_2 / calib.service_rate_1

    base_rs = {"independent": independent[0].replica_seconds, "shared": pairs[0][0].replica_seconds,
               "live": pairs[0][1].replica_seconds}
    table = Table(title=f"{model}, {len(arrivals)} requests, TTFT SLO {args.slo_s:g} s, cold start {cold:.2f} s "
                        f"(measured), service rate {calib.service_rate_1:.2f} req/s/replica (measured)"
                        + ("" if args.from_json else f"; {elapsed:.0f} s"))
    cols = ("policy", "source", "within SLO", "dropped / errors", "replica-s", f"× {pairs[0][1].policy.split()[0]}",
            "TTFT p50", "TTFT p99", "peak replicas", "decision changes")
    for c in cols:
        table.add_column(c, justify="left" if c in ("policy", "source") else "right")
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    def changes(res: SimResult) -> int:
        """Changes of the decided count during the trace (both start at one replica)."""
        counts = [1] + [n for _, n, _ in res.decisions]
        return sum(a != b for a, b in zip(counts, counts[1:]))

    for (sim, live), alone in zip(pairs, independent):
        for res, src, key in ((alone, "simulator, replicas add up", "independent"),
                              (sim, f"simulator, 2 replicas = {scaling:.2f}× one (measured)", "shared"),
                              (live, "live", "live")):
            cells = (res.policy.split()[0], src, f"{100 * res.slo_attainment:.1f}%", str(res.dropped),
                     f"{res.replica_seconds:.0f}", f"{res.replica_seconds / base_rs[key]:.2f}",
                     f"{res.ttft_p50_s:.2f} s", f"{res.ttft_p99_s:.2f} s", str(res.max_replicas), str(changes(res)))
            table.add_row(*cells)
            md.append("| " + " | ".join(cells) + " |")
    console.print(table)

    timeline = Table(title=f"timeline per {args.window_s:g} s window: arrivals/s, replicas ready(+starting), TTFT p99 "
                           f"(simulator with 2 replicas = {scaling:.2f}× one / live; inf = an error in the window)")
    tcols = ["t (s)", "arrivals/s"] + [f"{p[1].policy.split()[0]} {k}" for p in pairs for k in ("replicas", "p99 TTFT")]
    for c in tcols:
        timeline.add_column(c, justify="right")
    tmd = ["| " + " | ".join(tcols) + " |", "|" + "---|" * len(tcols)]

    def reps(res: SimResult, w: int) -> str:
        r, s = int(res.series["ready"][w]), int(res.series["starting"][w])
        return f"{r}" + (f"+{s}" if s else "")

    def p99(res: SimResult, w: int) -> str:
        v = res.series["ttft_p99_s"][w]
        return "-" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.2f}")

    for w, t in enumerate(pairs[0][1].series["t"]):
        cells = [f"{t:.0f}", f"{pairs[0][1].series['arrival_rate'][w]:.1f}"]
        for sim, live in pairs:
            cells += [f"{reps(sim, w)} / {reps(live, w)}", f"{p99(sim, w)} / {p99(live, w)}"]
        timeline.add_row(*cells)
        tmd.append("| " + " | ".join(cells) + " |")
    console.print(timeline)
    for run in runs:
        console.print(f"[bold]{run.policy}[/bold] live decisions: " + "; ".join(f"{t:.1f} s → {d[:90]}" for t, d in run.decisions))
        errs = [o.error for o in run.outcomes if o.error]
        if errs:
            console.print(f"  errors: {len(errs)}, first: {errs[:3]}")
    if args.json:
        import dataclasses
        import json
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "model": model, "calibration": dataclasses.asdict(calib),
            "cold_start_s": cold, "arrivals": [dataclasses.asdict(a) for a in arrivals],
            "runs": [{"policy": r.policy, "outcomes": [dataclasses.asdict(o) for o in r.outcomes], "samples": r.samples,
                      "decisions": r.decisions, "cold_starts": r.cold_starts, "measured_rate": r.measured_rate}
                     for r in runs]}))
        console.print(f"raw data: {args.json}")
    if args.markdown:
        console.print("\n".join(md), soft_wrap=True)
        console.print("\n".join(tmd), soft_wrap=True)
    if args.plot:
        plot(pairs, args.plot, args.slo_s, args.timeout_s,
             f"{model}, cold start {cold:.1f} s (start delay {args.start_delay_s:g} s); simulator: 2 replicas = "
             f"{scaling:.2f}× one")
        console.print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
