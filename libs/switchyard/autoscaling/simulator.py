"""A discrete-event simulation of one model's fleet, driven by the real scaling policies.

Why: the textbook autoscaling result (reactive capacity arrives one cold start late, predictive
pre-warms) needs hours of traffic and many replicas to show; the simulator runs the *same*
`ScalingPolicy` objects as the autoscaler service on a simulated clock in a second.

Model (docs/autoscaling.md has the calibration):
- arrivals: a non-homogeneous Poisson process (base rate + a slow diurnal-ish swing + spikes
  that ramp up, hold and decay; `generate_arrivals`) or a CSV trace of arrival times
  (`load_trace`); each request has a prompt and an output length in tokens;
- a replica runs up to `slots_per_replica` sequences at once (continuous batching): every
  running sequence advances at aggregate_tokens_per_s(b) / b, where b is how many run on that
  replica (processor sharing; the aggregate rate is interpolated from measured points).
  A request's work is its prefill (prompt tokens × `prefill_cost`, in decode-token units) then
  its output tokens; its first token comes when the prefill is done;
- a new replica takes traffic `cold_start_s` after it was asked for; it costs replica-seconds
  from that moment (the machine is paid for while it loads);
- requests wait in one FIFO queue (JetStream) until a ready replica has a free slot; a request
  that waits longer than `queue_timeout_s` is dropped; TTFT = first token - arrival;
- every `tick_s` the policy is called with a `Demand` built from the simulated state (arrival
  rate over the last `rate_window_s`); more replicas → start new ones; fewer → cancel ones
  still starting, then drain the least busy ready ones (no new work, removed when empty).
Deterministic: the same seed gives the same arrivals, token lengths and results.
"""

from __future__ import annotations

import csv
import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .policy import Demand, ScalingLimits, ScalingPolicy

# Measured on this 2-core VM (docs/benchmarks.md, "The model through the worker": switchyard
# worker, stack default, SmolLM2-135M int4, 128-token prompt): aggregate decode tokens/s at
# N = 1, 4, 16 streams; TTFT at N=1 149 ms; cold start process start → first token 0.71 s.
INT4_BATCH_POINTS: tuple[tuple[int, float], ...] = ((1, 46.5), (4, 100.5), (16, 208.3))
INT4_TTFT_N1_S = 0.149
INT4_COLD_START_S = 0.71


@dataclass(frozen=True)
class FleetModel:
    """How one replica of the model behaves, and the service's limits."""

    slots_per_replica: int = 16
    batch_points: tuple[tuple[int, float], ...] = INT4_BATCH_POINTS
    # decode-token units of work per prompt token: at N=1, 128 prompt tokens take 149 ms
    # while one stream decodes 46.5 tokens/s → 0.149 × 46.5 / 128.
    prefill_cost: float = INT4_TTFT_N1_S * INT4_BATCH_POINTS[0][1] / 128
    cold_start_s: float = INT4_COLD_START_S
    queue_timeout_s: float = 30.0
    ttft_slo_s: float = 2.0
    # Capacity of n busy replicas together relative to one, measured (e.g. (1.0, 1.41): two
    # replicas sharing a 2-core machine complete 1.41× what one does). Empty: replicas are
    # independent machines and add up. Beyond the last figure, adding replicas adds nothing.
    replica_scaling: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.slots_per_replica < 1:
            raise ValueError("slots_per_replica must be >= 1")
        if not self.batch_points or any(b < 1 or r <= 0 for b, r in self.batch_points):
            raise ValueError("batch_points must be (batch >= 1, tokens/s > 0) pairs")
        if self.cold_start_s < 0 or self.queue_timeout_s <= 0 or self.ttft_slo_s <= 0:
            raise ValueError("cold_start_s must be >= 0, queue_timeout_s and ttft_slo_s > 0")
        if any(x <= 0 for x in self.replica_scaling) or (self.replica_scaling and self.replica_scaling[0] != 1.0):
            raise ValueError("replica_scaling must start at 1.0 (one replica) and be positive")

    def efficiency(self, busy: int) -> float:
        """Share of its own speed each of `busy` replicas runs at when they share machines."""
        if not self.replica_scaling or busy <= 1:
            return 1.0
        total = self.replica_scaling[min(busy, len(self.replica_scaling)) - 1]
        return total / busy

    def aggregate_rate(self, batch: int) -> float:
        """Decode tokens/s of one replica running `batch` sequences (linear between measured points)."""
        points = sorted(self.batch_points)
        xs = [float(b) for b, _ in points]
        ys = [r for _, r in points]
        return float(np.interp(batch, xs, ys))

    def service_rate_per_replica(self, prompt_tokens: float, output_tokens: float) -> float:
        """Requests/s one replica completes with every slot busy, for requests of mean size."""
        work = prompt_tokens * self.prefill_cost + output_tokens
        return self.aggregate_rate(self.slots_per_replica) / work


@dataclass(frozen=True)
class Spike:
    at_s: float
    ramp_s: float
    hold_s: float
    multiplier: float  # rate during the hold = multiplier × the rate without the spike


@dataclass(frozen=True)
class TraceSpec:
    """The arrival generator: base × (1 + amplitude·sin(2πt/period)) × spikes."""

    duration_s: float = 1800.0
    base_rate: float = 3.0
    diurnal_amplitude: float = 0.3
    diurnal_period_s: float = 1200.0
    spikes: tuple[Spike, ...] = (Spike(300, 45, 120, 2.5), Spike(900, 30, 90, 3.0), Spike(1450, 60, 150, 2.2))
    prompt_tokens: int = 128
    output_tokens_mean: int = 128
    output_tokens_max: int = 512

    def rate(self, t: float) -> float:
        r = self.base_rate * (1.0 + self.diurnal_amplitude * math.sin(2 * math.pi * t / self.diurnal_period_s))
        for s in self.spikes:
            if s.at_s <= t < s.at_s + s.ramp_s:
                r *= 1.0 + (s.multiplier - 1.0) * (t - s.at_s) / s.ramp_s
            elif s.at_s + s.ramp_s <= t < s.at_s + s.ramp_s + s.hold_s:
                r *= s.multiplier
            elif s.at_s + s.ramp_s + s.hold_s <= t < s.at_s + 2 * s.ramp_s + s.hold_s:
                r *= s.multiplier - (s.multiplier - 1.0) * (t - s.at_s - s.ramp_s - s.hold_s) / s.ramp_s
        return max(0.0, r)


@dataclass(frozen=True)
class Arrival:
    t: float
    prompt_tokens: int
    output_tokens: int


def generate_arrivals(spec: TraceSpec, seed: int) -> list[Arrival]:
    """Non-homogeneous Poisson arrivals by thinning; output lengths geometric around the mean."""
    rng = np.random.default_rng(seed)
    grid = np.arange(0.0, spec.duration_s + 1.0, 1.0)
    peak = max(spec.rate(float(t)) for t in grid) * 1.05 + 1e-9
    out: list[Arrival] = []
    t = 0.0
    while True:
        t += float(rng.exponential(1.0 / peak))
        if t >= spec.duration_s:
            break
        keep = rng.random() < spec.rate(t) / peak
        tokens = int(min(spec.output_tokens_max, max(1, rng.geometric(1.0 / spec.output_tokens_mean))))
        if keep:
            out.append(Arrival(t, spec.prompt_tokens, tokens))
    return out


def load_trace(path: Path, prompt_tokens: int = 128, output_tokens: int = 128) -> list[Arrival]:
    """A CSV of arrivals: a header with column `t` (seconds; or the first column without a
    header), optional `prompt_tokens` and `output_tokens` columns. Times need not be sorted."""
    rows = list(csv.reader(path.read_text().splitlines()))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: empty trace")
    header = [c.strip().lower() for c in rows[0]]
    try:
        float(header[0])
        header, body = ["t"], rows
    except ValueError:
        body = rows[1:]
    if "t" not in header:
        raise ValueError(f"{path}: no column 't' in header {header}")
    it, ip = header.index("t"), header.index("prompt_tokens") if "prompt_tokens" in header else None
    io = header.index("output_tokens") if "output_tokens" in header else None
    out: list[Arrival] = []
    for n, row in enumerate(body, start=2 if body is not rows else 1):
        try:
            t = float(row[it])
            p = int(row[ip]) if ip is not None else prompt_tokens
            o = int(row[io]) if io is not None else output_tokens
        except (ValueError, IndexError) as e:
            raise ValueError(f"{path}:{n}: bad row {row}: {e}") from None
        if t < 0 or p < 0 or o < 1:
            raise ValueError(f"{path}:{n}: need t >= 0, prompt_tokens >= 0, output_tokens >= 1: {row}")
        out.append(Arrival(t, p, o))
    out.sort(key=lambda a: a.t)
    return out


@dataclass
class _Request:
    id: int
    arrival: float
    prompt_tokens: int
    output_tokens: int
    first_token: float | None = None
    done: float | None = None
    dropped: float | None = None


@dataclass
class _Replica:
    id: int
    asked_at: float
    ready_at: float
    state: str = "starting"  # starting → ready → draining → stopped
    stopped_at: float | None = None
    served: float = 0.0  # decode-token units delivered to each running sequence so far
    updated: float = 0.0
    events: list[tuple[float, int, int]] = field(default_factory=list)  # (served target, 0 prefill / 1 done, id)
    running: set[int] = field(default_factory=set)


@dataclass
class SimResult:
    policy: str
    arrived: int
    completed: int
    dropped: int
    in_flight: int
    within_slo: int
    replica_seconds: float
    ttft_p50_s: float
    ttft_p99_s: float
    max_replicas: int
    decisions: list[tuple[float, int, str]]  # (t, replicas, reason) whenever the decision changed
    series: dict[str, list[float]]  # t, arrival_rate, ready, starting, ttft_p99_s, dropped per window

    @property
    def slo_attainment(self) -> float:
        """Share of arrived requests whose first token came within the TTFT SLO (dropped = missed)."""
        return self.within_slo / self.arrived if self.arrived else 1.0


class FleetSimulator:
    """One model's fleet under one policy; `run()` returns the result."""

    def __init__(self, policy: ScalingPolicy, arrivals: Sequence[Arrival], fleet: FleetModel = FleetModel(), *,
                 tick_s: float = 5.0, rate_window_s: float = 10.0, window_s: float = 10.0,
                 initial_replicas: int | None = None, duration_s: float | None = None) -> None:
        if tick_s <= 0 or rate_window_s <= 0 or window_s <= 0:
            raise ValueError("tick_s, rate_window_s and window_s must be > 0")
        self.policy, self.fleet, self.limits = policy, fleet, policy.limits
        self.tick_s, self.rate_window_s, self.window_s = tick_s, rate_window_s, window_s
        self.arrivals = sorted(arrivals, key=lambda a: a.t)
        self.duration_s = duration_s if duration_s is not None else (self.arrivals[-1].t if self.arrivals else 0.0)
        mean_prompt = float(np.mean([a.prompt_tokens for a in self.arrivals])) if self.arrivals else 128.0
        mean_output = float(np.mean([a.output_tokens for a in self.arrivals])) if self.arrivals else 128.0
        self.service_rate = fleet.service_rate_per_replica(mean_prompt, mean_output)
        start = initial_replicas if initial_replicas is not None else max(1, self.limits.min_replicas)
        self.now = 0.0
        self.replicas: list[_Replica] = [_Replica(i, 0.0, 0.0, "ready") for i in range(start)]
        self.requests: list[_Request] = []
        self.queue: deque[_Request] = deque()
        self.recent: deque[float] = deque()  # arrival times within the rate window
        self.decisions: list[tuple[float, int, str]] = []
        self.samples: list[tuple[float, float, int, int]] = []  # (t, rate, ready, starting) per tick
        self._next_arrival = 0
        self._next_tick = tick_s  # at t=0 nothing has arrived yet: a rate of 0 is no information

    # -- replicas ---------------------------------------------------------------------------

    def _rate(self, replica: _Replica) -> float:
        b = len(replica.running)
        if not b:
            return 0.0
        rate = self.fleet.aggregate_rate(b) / b
        if self.fleet.replica_scaling:  # busy replicas share the machine (rates change only at events)
            rate *= self.fleet.efficiency(sum(1 for r in self.replicas if r.running))
        return rate

    def _advance(self, t: float) -> None:
        for r in self.replicas:
            if r.running:
                r.served += self._rate(r) * (t - r.updated)
            r.updated = t
        self.now = t

    def _next_phase(self, r: _Replica) -> float:
        if not r.events:
            return math.inf
        return r.updated + max(0.0, r.events[0][0] - r.served) / self._rate(r)

    def _admit(self, req: _Request, r: _Replica) -> None:
        prefill = req.prompt_tokens * self.fleet.prefill_cost
        r.running.add(req.id)
        heapq.heappush(r.events, (r.served + prefill, 0, req.id))
        heapq.heappush(r.events, (r.served + prefill + req.output_tokens, 1, req.id))

    def _dispatch(self) -> None:
        self._expire()
        while self.queue:
            free = [r for r in self.replicas if r.state == "ready" and len(r.running) < self.fleet.slots_per_replica]
            if not free:
                return
            target = min(free, key=lambda r: (len(r.running), r.id))
            self._admit(self.queue.popleft(), target)

    def _expire(self) -> None:
        while self.queue and self.now - self.queue[0].arrival >= self.fleet.queue_timeout_s - 1e-9:
            req = self.queue.popleft()
            req.dropped = req.arrival + self.fleet.queue_timeout_s

    def _scale_to(self, want: int) -> None:
        live = [r for r in self.replicas if r.state in ("starting", "ready")]
        for _ in range(want - len(live)):
            self.replicas.append(_Replica(len(self.replicas), self.now, self.now + self.fleet.cold_start_s))
        excess = len(live) - want
        for r in sorted((r for r in live if r.state == "starting"), key=lambda r: -r.asked_at):
            if excess <= 0:
                break
            r.state, r.stopped_at, excess = "stopped", self.now, excess - 1
        for r in sorted((r for r in live if r.state == "ready"), key=lambda r: (len(r.running), -r.id)):
            if excess <= 0:
                break
            r.state, excess = "draining", excess - 1
            if not r.running:
                r.state, r.stopped_at = "stopped", self.now

    # -- the loop ---------------------------------------------------------------------------

    def _demand(self) -> Demand:
        while self.recent and self.recent[0] <= self.now - self.rate_window_s:
            self.recent.popleft()
        window = min(self.rate_window_s, self.now) if self.now > 0 else self.rate_window_s
        running = sum(len(r.running) for r in self.replicas)
        return Demand(now=self.now, arrival_rate=len(self.recent) / window, in_flight=running + len(self.queue),
                      queued=len(self.queue),
                      ready_replicas=sum(r.state == "ready" for r in self.replicas),
                      starting_replicas=sum(r.state == "starting" for r in self.replicas),
                      slots_per_replica=self.fleet.slots_per_replica,
                      service_rate_per_replica=self.service_rate, cold_start_s=self.fleet.cold_start_s)

    def _tick(self) -> None:
        self._expire()
        demand = self._demand()
        decision = self.policy.decide(demand)
        if not self.decisions or self.decisions[-1][1] != decision.replicas:
            self.decisions.append((self.now, decision.replicas, decision.reason))
        self._scale_to(decision.replicas)
        self.samples.append((self.now, demand.arrival_rate, sum(r.state == "ready" for r in self.replicas),
                             sum(r.state == "starting" for r in self.replicas)))

    def _in_flight(self) -> int:
        return len(self.queue) + sum(len(r.running) for r in self.replicas)

    def run(self, until: float | None = None) -> SimResult:
        """Simulate until `until` (default: the trace's end, then until every request has
        finished or been dropped)."""
        stop = until if until is not None else math.inf
        hard_stop = self.duration_s + self.fleet.queue_timeout_s + 3600.0
        while True:
            t_arrival = self.arrivals[self._next_arrival].t if self._next_arrival < len(self.arrivals) else math.inf
            t_ready = min((r.ready_at for r in self.replicas if r.state == "starting"), default=math.inf)
            t_phase = min((self._next_phase(r) for r in self.replicas if r.running), default=math.inf)
            t_timeout = self.queue[0].arrival + self.fleet.queue_timeout_s if self.queue else math.inf
            t_next = min(t_arrival, self._next_tick, t_ready, t_phase, t_timeout)
            done = until is None and t_arrival == math.inf and self._in_flight() == 0
            if done or t_next > stop or t_next > hard_stop:
                if until is not None:
                    self._advance(min(stop, t_next) if t_next != math.inf else stop)
                break
            self._advance(t_next)
            for r in self.replicas:  # phases due now
                while r.events and r.events[0][0] <= r.served + 1e-9:
                    _, kind, rid = heapq.heappop(r.events)
                    req = self.requests[rid]
                    if kind == 0:
                        req.first_token = self.now
                    else:
                        req.done = self.now
                        r.running.discard(rid)
                if r.state == "draining" and not r.running:
                    r.state, r.stopped_at = "stopped", self.now
                if r.state == "starting" and r.ready_at <= self.now:
                    r.state = "ready"
            while self._next_arrival < len(self.arrivals) and self.arrivals[self._next_arrival].t <= self.now:
                a = self.arrivals[self._next_arrival]
                req = _Request(len(self.requests), a.t, a.prompt_tokens, a.output_tokens)
                self.requests.append(req)
                self.queue.append(req)
                self.recent.append(a.t)
                self._next_arrival += 1
            if self._next_tick <= self.now:
                self._tick()
                self._next_tick += self.tick_s
            self._dispatch()
        return self._result()

    def _result(self) -> SimResult:
        slo = self.fleet.ttft_slo_s
        ttfts = np.array([q.first_token - q.arrival for q in self.requests if q.first_token is not None])
        end = self.duration_s
        replica_seconds = sum(max(0.0, min(r.stopped_at if r.stopped_at is not None else math.inf, end, self.now)
                                  - r.asked_at) for r in self.replicas)
        n_windows = max(1, math.ceil(end / self.window_s))
        series: dict[str, list[float]] = {k: [] for k in ("t", "arrival_rate", "ready", "starting", "ttft_p99_s",
                                                          "dropped")}
        by_window: list[list[float]] = [[] for _ in range(n_windows)]
        dropped_w, arrived_w = [0] * n_windows, [0] * n_windows
        for q in self.requests:
            w = min(n_windows - 1, int(q.arrival // self.window_s))
            arrived_w[w] += 1
            if q.first_token is not None:
                by_window[w].append(q.first_token - q.arrival)
            elif q.dropped is not None:
                by_window[w].append(math.inf)
                dropped_w[w] += 1
        sample_i = 0
        for w in range(n_windows):
            t1 = (w + 1) * self.window_s
            while sample_i + 1 < len(self.samples) and self.samples[sample_i + 1][0] <= t1:
                sample_i += 1
            s = self.samples[sample_i] if self.samples else (0.0, 0.0, 0, 0)
            series["t"].append(w * self.window_s)
            series["arrival_rate"].append(arrived_w[w] / self.window_s)
            series["ready"].append(s[2])
            series["starting"].append(s[3])
            # 'higher': no interpolation, so a dropped request (inf) in the top 1% reads as inf
            series["ttft_p99_s"].append(float(np.percentile(by_window[w], 99, method="higher"))
                                        if by_window[w] else float("nan"))
            series["dropped"].append(dropped_w[w])
        return SimResult(
            policy=self.policy.name, arrived=len(self.requests),
            completed=sum(q.done is not None for q in self.requests),
            dropped=sum(q.dropped is not None for q in self.requests), in_flight=self._in_flight(),
            within_slo=int(np.sum(ttfts <= slo + 1e-9)) if len(ttfts) else 0,
            replica_seconds=replica_seconds,
            ttft_p50_s=float(np.percentile(ttfts, 50)) if len(ttfts) else float("nan"),
            ttft_p99_s=float(np.percentile(ttfts, 99)) if len(ttfts) else float("nan"),
            max_replicas=max((sum(r.asked_at <= t < (r.stopped_at if r.stopped_at is not None else math.inf)
                                  for r in self.replicas) for t, *_ in self.samples), default=len(self.replicas)),
            decisions=self.decisions, series=series)


def simulate(policy: ScalingPolicy, arrivals: Sequence[Arrival], fleet: FleetModel = FleetModel(),
             **options: float) -> SimResult:
    """Run one policy over `arrivals` (see `FleetSimulator` for the options)."""
    return FleetSimulator(policy, arrivals, fleet, **options).run()  # type: ignore[arg-type]




def warm_start_replicas(arrivals: Sequence[Arrival], fleet: FleetModel, limits: ScalingLimits,
                        target_utilisation: float = 0.7, over_s: float = 60.0) -> int:
    """Replicas a fleet would already run for the trace's opening minute (so a comparison
    measures the spikes, not every policy's start from a cold, undersized fleet)."""
    opening = [a for a in arrivals if a.t < over_s]
    if not opening:
        return limits.clamp(max(1, limits.min_replicas))
    rate = len(opening) / over_s
    mean_prompt = float(np.mean([a.prompt_tokens for a in arrivals]))
    mean_output = float(np.mean([a.output_tokens for a in arrivals]))
    need = rate / (fleet.service_rate_per_replica(mean_prompt, mean_output) * target_utilisation)
    return limits.clamp(max(1, math.ceil(need)))


def compare(policies: dict[str, dict[str, object]], arrivals: Sequence[Arrival], fleet: FleetModel,
            limits: ScalingLimits, **options: float) -> list[SimResult]:
    """Each policy (name → its options) on the same arrivals, fleet and limits; a fresh
    policy object per run. `initial_replicas` defaults to `warm_start_replicas`."""
    from . import make_scaling_policy
    options.setdefault("initial_replicas", warm_start_replicas(arrivals, fleet, limits))
    return [simulate(make_scaling_policy(name, limits, **opts), arrivals, fleet, **options)
            for name, opts in policies.items()]


__all__ = ["Arrival", "FleetModel", "FleetSimulator", "ScalingLimits", "SimResult", "Spike", "TraceSpec", "compare",
           "generate_arrivals", "load_trace", "simulate", "warm_start_replicas"]
