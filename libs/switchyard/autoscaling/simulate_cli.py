"""`switchyard simulate`: scaling policies side by side on one simulated fleet.

Prints a table (SLO attainment, dropped, replica-seconds, TTFT p50/p99, peak replicas) and, with
`--plot out.png`, draws demand, replicas and TTFT p99 over time for each policy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import typer
from rich.console import Console
from rich.table import Table

from .policy import ScalingLimits
from .simulator import INT4_COLD_START_S, FleetModel, SimResult, TraceSpec, compare, generate_arrivals, load_trace


def parse_policy_options(names: Sequence[str], options: Sequence[str]) -> dict[str, dict[str, object]]:
    """'predictive.headroom=1.3' → {'predictive': {'headroom': 1.3}}; values are numbers."""
    out: dict[str, dict[str, object]] = {n: {} for n in names}
    for item in options:
        key, sep, value = item.partition("=")
        policy, dot, option = key.partition(".")
        if not sep or not dot or policy not in out:
            raise typer.BadParameter(f"--option {item!r}: expected POLICY.NAME=NUMBER with POLICY one of {list(out)}")
        try:
            out[policy][option] = float(value)
        except ValueError:
            raise typer.BadParameter(f"--option {item!r}: {value!r} is not a number") from None
    return out


def results_table(results: Sequence[SimResult], slo_s: float, baseline: SimResult | None = None) -> Table:
    base = baseline or results[0]
    table = Table(title=f"{base.arrived} requests, TTFT SLO {slo_s:g} s")
    for col in ("policy", "within SLO", "dropped", "replica-s", "× replica-s", "TTFT p50", "TTFT p99", "peak replicas",
                "changes"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in results:
        table.add_row(r.policy, f"{100 * r.slo_attainment:.2f}%", str(r.dropped), f"{r.replica_seconds:,.0f}",
                      f"{r.replica_seconds / base.replica_seconds:.3f}" if base.replica_seconds else "-",
                      f"{r.ttft_p50_s:.2f} s", f"{r.ttft_p99_s:.2f} s", str(r.max_replicas), str(len(r.decisions)))
    return table


def plot_results(results: Sequence[SimResult], path: Path, slo_s: float, timeout_s: float,
                 title: str = "demand, replicas and TTFT p99 per policy (same trace)") -> Path:
    """Three stacked panels sharing time: demand, replicas (ready solid, ready+starting dashed),
    TTFT p99 per window (log; a window with a dropped request is drawn at the timeout, ×)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_d, ax_r, ax_t) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    first = results[0].series
    ax_d.plot([t / 60 for t in first["t"]], first["arrival_rate"], color="black", lw=1)
    ax_d.set_ylabel("arrivals (req/s)")
    ax_d.set_title(title)
    for i, r in enumerate(results):
        color = f"C{i}"
        minutes = [t / 60 for t in r.series["t"]]
        ax_r.step(minutes, r.series["ready"], where="post", color=color, label=f"{r.policy} ready")
        ax_r.step(minutes, [a + b for a, b in zip(r.series["ready"], r.series["starting"])], where="post",
                  color=color, ls="--", lw=0.8, label=f"{r.policy} ready+starting")
        p99 = [min(v, timeout_s) if not math.isnan(v) else math.nan for v in r.series["ttft_p99_s"]]
        ax_t.plot(minutes, p99, color=color, lw=1, label=f"{r.policy}")
        drops = [(m, timeout_s) for m, d in zip(minutes, r.series["dropped"]) if d]
        if drops:
            ax_t.scatter(*zip(*drops), marker="x", color=color, label=f"{r.policy} dropped")
    ax_r.set_ylabel("replicas")
    ax_r.legend(fontsize=7, ncol=2)
    ax_t.axhline(slo_s, color="grey", ls=":", label="TTFT SLO")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("TTFT p99 (s)")
    ax_t.set_xlabel("minutes")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def simulate_command(
    policies: str = typer.Option("reactive,predictive", help="comma-separated policy names"),
    trace: Optional[Path] = typer.Option(None, help="CSV of arrivals (column t; optional prompt_tokens, "
                                                    "output_tokens); default: the spiky generator"),
    seed: int = typer.Option(1, help="generator seed (same seed → same arrivals and results)"),
    duration: float = typer.Option(1800.0, help="generated trace length, s"),
    base_rate: float = typer.Option(3.0, help="generated base arrival rate, req/s"),
    cold_start: float = typer.Option(INT4_COLD_START_S, help="replica cold start, s (default: int4 measured)"),
    slots: int = typer.Option(16, help="sequences one replica runs at once"),
    ttft_slo: float = typer.Option(2.0, help="TTFT SLO, s"),
    queue_timeout: float = typer.Option(30.0, help="a request waiting longer is dropped, s"),
    tick: float = typer.Option(5.0, help="autoscaler decision interval, s"),
    min_replicas: int = typer.Option(1), max_replicas: int = typer.Option(16),
    scale_to_zero_after: Optional[float] = typer.Option(None, help="idle seconds before 0 (needs --min-replicas 0)"),
    initial_replicas: Optional[int] = typer.Option(None, help="default: what the opening minute needs"),
    option: list[str] = typer.Option([], help="policy option, e.g. predictive.headroom=1.3 (repeatable)"),
    plot: Optional[Path] = typer.Option(None, help="write demand/replicas/TTFT p99 plots to this PNG"),
) -> None:
    """Simulate one model's fleet under each scaling policy and compare them."""
    console = Console()
    names = [n.strip() for n in policies.split(",") if n.strip()]
    if not names:
        raise typer.BadParameter("--policies: give at least one policy")
    try:
        limits = ScalingLimits(min_replicas, max_replicas, scale_to_zero_after)
        fleet = FleetModel(slots_per_replica=slots, cold_start_s=cold_start, queue_timeout_s=queue_timeout,
                           ttft_slo_s=ttft_slo)
        arrivals = load_trace(trace) if trace else generate_arrivals(TraceSpec(duration_s=duration,
                                                                               base_rate=base_rate), seed)
        if not arrivals:
            raise ValueError("the trace has no arrivals")
        extra: dict[str, float] = {"tick_s": tick}
        if initial_replicas is not None:
            extra["initial_replicas"] = initial_replicas
        duration_s = duration if trace is None else None
        if duration_s is not None:
            extra["duration_s"] = duration_s
        results = compare(parse_policy_options(names, option), arrivals, fleet, limits, **extra)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    console.print(results_table(results, ttft_slo))
    if plot is not None:
        console.print(f"plot: {plot_results(results, plot, ttft_slo, queue_timeout)}")
