"""Predictive vs reactive scaling on the same spiky trace, in the fleet simulator.

Both policies run on the same seeded arrivals (base 3 req/s, a ±30% swing over 20 minutes,
three spikes of ×2.2-×3.0 that ramp up in 30-60 s), on the same simulated fleet (int4 replica
calibration from docs/benchmarks.md, 16 slots, TTFT SLO 2 s, queue timeout 30 s, a decision
every 5 s), once with the cold start measured for our int4 model (0.71 s) and once with a
60 s cold start (what a production-size model takes to load). Prints SLO attainment, dropped
requests and replica-seconds with ratios against reactive, for the headline seed and for four
more seeds (same trace shape, other Poisson draws), and writes the plot for the headline run.

    .venv/bin/python bench/autoscaling_sim.py                        # ~1 minute
    .venv/bin/python bench/autoscaling_sim.py --plot docs/img/autoscaling_sim.png --markdown
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from switchyard.autoscaling import ScalingLimits
from switchyard.autoscaling.simulate_cli import plot_results
from switchyard.autoscaling.simulator import INT4_COLD_START_S, FleetModel, TraceSpec, compare, generate_arrivals

console = Console(width=200)
TARGET_SLO, TARGET_COST = 0.99, 1.25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1, help="headline seed")
    ap.add_argument("--more-seeds", type=int, default=4, help="extra seeds for the robustness rows")
    ap.add_argument("--cold-starts", default=f"{INT4_COLD_START_S},60", help="comma-separated seconds")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the headline run at the longest cold start")
    ap.add_argument("--markdown", action="store_true", help="also print markdown tables")
    args = ap.parse_args()

    spec, limits = TraceSpec(), ScalingLimits(1, 16)
    policies: dict[str, dict[str, object]] = {"reactive": {}, "predictive": {}}
    seeds = [args.seed] + [args.seed + i for i in range(1, args.more_seeds + 1)]
    arrivals = {s: generate_arrivals(spec, s) for s in seeds}
    cold_starts = [float(c) for c in args.cold_starts.split(",")]
    rows, started = [], time.perf_counter()
    headline = None
    for cold in cold_starts:
        fleet = FleetModel(cold_start_s=cold)
        for s in seeds:
            reactive, predictive = compare(policies, arrivals[s], fleet, limits)
            rows.append((cold, s, reactive, predictive))
            if s == args.seed and cold == max(cold_starts):
                headline = (reactive, predictive)
    elapsed = time.perf_counter() - started

    table = Table(title=f"predictive vs reactive, {len(arrivals[args.seed])} requests per run, TTFT SLO "
                        f"{FleetModel().ttft_slo_s:g} s ({elapsed:.0f} s of simulation)")
    for col in ("cold start", "seed", "reactive within SLO", "reactive dropped", "predictive within SLO",
                "predictive dropped", "replica-s reactive", "replica-s predictive", "× replica-s", "target met"):
        table.add_column(col, justify="right")
    md = ["| cold start | seed | reactive within SLO | dropped | predictive within SLO | dropped | replica-s "
          "reactive | replica-s predictive | × | target |", "|---|---|---|---|---|---|---|---|---|---|"]
    for cold, s, r, p in rows:
        ratio = p.replica_seconds / r.replica_seconds
        met = p.slo_attainment >= TARGET_SLO and p.dropped == 0 and ratio <= TARGET_COST
        cells = (f"{cold:g} s", f"{s}{' (headline)' if s == args.seed else ''}", f"{100 * r.slo_attainment:.2f}%",
                 str(r.dropped), f"{100 * p.slo_attainment:.2f}%", str(p.dropped), f"{r.replica_seconds:,.0f}",
                 f"{p.replica_seconds:,.0f}", f"{ratio:.3f}", "met" if met else "missed")
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    if args.markdown:
        console.print("\n".join(md), soft_wrap=True)
    if args.plot and headline:
        plot_results(list(headline), args.plot, FleetModel().ttft_slo_s, FleetModel().queue_timeout_s,
                     title=f"seed {args.seed}, cold start {max(cold_starts):g} s: demand, replicas, TTFT p99")
        console.print(f"plot: {args.plot} ({args.plot.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
