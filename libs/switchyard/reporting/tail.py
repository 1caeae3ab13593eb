"""Tail attribution: which hop makes the slowest requests slow.

Span file contract (<run_dir>/spans.jsonl, written by the services' span exporter): one JSON
object per line per finished span, with exactly these keys:

    {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",  # hex string, one trace per request
     "span_id": "00f067aa0ba902b7",                    # hex string, unique in the trace
     "parent_span_id": "a3ce929d0e0e4736" | null,      # null for the root span
     "name": "batcher.queue",                          # one of the SPAN_* names below
     "service": "batcher",                             # "router" | "batcher" | "worker" | ...
     "start_unix_s": 1718000000.123456,                # wall clock, float seconds
     "end_unix_s": 1718000000.234567,
     "attributes": {"request_id": "...", ...}}         # JSON object, may be {}

Every request has its own trace whose root is the router's SPAN_ROUTER_REQUEST span (it
should carry attributes request_id, tenant, model, replica_id when known; RequestRecord.
trace_id links a request record to it). Work done for a whole batch (a batched prefill or a
decode step) is recorded as a span in the trace of every request in the batch. Spans with
other names are allowed and ignored here.

Hops of one request (seconds):
- router_prepare: SPAN_ROUTER_PREPARE (validation, tokenisation, choosing a replica);
- queue: SPAN_QUEUE (waiting in the batcher for a batch slot);
- schedule: SPAN_BATCHER_SCHEDULE time not already covered by queue/prefill/decode spans
  (so it may be emitted either as a leaf or as a parent of those);
- prefill: SPAN_PREFILL;
- decode: SPAN_DECODE (one summary span or one per step — either way);
- bus_network: the root span's duration minus the sum of the hops above — NATS, gRPC,
  serialisation and anything not instrumented. Clamped at 0 when the hops add up to more
  than the root (clock skew between hosts, overlapping spans); such traces are counted in
  `TailReport.clamped`.
Several spans of the same name in a trace count as the length of their union (overlaps once).

For a quantile q (95, 99): the slow set is every trace whose end-to-end time (root span
duration) is at or above the q-th percentile of all traces' end-to-end times (numpy linear
interpolation). The dominant hop is the one with the largest share of the slow set's total
hop time; `grew_most` is the hop whose mean rose most from all requests to the slow set —
when one hop dominates every request (decode, typically), that is the one that explains
the tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from switchyard.reporting.records import SPANS_FILE, RequestRecord, interval_union_length, load_jsonl


SPAN_ROUTER_REQUEST = "router.request"
SPAN_ROUTER_PREPARE = "router.prepare"
SPAN_QUEUE = "batcher.queue"
SPAN_BATCHER_SCHEDULE = "batcher.schedule"
SPAN_PREFILL = "worker.prefill"
SPAN_DECODE = "worker.decode"

SPAN_KEYS = ("trace_id", "span_id", "parent_span_id", "name", "service", "start_unix_s", "end_unix_s", "attributes")

HOPS = ("router_prepare", "queue", "schedule", "prefill", "decode", "bus_network")
HOP_LABELS = {"router_prepare": "router processing", "queue": "queue wait", "schedule": "batcher scheduling",
              "prefill": "prefill", "decode": "decode", "bus_network": "bus + network"}
_HOP_SPANS = {"router_prepare": SPAN_ROUTER_PREPARE, "queue": SPAN_QUEUE, "prefill": SPAN_PREFILL,
              "decode": SPAN_DECODE}


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    service: str
    start_unix_s: float
    end_unix_s: float
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end_unix_s - self.start_unix_s)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SPAN_KEYS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Span":
        missing = [k for k in SPAN_KEYS if k not in data]
        if missing:
            raise KeyError(f"span without {missing}")
        attributes = data["attributes"] or {}
        if not isinstance(attributes, dict):
            raise ValueError("attributes must be an object")
        parent = data["parent_span_id"]
        return cls(trace_id=str(data["trace_id"]), span_id=str(data["span_id"]),
                   parent_span_id=None if parent in (None, "") else str(parent),
                   name=str(data["name"]), service=str(data["service"]),
                   start_unix_s=float(data["start_unix_s"]), end_unix_s=float(data["end_unix_s"]),
                   attributes=attributes)


def load_spans(path: Path) -> tuple[list[Span], int]:
    """(spans, number of lines skipped as unreadable) from a spans.jsonl file."""
    return load_jsonl(path, Span.from_dict)


def read_spans(run_dir: Path) -> list[Span]:
    """Spans of a run (<run_dir>/spans.jsonl); [] when the file is absent."""
    path = Path(run_dir) / SPANS_FILE
    return load_spans(path)[0] if path.exists() else []


@dataclass
class TraceBreakdown:
    """One request's end-to-end time split into hops (seconds)."""

    trace_id: str
    e2e_s: float
    hops: dict[str, float]
    clamped: bool = False  # hops summed to more than e2e; bus_network set to 0
    overshoot_s: float = 0.0  # by how much they exceeded it
    request_id: str = ""
    tenant: str = ""
    model: str = ""


def _intervals(spans: Iterable[Span]) -> list[tuple[float, float]]:
    return [(s.start_unix_s, s.end_unix_s) for s in spans]


def breakdown_trace(trace_id: str, spans: Sequence[Span]) -> TraceBreakdown | None:
    """Hop breakdown of one trace; None when it has no SPAN_ROUTER_REQUEST root."""
    roots = [s for s in spans if s.name == SPAN_ROUTER_REQUEST]
    if not roots:
        return None
    root = min(roots, key=lambda s: (s.parent_span_id is not None, -s.duration_s))
    by_name: dict[str, list[Span]] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    hops = {hop: interval_union_length(_intervals(by_name.get(name, []))) for hop, name in _HOP_SPANS.items()}
    worker_side = _intervals(by_name.get(SPAN_QUEUE, []) + by_name.get(SPAN_PREFILL, []) + by_name.get(SPAN_DECODE, []))
    schedule = _intervals(by_name.get(SPAN_BATCHER_SCHEDULE, []))
    hops["schedule"] = max(0.0, interval_union_length(schedule + worker_side) - interval_union_length(worker_side)) \
        if schedule else 0.0
    e2e = root.duration_s
    residual = e2e - sum(hops.values())
    hops["bus_network"] = max(0.0, residual)
    attrs = root.attributes
    return TraceBreakdown(trace_id=trace_id, e2e_s=e2e, hops={h: hops[h] for h in HOPS},
                          clamped=residual < 0, overshoot_s=max(0.0, -residual),
                          request_id=str(attrs.get("request_id", "")), tenant=str(attrs.get("tenant", "")),
                          model=str(attrs.get("model", "")))


def breakdown_traces(spans: Iterable[Span]) -> tuple[list[TraceBreakdown], int]:
    """(breakdowns, number of traces skipped for lacking a root span)."""
    traces: dict[str, list[Span]] = {}
    for s in spans:
        traces.setdefault(s.trace_id, []).append(s)
    out, skipped = [], 0
    for trace_id, trace_spans in traces.items():
        b = breakdown_trace(trace_id, trace_spans)
        if b is None:
            skipped += 1
        else:
            out.append(b)
    return out, skipped


@dataclass
class TailSlice:
    """The requests at or above one percentile of end-to-end time."""

    quantile: float  # e.g. 99.0
    threshold_s: float
    count: int
    mean_e2e_s: float
    mean_hops: dict[str, float]  # hop → mean seconds over the slow set
    shares: dict[str, float]  # hop → share of the slow set's total hop time (sums to 1)
    dominant: str  # hop with the largest share
    grew_most: str  # hop with the largest (slow mean − overall mean)

    def describe(self) -> str:
        return (f"p{self.quantile:g} (≥ {self.threshold_s * 1e3:.1f} ms, {self.count} requests): "
                f"{HOP_LABELS[self.dominant]} dominates ({self.shares[self.dominant]:.0%})")


@dataclass
class TailReport:
    traces: int
    skipped_no_root: int  # traces without a router.request span
    clamped: int  # traces whose hops exceeded the root span (bus_network clamped to 0)
    mean_e2e_s: float
    mean_hops: dict[str, float]  # hop → mean seconds over all traces
    slices: dict[float, TailSlice]  # quantile → slice
    slowest: list[TraceBreakdown]  # slowest traces, slowest first (at most 10)


def _mean_hops(items: Sequence[TraceBreakdown]) -> dict[str, float]:
    if not items:
        return {h: math.nan for h in HOPS}
    return {h: float(np.mean([b.hops[h] for b in items])) for h in HOPS}


def attribute_tail(spans: Iterable[Span], quantiles: Sequence[float] = (95.0, 99.0),
                   records: Sequence[RequestRecord] | None = None, slowest: int = 10) -> TailReport | None:
    """Tail attribution over the traces in `spans`; None when no trace has a root span.
    `records` (optional) fill in request id / tenant / model of traces whose root span
    lacks them, matched on RequestRecord.trace_id."""
    breakdowns, skipped = breakdown_traces(spans)
    if not breakdowns:
        return None
    if records:
        by_trace = {r.trace_id: r for r in records if r.trace_id}
        for b in breakdowns:
            r = by_trace.get(b.trace_id)
            if r is not None:
                b.request_id = b.request_id or r.request_id
                b.tenant = b.tenant or r.tenant
                b.model = b.model or r.model
    e2e = np.array([b.e2e_s for b in breakdowns])
    mean_all = _mean_hops(breakdowns)
    slices: dict[float, TailSlice] = {}
    for q in quantiles:
        threshold = float(np.percentile(e2e, q))
        slow = [b for b in breakdowns if b.e2e_s >= threshold]
        mean_slow = _mean_hops(slow)
        totals = {h: sum(b.hops[h] for b in slow) for h in HOPS}
        grand = sum(totals.values())
        shares = {h: (totals[h] / grand if grand > 0 else 0.0) for h in HOPS}
        dominant = max(HOPS, key=lambda h: totals[h])
        grew_most = max(HOPS, key=lambda h: mean_slow[h] - mean_all[h])
        slices[float(q)] = TailSlice(quantile=float(q), threshold_s=threshold, count=len(slow),
                                     mean_e2e_s=float(np.mean([b.e2e_s for b in slow])),
                                     mean_hops=mean_slow, shares=shares, dominant=dominant, grew_most=grew_most)
    ordered = sorted(breakdowns, key=lambda b: -b.e2e_s)
    return TailReport(traces=len(breakdowns), skipped_no_root=skipped, clamped=sum(b.clamped for b in breakdowns),
                      mean_e2e_s=float(e2e.mean()), mean_hops=mean_all, slices=slices, slowest=ordered[:slowest])
