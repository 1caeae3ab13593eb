"""Latency percentiles: mean, p50, p95, p99 of TTFT, ITL and E2E, overall, by model, by tenant.

Percentiles are numpy's default (``method="linear"``): for n sorted samples, the q-th
percentile sits at index q/100 * (n - 1), interpolated between neighbours. Example: 95
requests at 100 ms and 5 at 10 s give mean 595 ms, p50 100 ms, p95 595 ms (index 94.05,
between 100 ms and 10 s), p99 10 s (index 98.01, between two 10 s samples).

Which samples count:
- only requests with status "ok" (errors are counted separately in `PercentileReport.errors`;
  a fast rejection would otherwise flatter every latency number);
- TTFT: requests that produced a first token (ttft_s not None);
- ITL: every inter-token gap of every request, pooled (a long generation contributes more
  samples than a short one — this is the per-token view of streaming smoothness);
- E2E: every ok request.
Non-finite values (NaN, inf) are dropped.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from switchyard.reporting.records import RequestRecord

METRICS = ("ttft", "itl", "e2e")
METRIC_LABELS = {"ttft": "TTFT", "itl": "ITL", "e2e": "E2E"}
QUANTILES = (50.0, 95.0, 99.0)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one set of latency samples, in seconds (NaN when count is 0)."""

    count: int
    mean: float
    p50: float
    p95: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: Iterable[float]) -> "LatencyStats":
        arr = np.asarray([x for x in samples if x is not None], dtype=float)
        arr = arr[np.isfinite(arr)]
        if arr.size == 0:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, nan)
        p50, p95, p99 = (float(v) for v in np.percentile(arr, QUANTILES))
        return cls(int(arr.size), float(arr.mean()), p50, p95, p99, float(arr.min()), float(arr.max()))

    @property
    def tail_ratio(self) -> float:
        """p99 / mean: how much worse the tail is than the average (NaN if undefined)."""
        return self.p99 / self.mean if self.count and self.mean > 0 else math.nan


def metric_samples(records: Iterable[RequestRecord], metric: str) -> list[float]:
    """Samples of one metric ("ttft", "itl", "e2e") from the ok requests among `records`."""
    ok = [r for r in records if r.ok]
    if metric == "ttft":
        return [r.ttft_s for r in ok if r.ttft_s is not None]
    if metric == "itl":
        return [gap for r in ok for gap in r.inter_token_s]
    if metric == "e2e":
        return [r.e2e_s for r in ok]
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def summarize(records: Sequence[RequestRecord]) -> dict[str, LatencyStats]:
    """metric → LatencyStats for one group of requests."""
    return {m: LatencyStats.of(metric_samples(records, m)) for m in METRICS}


@dataclass
class PercentileReport:
    requests: int
    ok: int
    errors: dict[str, int]  # status → count, for status != "ok"
    overall: dict[str, LatencyStats]
    by_model: dict[str, dict[str, LatencyStats]] = field(default_factory=dict)
    by_tenant: dict[str, dict[str, LatencyStats]] = field(default_factory=dict)


def group_by(records: Iterable[RequestRecord], key: Callable[[RequestRecord], str]) -> dict[str, list[RequestRecord]]:
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(key(r) or "(unknown)", []).append(r)
    return dict(sorted(groups.items()))


def percentile_report(records: Sequence[RequestRecord]) -> PercentileReport:
    errors = Counter(r.status for r in records if not r.ok)
    return PercentileReport(
        requests=len(records),
        ok=sum(1 for r in records if r.ok),
        errors=dict(sorted(errors.items())),
        overall=summarize(records),
        by_model={k: summarize(v) for k, v in group_by(records, lambda r: r.model).items()},
        by_tenant={k: summarize(v) for k, v in group_by(records, lambda r: r.tenant).items()},
    )


def fmt_s(seconds: float) -> str:
    """Human latency: '—' for NaN, µs/ms below a second, s above."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 0.9995e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 0.9995:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.3f} s"
