"""Report figures (PNG), drawn with matplotlib's Agg canvas (no display, no pyplot state).

- latency.png: TTFT, ITL and E2E side by side, each a histogram with its CDF and vertical
  lines at mean, p50, p95, p99 — a low mean next to a far-right p99 line is the tail at a
  glance. The x axis is logarithmic when the samples span more than 20x.
- cost.png: cost by tenant, model, replica and request type, bars stacked by component
  (prompt tokens, completion tokens, replica time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from switchyard.reporting.cost import COMPONENT_LABELS, COMPONENTS, DIMENSION_LABELS, DIMENSIONS, CostReport, fmt_money
from switchyard.reporting.percentiles import METRIC_LABELS, METRICS, LatencyStats, fmt_s, metric_samples
from switchyard.reporting.records import RequestRecord

LATENCY_PNG = "latency.png"
COST_PNG = "cost.png"
LOG_SPREAD = 20.0  # max/min ratio above which the latency axis goes logarithmic

_LINES = (("mean", "black", "-"), ("p50", "tab:blue", "--"), ("p95", "tab:orange", "-."), ("p99", "tab:red", ":"))
_COMPONENT_COLOURS = {"prompt": "tab:blue", "completion": "tab:green", "replica": "tab:gray"}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def _latency_axis(ax, samples: Sequence[float], title: str) -> None:  # type: ignore[no-untyped-def]
    arr = np.asarray(samples, dtype=float)
    arr = arr[np.isfinite(arr)]
    ax.set_title(title)
    if arr.size == 0:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    stats = LatencyStats.of(arr)
    lo, hi = float(arr.min()), float(arr.max())
    log_x = lo > 0 and hi / lo > LOG_SPREAD
    if hi == lo:
        pad = abs(lo) * 0.05 or 1e-3
        bins = np.linspace(lo - pad, hi + pad, 11)
    elif log_x:
        bins = np.geomspace(lo, hi, 50)
    else:
        bins = np.linspace(lo, hi, 50)
    ax.hist(arr, bins=bins, color="tab:blue", alpha=0.35, label=f"requests (n={arr.size})")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("seconds" + (" (log scale)" if log_x else ""))
    ax.set_ylabel("count")
    cdf = ax.twinx()
    xs = np.sort(arr)
    cdf.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", color="tab:purple", alpha=0.6, linewidth=1)
    cdf.set_ylim(0, 1.02)
    cdf.set_ylabel("CDF")
    for name, colour, style in _LINES:
        value = getattr(stats, name)
        ax.axvline(value, color=colour, linestyle=style, linewidth=1.8, label=f"{name} {fmt_s(value)}")
    # Below the axes, so it never covers the lines it explains.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize="small", frameon=False)
    ratio = stats.tail_ratio
    if np.isfinite(ratio):
        ax.set_title(f"{title} — p99 is {ratio:.1f}× the mean")


def _short(label: str, width: int = 24) -> str:
    """Long keys keep both ends ("smollm2-13…nstruct-int4-0"): replica ids differ at the end."""
    if len(label) <= width:
        return label
    head = (width - 1) // 2
    return label[:head] + "…" + label[-(width - 1 - head):]


def plot_latency(records: Sequence[RequestRecord], out_dir: Path, name: str = LATENCY_PNG) -> Path:
    """Histogram + CDF of TTFT, ITL and E2E with mean/p50/p95/p99 lines; returns the PNG path."""
    # Fixed margins rather than constrained layout: half the drawing time, same picture.
    fig = Figure(figsize=(18, 6))
    fig.subplots_adjust(left=0.04, right=0.96, bottom=0.27, top=0.87, wspace=0.32)
    axes = fig.subplots(1, len(METRICS))
    for ax, metric in zip(axes, METRICS):
        _latency_axis(ax, metric_samples(records, metric), METRIC_LABELS[metric])
    fig.suptitle("Latency distribution (ok requests)")
    return _save(fig, Path(out_dir) / name)


def plot_cost(report: CostReport, out_dir: Path, name: str = COST_PNG, top: int = 12) -> Path:
    """Stacked cost bars by tenant, model, replica and request type; returns the PNG path."""
    fig = Figure(figsize=(14, 9))
    fig.subplots_adjust(left=0.14, right=0.98, bottom=0.07, top=0.91, wspace=0.42, hspace=0.3)
    axes = fig.subplots(2, 2).ravel()
    for ax, dim in zip(axes, DIMENSIONS):
        lines = list(report.by.get(dim, {}).items())[:top]
        ax.set_title(f"by {DIMENSION_LABELS[dim]}")
        if not lines:
            ax.text(0.5, 0.5, "no cost", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        keys = [_short(k) for k, _ in lines][::-1]  # largest at the top
        left = np.zeros(len(keys))
        for comp in COMPONENTS:
            values = np.array([line.component(comp) for _, line in lines][::-1])
            ax.barh(keys, values, left=left, color=_COMPONENT_COLOURS[comp], label=COMPONENT_LABELS[comp])
            left += values
        ax.set_xlabel(report.currency)
        ax.legend(fontsize="small", loc="lower right")
    driver = report.driver.describe() if report.driver else "none"
    fig.suptitle(f"Cost {fmt_money(report.total, report.currency)} — biggest driver: {driver}")
    return _save(fig, Path(out_dir) / name)
