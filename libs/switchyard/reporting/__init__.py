"""Run reports: latency percentiles, FinOps cost, tail attribution.

Files of a run directory (contracts in `records` and `tail`):
    requests.jsonl  RequestRecord per finished request   (RecordWriter.write)
    replicas.jsonl  ReplicaUsage per replica lifetime     (RecordWriter.write_replica)
    spans.jsonl     one span per line                     (see switchyard.reporting.tail)

`report(run_dir, prices=None, out=None)` (in `switchyard.reporting.cli`, also importable
from here) reads them and writes latency.png, cost.png and report.md.
"""

from __future__ import annotations

from typing import Any

from switchyard.reporting.cost import BUILTIN_PRICES, CostReport, ModelPrice, PriceTable, cost_report, load_prices
from switchyard.reporting.percentiles import LatencyStats, PercentileReport, percentile_report
from switchyard.reporting.records import (ITL_CAP, REPLICAS_FILE, REQUEST_CHAT, REQUEST_COMPLETION, REQUEST_GRPC,
                                          REQUESTS_FILE, SPANS_FILE, STATUS_OK, RecordWriter, ReplicaUsage,
                                          RequestRecord, read_records, read_replicas)
from switchyard.reporting.tail import (SPAN_BATCHER_SCHEDULE, SPAN_DECODE, SPAN_KEYS, SPAN_PREFILL, SPAN_QUEUE,
                                       SPAN_ROUTER_PREPARE, SPAN_ROUTER_REQUEST, Span, TailReport, attribute_tail,
                                       read_spans)

__all__ = [
    "BUILTIN_PRICES", "CostReport", "ITL_CAP", "LatencyStats", "ModelPrice", "PercentileReport", "PriceTable",
    "REPLICAS_FILE", "REQUESTS_FILE", "REQUEST_CHAT", "REQUEST_COMPLETION", "REQUEST_GRPC", "RecordWriter",
    "ReplicaUsage", "ReportResult", "RequestRecord", "SPANS_FILE", "SPAN_BATCHER_SCHEDULE", "SPAN_DECODE",
    "SPAN_KEYS", "SPAN_PREFILL", "SPAN_QUEUE", "SPAN_ROUTER_PREPARE", "SPAN_ROUTER_REQUEST", "STATUS_OK", "Span",
    "TailReport", "attribute_tail", "cost_report", "load_prices", "percentile_report", "read_records",
    "read_replicas", "read_spans", "report",
]


def __getattr__(name: str) -> Any:  # report() pulls in typer/rich/matplotlib: import on first use
    if name in ("report", "ReportResult"):
        from switchyard.reporting import cli
        return getattr(cli, name)
    raise AttributeError(name)
