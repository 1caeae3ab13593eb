"""`switchyard report RUN_DIR [--prices FILE] [--out DIR]`: percentiles, cost, tail attribution.

Mount on the main CLI with ``app.command("report")(report_command)``; `report_app` runs the
same command on its own (``python -m switchyard.reporting.cli RUN_DIR``).

Reads <run_dir>/requests.jsonl (required), replicas.jsonl and spans.jsonl (optional); writes
latency.png, cost.png and report.md into --out (default: the run directory — the markdown
links the PNGs by file name, so all three go to the same place).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import typer
from rich.console import Console
from rich.table import Table

from switchyard.reporting.cost import (COMPONENT_LABELS, DIMENSION_LABELS, DIMENSIONS, CostReport, cost_report,
                                       fmt_money, load_prices)
from switchyard.reporting.percentiles import METRIC_LABELS, METRICS, LatencyStats, PercentileReport, fmt_s, \
    percentile_report
from switchyard.reporting.records import (REPLICAS_FILE, REQUESTS_FILE, SPANS_FILE, derive_replica_usage, iter_jsonl,
                                          load_records, load_replicas)
from switchyard.reporting.tail import HOP_LABELS, HOPS, TailReport, attribute_tail, load_spans

REPORT_MD = "report.md"


@dataclass
class ReportResult:
    run_dir: Path
    out_dir: Path
    requests: int
    percentiles: PercentileReport
    cost: CostReport
    tail: TailReport | None  # None without spans.jsonl (or with no complete trace)
    latency_png: Path
    cost_png: Path
    report_md: Path
    notes: list[str] = field(default_factory=list)  # data-quality remarks (also in report.md)
    window_s: float = 0.0  # first request start → last request end
    rollouts: list[dict[str, Any]] = field(default_factory=list)  # rollouts.jsonl: the routers' rollout decisions


@dataclass
class _Tab:
    title: str
    headers: list[str]
    rows: list[list[str]]


def report(run_dir: Path, prices: Path | None = None, out: Path | None = None) -> ReportResult:
    """Build the report of one run: numbers (returned), PNGs and report.md (written to `out`,
    default `run_dir`). Raises FileNotFoundError without requests.jsonl, ValueError on a bad
    price file."""
    run_dir = Path(run_dir)
    requests_path = run_dir / REQUESTS_FILE
    if not requests_path.exists():
        raise FileNotFoundError(f"{requests_path} not found: is {run_dir} a run directory?")
    out_dir = Path(out) if out is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    records, bad = load_records(requests_path)
    if bad:
        notes.append(f"{bad} unreadable line(s) in {REQUESTS_FILE} skipped")
    if not records:
        notes.append(f"{REQUESTS_FILE} holds no requests")

    price_table = load_prices(prices)
    replicas_path = run_dir / REPLICAS_FILE
    if replicas_path.exists():
        replicas, bad = load_replicas(replicas_path)
        if bad:
            notes.append(f"{bad} unreadable line(s) in {REPLICAS_FILE} skipped")
    else:
        replicas = derive_replica_usage(records)
        if replicas:
            notes.append(f"no {REPLICAS_FILE}: replica time derived from request times (first request start "
                         "to last request end per replica), which leaves out idle time — replica cost is a lower bound")

    pct = percentile_report(records)
    cost = cost_report(records, replicas, price_table)
    if cost.unpriced_models:
        notes.append(f"no price for model(s) {', '.join(cost.unpriced_models)} in {price_table.source} "
                     "prices: counted as 0")

    tail = None
    spans_path = run_dir / SPANS_FILE
    if spans_path.exists():
        spans, bad = load_spans(spans_path)
        if bad:
            notes.append(f"{bad} unreadable line(s) in {SPANS_FILE} skipped")
        tail = attribute_tail(spans, records=records)
        if tail is None:
            notes.append(f"{SPANS_FILE} has no trace with a router.request root span: no tail attribution")
        else:
            if tail.skipped_no_root:
                notes.append(f"{tail.skipped_no_root} trace(s) without a router.request root span skipped")
            if tail.clamped:
                notes.append(f"{tail.clamped} trace(s) whose hops add up to more than the router span "
                             "(clock skew or overlapping spans): bus + network clamped to 0 for them")

    from switchyard.reporting.plots import plot_cost, plot_latency  # matplotlib only when needed
    latency_png = plot_latency(records, out_dir)
    cost_png = plot_cost(cost, out_dir)

    ends = [r.started_unix_s + r.e2e_s for r in records if math.isfinite(r.e2e_s)]
    window = (max(ends) - min(r.started_unix_s for r in records)) if ends else 0.0
    rollouts = [d for d in iter_jsonl(run_dir / "rollouts.jsonl") if d] if (run_dir / "rollouts.jsonl").exists() else []
    result = ReportResult(run_dir=run_dir, out_dir=out_dir, requests=len(records), percentiles=pct, cost=cost,
                          tail=tail, latency_png=latency_png, cost_png=cost_png, report_md=out_dir / REPORT_MD,
                          notes=notes, window_s=max(window, 0.0), rollouts=rollouts)
    result.report_md.write_text(render_markdown(result), encoding="utf-8")
    return result


# ---------------------------------------------------------------- tables (shared by console and markdown)

def _stats_row(label: list[str], s: LatencyStats) -> list[str]:
    ratio = s.tail_ratio
    return label + [str(s.count), fmt_s(s.mean), fmt_s(s.p50), fmt_s(s.p95), fmt_s(s.p99), fmt_s(s.max),
                    f"{ratio:.1f}×" if math.isfinite(ratio) else "—"]


_STATS_HEADERS = ["n", "mean", "p50", "p95", "p99", "max", "p99/mean"]


def latency_tables(pct: PercentileReport) -> list[_Tab]:
    tabs = [_Tab("Latency, all ok requests", ["metric"] + _STATS_HEADERS,
                 [_stats_row([METRIC_LABELS[m]], pct.overall[m]) for m in METRICS])]
    for title, groups, col in (("by model", pct.by_model, "model"), ("by tenant", pct.by_tenant, "tenant")):
        if len(groups) > 1 or (groups and title == "by model"):
            rows = [_stats_row([key, METRIC_LABELS[m]], stats[m]) for key, stats in groups.items() for m in METRICS]
            tabs.append(_Tab(f"Latency {title}", [col, "metric"] + _STATS_HEADERS, rows))
    return tabs


def cost_tables(cost: CostReport) -> list[_Tab]:
    money = lambda x: fmt_money(x, cost.currency)  # noqa: E731
    tabs = [_Tab("Cost by component", ["component", "cost", "share"],
                 [[COMPONENT_LABELS[c], money(v), f"{v / cost.total:.1%}" if cost.total else "—"]
                  for c, v in cost.components.items()] + [["total", money(cost.total), "100%" if cost.total else "—"]])]
    for dim in DIMENSIONS:
        rows = []
        for key, line in cost.by[dim].items():
            rows.append([key, str(line.requests), f"{line.prompt_tokens:,}", f"{line.completion_tokens:,}",
                         f"{line.replica_seconds:,.1f}", money(line.prompt), money(line.completion),
                         money(line.replica), money(line.total),
                         f"{line.total / cost.total:.1%}" if cost.total else "—"])
        tabs.append(_Tab(f"Cost by {DIMENSION_LABELS[dim]}",
                         [DIMENSION_LABELS[dim], "requests", "prompt tok", "completion tok", "replica-s",
                          "prompt", "completion", "replica time", "total", "share"], rows))
    return tabs


def tail_tables(tail: TailReport) -> list[_Tab]:
    qs = sorted(tail.slices)
    headers = ["hop", "mean, all"] + [f"mean, ≥p{q:g}" for q in qs] + [f"share, ≥p{q:g}" for q in qs]
    rows = []
    for hop in HOPS:
        rows.append([HOP_LABELS[hop], fmt_s(tail.mean_hops[hop])]
                    + [fmt_s(tail.slices[q].mean_hops[hop]) for q in qs]
                    + [f"{tail.slices[q].shares[hop]:.0%}" for q in qs])
    rows.append(["end to end", fmt_s(tail.mean_e2e_s)] + [fmt_s(tail.slices[q].mean_e2e_s) for q in qs] + [""] * len(qs))
    tabs = [_Tab(f"Tail attribution ({tail.traces} traces): mean hop time, slow set vs all", headers, rows)]
    slow_rows = []
    for b in tail.slowest:
        top = max(HOPS, key=lambda h: b.hops[h])
        slow_rows.append([b.trace_id, b.request_id or "—", b.model or "—", fmt_s(b.e2e_s),
                          f"{HOP_LABELS[top]} ({b.hops[top] / b.e2e_s:.0%})" if b.e2e_s > 0 else HOP_LABELS[top]])
    tabs.append(_Tab("Slowest traces", ["trace", "request", "model", "e2e", "largest hop"], slow_rows))
    return tabs


def headline(result: ReportResult) -> list[str]:
    pct, cost = result.percentiles, result.cost
    errors = ", ".join(f"{k}: {v}" for k, v in pct.errors.items()) or "none"
    lines = [f"Requests: {pct.requests} ({pct.ok} ok; errors: {errors}) over {result.window_s:.1f} s",
             f"Total cost: {fmt_money(cost.total, cost.currency)} (prices: {cost.prices_source})",
             f"Biggest cost driver: {cost.driver.describe() if cost.driver else 'none (no cost)'}"]
    if result.tail:
        for q in sorted(result.tail.slices):
            s = result.tail.slices[q]
            lines.append(f"Tail {s.describe()}; grew most vs all requests: {HOP_LABELS[s.grew_most]}")
    return lines


# ---------------------------------------------------------------- markdown

def _numeric_columns(tab: _Tab) -> list[bool]:
    """Columns whose cells all look like numbers (right-aligned); the rest are labels."""
    def numeric(cell: str) -> bool:
        return cell == "" or cell[0] in "0123456789$—-"
    return [i > 0 and all(numeric(row[i]) for row in tab.rows) for i in range(len(tab.headers))]


def _md_table(tab: _Tab) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    out = [f"**{tab.title}**", "", "| " + " | ".join(map(esc, tab.headers)) + " |",
           "|" + "|".join("---:" if num else "---" for num in _numeric_columns(tab)) + "|"]
    out += ["| " + " | ".join(map(esc, row)) + " |" for row in tab.rows]
    return "\n".join(out) + "\n"


def rollout_tables(decisions: Sequence[dict[str, Any]]) -> list[_Tab]:
    """Rollout decisions (canary steps, promotions, rollbacks, switches) in time order."""
    if not decisions:
        return []
    rows = [[time.strftime("%H:%M:%S", time.gmtime(float(d.get("at", 0)))), str(d.get("model", "")),
             str(d.get("mode", "")), str(d.get("kind", "")), f"{d.get('baseline', '')} → {d.get('candidate', '')}",
             f"{float(d.get('weight', 0)):.0%}", str(d.get("by", "")), str(d.get("reason", ""))[:160]]
            for d in sorted(decisions, key=lambda d: float(d.get("at", 0)))]
    return [_Tab("Rollout decisions", ["time (UTC)", "model", "mode", "decision", "versions", "weight", "by", "reason"],
                 rows)]


def render_markdown(result: ReportResult) -> str:
    parts = [f"# Switchyard run report: `{result.run_dir.name or result.run_dir}`", ""]
    parts += [f"- {line}" for line in headline(result)] + [""]
    parts += ["## Latency", "",
              "Percentiles use numpy's linear interpolation over ok requests; ITL pools every inter-token gap.",
              ""]
    parts += [_md_table(t) for t in latency_tables(result.percentiles)]
    parts += [f"![latency]({result.latency_png.name})", "", "## Cost", ""]
    parts += ["Token cost = tokens × per-1M prices of the request's model; replica cost = replica-seconds × "
              "replica-hour price / 3600, attributed to the replica and its model. For tenants and request types, "
              "each replica's cost is split in proportion to the tokens (prompt + completion) they had on that "
              "replica; a replica that served nothing is listed as (idle replicas).", ""]
    parts += [_md_table(t) for t in cost_tables(result.cost)]
    parts += [f"![cost]({result.cost_png.name})", "", "## Tail attribution", ""]
    if result.tail is None:
        parts += [f"No {SPANS_FILE} (or no complete trace) in the run directory.", ""]
    else:
        parts += ["Hops per trace: router processing (router.prepare), queue wait (batcher.queue), batcher "
                  "scheduling (batcher.schedule outside the others), prefill (worker.prefill), decode "
                  "(worker.decode); bus + network = router.request span minus the others, clamped at 0.", ""]
        parts += [_md_table(t) for t in tail_tables(result.tail)]
    if result.rollouts:
        parts += ["## Rollouts", ""] + [_md_table(t) for t in rollout_tables(result.rollouts)]
    if result.notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    return "\n".join(parts)


# ---------------------------------------------------------------- console

def _rich_table(tab: _Tab) -> Table:
    table = Table(title=tab.title, title_justify="left")
    for h, num in zip(tab.headers, _numeric_columns(tab)):
        table.add_column(h, justify="right" if num else "left", no_wrap=not num)
    for row in tab.rows:
        table.add_row(*row)
    return table


def print_report(result: ReportResult, console: Console | None = None) -> None:
    console = console or Console()
    tabs: Sequence[_Tab] = latency_tables(result.percentiles) + cost_tables(result.cost)
    if result.tail is not None:
        tabs = list(tabs) + tail_tables(result.tail)
    tabs = list(tabs) + rollout_tables(result.rollouts)
    for tab in tabs:
        console.print(_rich_table(tab))
    for line in headline(result):
        console.print(f"[bold]{line}[/bold]")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"wrote {result.report_md}, {result.latency_png}, {result.cost_png}")


def report_command(
    run_dir: Path = typer.Argument(..., help="run directory holding requests.jsonl (+ replicas.jsonl, spans.jsonl)"),
    prices: Optional[Path] = typer.Option(None, "--prices", help="price TOML (default: built-in table; "
                                          "format: libs/switchyard/reporting/prices.example.toml)"),
    out: Optional[Path] = typer.Option(None, "--out", help="where PNGs and report.md go (default: RUN_DIR)"),
) -> None:
    """Latency percentiles, cost by tenant/model/replica/request type, and tail attribution of a run."""
    try:
        result = report(run_dir, prices=prices, out=out)
    except (FileNotFoundError, ValueError) as exc:
        Console(stderr=True).print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    print_report(result)


report_app = typer.Typer(help="Reports of a finished run.", no_args_is_help=True)
report_app.command("report")(report_command)


if __name__ == "__main__":  # pragma: no cover
    report_app()
