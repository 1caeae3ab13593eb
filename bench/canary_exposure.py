"""How many requests a bad canary serves before it is rolled back, by the decision core alone.

A discrete-time simulation (no stack, no network): Poisson arrivals at --rps, each request put
on the candidate with the canary's current weight by `assign_arm` on its request id (as the
router does), outcomes drawn per scenario, and the real `CanaryController` ticked once a second
on the current step's window (as the router's rollout loop does). It isolates what the policy
costs in exposure — min_requests at a 1% first step is the dominant term — from the stack's
own latency, which the real-stack benchmark measures. Also times the per-request and per-tick
calls against a trivial baseline in the same run.

    .venv/bin/python bench/canary_exposure.py [--rps 20 100] [--seeds 10]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parents[1] / "libs"))
from switchyard.rollouts.analysis import ArmSamples, Thresholds, compare  # noqa: E402
from switchyard.rollouts.canary import CanaryController, CanaryPlan  # noqa: E402
from switchyard.rollouts.experiments import assign_arm  # noqa: E402

console = Console(width=150)
BASE_ERR = 0.005
TTFT_MEDIAN, ITL_MEDIAN = 0.2, 0.02


@dataclass(frozen=True)
class Scenario:
    name: str
    error_rate: float
    slowdown: float  # TTFT and ITL multiplier

    @property
    def bad(self) -> bool:
        return self.error_rate > BASE_ERR or self.slowdown > 1.0


SCENARIOS = (Scenario("healthy", BASE_ERR, 1.0), Scenario("broken (100% errors)", 1.0, 1.0),
             Scenario("flaky (10% errors)", 0.10, 1.0), Scenario("slow (x3 latency)", BASE_ERR, 3.0))


def one_rollout(sc: Scenario, rps: float, thresholds: Thresholds, seed: int,
                max_s: float = 1800.0) -> tuple[str, float, int]:
    """(final action, seconds to it, candidate requests served) for one simulated canary."""
    rng = np.random.default_rng(seed)
    ctl = CanaryController(CanaryPlan(step_duration_s=60.0, thresholds=thresholds), step_started_at=0.0)
    base, cand = ArmSamples(), ArmSamples()
    served = 0
    rid = 0
    for t in range(1, int(max_s) + 1):
        for _ in range(rng.poisson(rps)):
            rid += 1
            w = ctl.weight
            on_cand = assign_arm(f"{seed}-{rid}", ["b", "c"], [1 - w, w]) == "c"
            err_rate, slow = (sc.error_rate, sc.slowdown) if on_cand else (BASE_ERR, 1.0)
            j = rng.lognormal(0.0, 0.3)
            (cand if on_cand else base).add(error=bool(rng.random() < err_rate), ttft_s=TTFT_MEDIAN * slow * j,
                                            itl_s=list(ITL_MEDIAN * slow * rng.lognormal(0.0, 0.3, 8)))
            served += on_cand
        action = ctl.tick(float(t), base, cand)
        if action.kind in ("promote", "rollback"):
            return action.kind, float(t), served
        if action.kind == "advance":
            base, cand = ArmSamples(), ArmSamples()
    return "undecided", max_s, served


def micro() -> Table:
    n = 100_000
    t0 = time.perf_counter()
    for i in range(n):
        _ = random.random() < 0.05
    base = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for i in range(n):
        assign_arm(f"req-{i}", ["b", "c"], [0.95, 0.05])
    arm_cost = (time.perf_counter() - t0) / n
    rng = np.random.default_rng(0)
    big = ArmSamples()
    for _ in range(6000):  # a 60 s window at 100 rps
        big.add(error=False, ttft_s=float(rng.lognormal(-1.6, 0.3)), itl_s=list(rng.lognormal(-3.9, 0.3, 8)))
    t0 = time.perf_counter()
    for _ in range(50):
        compare(big, big, Thresholds())
    tick_cost = (time.perf_counter() - t0) / 50
    table = Table(title="cost of the calls", header_style="bold")
    for col in ("call", "cost", "vs baseline"):
        table.add_column(col)
    table.add_row("random.random() < w (baseline, per request)", f"{base * 1e6:.2f} µs", "1.0x")
    table.add_row("assign_arm (per request)", f"{arm_cost * 1e6:.2f} µs", f"{arm_cost / base:.1f}x")
    table.add_row("compare, 6000+6000 requests x 8 ITL (per tick)", f"{tick_cost * 1e3:.2f} ms", "")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rps", type=float, nargs="+", default=[20.0, 100.0])
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args()
    console.print(micro())
    configs = (("plain: observed figures", Thresholds(breach_alpha=None)),
               ("default: breach_alpha 1e-3", Thresholds()),
               ("default + early_fail_p 1e-3", Thresholds(early_fail_p=1e-3)))
    table = Table(title=f"canary plan 1% → 5% → 25% → 50% → 100%, 60 s steps, tick 1 s; {args.seeds} seeds each",
                  header_style="bold")
    for col in ("rps", "candidate", "thresholds", "outcome", "s to decision (median)",
                "candidate requests served (median / max)", "vs plain"):
        table.add_column(col)
    t_start = time.perf_counter()
    for rps in args.rps:
        for sc in SCENARIOS:
            ref = None
            for label, th in configs:
                results = [one_rollout(sc, rps, th, seed) for seed in range(args.seeds)]
                outcomes = {k: sum(r[0] == k for r in results) for k in ("promote", "rollback", "undecided")}
                served = np.array([r[2] for r in results])
                secs = np.array([r[1] for r in results])
                med = float(np.median(served))
                ratio = "" if ref is None or ref == 0 else f"{med / ref:.2f}x"
                ref = med if ref is None else ref
                table.add_row(f"{rps:g}", sc.name, label, ", ".join(f"{k} {v}" for k, v in outcomes.items() if v),
                              f"{np.median(secs):.0f}", f"{med:.0f} / {served.max()}", ratio)
    console.print(table)
    console.print(f"simulated in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
