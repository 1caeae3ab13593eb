"""Readable tables for `switchyard rollout status` and `switchyard experiment report`.

Pure formatting: the caller gathers the state (KV bucket, per-arm metrics) and prints the
returned `rich.table.Table` with a Console. Numbers are formatted the way the analysis reasons
are (ms below 0.1 s, seconds above), so the table and the log lines read the same.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from rich.table import Table

from switchyard.rollouts.analysis import Thresholds, Verdict
from switchyard.rollouts.canary import CanaryController
from switchyard.rollouts.experiments import ArmComparison


def _s(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x * 1000:.1f} ms" if abs(x) < 0.1 else f"{x:.2f} s"


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1%}"


def _num(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.4g}"


def _schedule(controller: CanaryController) -> str:
    """e.g. '1% → 5% → [25%] → 50% → 100%', the current step in brackets."""
    parts = []
    for i, w in enumerate(controller.plan.judged_steps):
        txt = f"{w:.0%}" if w >= 0.01 else f"{w:.1%}"
        parts.append(f"[{txt}]" if controller.outcome == "running" and i == controller.step else txt)
    parts.append("[100%]" if controller.outcome == "promoted" else "100%")
    return " → ".join(parts)


def verdict_rows(table: Table, verdict: Verdict, thresholds: Thresholds) -> None:
    """Append the analysed figures (baseline, candidate, comparison, limit) to a 5-column table."""
    f = verdict.figures
    inc = f.get("error_rate_increase", f.get("candidate_error_rate", math.nan) - f.get("baseline_error_rate", math.nan))
    table.add_row("requests", _num(f["baseline_requests"]), _num(f["candidate_requests"]), "",
                  f">= {thresholds.min_requests} each")
    def p_of(key: str) -> str:  # the breach test's p-value, when a figure was over its limit
        return f" (p {f[key]:.2g})" if key in f else ""
    table.add_row("error rate", _pct(f["baseline_error_rate"]), _pct(f["candidate_error_rate"]),
                  "-" if math.isnan(inc) else f"{inc * 100:+.1f} pts{p_of('error_breach_p')}",
                  f"<= +{thresholds.max_error_rate_increase * 100:g} pts")
    for label, key, limit in (("TTFT p99", "ttft", thresholds.max_ttft_p99_ratio),
                              ("ITL p99", "itl", thresholds.max_itl_p99_ratio)):
        r = f[f"{key}_p99_ratio"]
        table.add_row(label, _s(f[f"baseline_{key}_p99_s"]), _s(f[f"candidate_{key}_p99_s"]),
                      "-" if math.isnan(r) else f"x{r:.2f}{p_of(f'{key}_p99_breach_p')}", f"<= x{limit:g}")
    table.add_row("E2E p99", _s(f["baseline_e2e_p99_s"]), _s(f["candidate_e2e_p99_s"]), "", "(not judged)")


def rollout_table(*, model: str, baseline: str, candidate: str, mode: str, weight: float, state: str,
                  reason: str = "", controller: CanaryController | None = None,
                  verdict: Verdict | None = None, now: float | None = None,
                  title: str | None = None) -> Table:
    """Status of one rollout: which versions, how much traffic the candidate gets, where the
    canary is in its schedule, the last decision and (if given) the latest analysis figures."""
    table = Table(title=title or f"rollout of {model}", show_header=True, header_style="bold")
    for col, justify in (("", "left"), ("baseline", "right"), ("candidate", "right"),
                         ("comparison", "right"), ("limit", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    table.add_row("version", baseline, candidate, "", "")
    table.add_row("mode / state", mode, state, "", "")
    table.add_row("traffic", f"{1 - weight:.1%}", f"{weight:.1%}", "", "")
    if controller is not None:
        table.add_row("schedule", _schedule(controller), "", "", "")
        if controller.outcome == "running" and now is not None:
            table.add_row("step running", f"{max(0.0, now - controller.step_started_at):.0f} s",
                          f"of {controller.plan.step_duration_s:g} s", "", "")
    if verdict is not None:
        thresholds = controller.plan.thresholds if controller is not None else Thresholds()
        table.add_section()
        verdict_rows(table, verdict, thresholds)
        table.add_row("analysis", verdict.outcome, "", "", "")
    if reason:
        table.add_section()
        table.add_row("last decision", reason, "", "", "")
    return table


def _is_time(metric: str) -> bool:
    return metric.endswith("_s") or metric in ("ttft", "itl", "e2e")


def experiment_table(comparisons: Sequence[ArmComparison], title: str = "experiment report",
                     skipped: Mapping[str, str] | None = None) -> Table:
    """One row per metric: arm means and sizes, B - A with its CI, Welch p-value, the verdict
    ("significant" only when p < alpha) and the per-arm n the observed effect would need.
    Time metrics (names ending in _s) share one unit per row; `skipped` rows say why untested."""
    table = Table(title=title, show_header=True, header_style="bold")
    for col in ("metric", "arm A", "arm B", "B - A", "CI", "p (Welch)", "verdict", "n/arm needed"):
        table.add_column(col, justify="left" if col in ("metric", "verdict") else "right")
    for c in comparisons:
        if _is_time(c.metric):
            big = max(abs(c.mean_a), abs(c.mean_b)) >= 1.0
            scale, unit, digits = (1.0, " s", 3) if big else (1000.0, " ms", 1)

            def fmt(x: float, sign: bool = False) -> str:
                return f"{x * scale:{'+' if sign else ''}.{digits}f}{unit}"
        else:
            def fmt(x: float, sign: bool = False) -> str:
                return f"{x:{'+' if sign else ''}.4g}"
        verdict = (f"[bold green]significant[/] (p < {c.alpha:g})" if c.significant
                   else f"not significant (p >= {c.alpha:g})")
        table.add_row(
            c.metric,
            f"{c.arm_a}: {fmt(c.mean_a)} (n={c.n_a})",
            f"{c.arm_b}: {fmt(c.mean_b)} (n={c.n_b})",
            fmt(c.difference, sign=True),
            f"{c.confidence:.0%}: {fmt(c.ci_low, sign=True)} .. {fmt(c.ci_high, sign=True)}",
            f"{c.p_value:.3g}",
            verdict,
            "-" if c.needed_per_arm is None else str(c.needed_per_arm),
        )
    for metric, why in (skipped or {}).items():
        table.add_row(metric, "", "", "", "", "", f"not tested: {why}", "")
    return table
