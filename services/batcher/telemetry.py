"""The batcher's Prometheus metrics and its per-request spans.

Spans: `batcher.queue` (dispatch by the router → admission to the batch) and
`batcher.request` (admission → finish), both children of the router's span whose context
arrived in the NATS message headers; the worker parents its spans on `batcher.request`."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import Span
from prometheus_client import Counter, Gauge, Histogram

from switchyard.telemetry.metrics import BATCH_BUCKETS, LATENCY_BUCKETS
from switchyard.telemetry.tracing import current_traceparent, extract_context, tracer, tracing_enabled

QUEUE_DEPTH = Gauge("switchyard_queue_depth", "Requests waiting for this replica (queued in NATS + pulled)",
                    ["replica", "model"])
RUNNING = Gauge("switchyard_batch_running_sequences", "Sequences in the batch", ["replica", "model"])
TOKENS_IN_FLIGHT = Gauge("switchyard_batch_tokens_in_flight", "Prompt plus generated tokens of running sequences",
                         ["replica", "model"])
QUEUE_WAIT = Histogram("switchyard_queue_wait_seconds", "Dispatch to admission into the batch",
                       ["replica", "model"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("switchyard_batch_size", "Sequences decoded together per step", ["replica", "model"],
                       buckets=BATCH_BUCKETS)
GENERATED = Counter("switchyard_batcher_generated_tokens", "Tokens generated", ["replica", "model"])
FINISHED = Counter("switchyard_batcher_requests_finished", "Requests retired from the batch, by reason",
                   ["replica", "model", "reason"])


def start_request_spans(headers: dict[str, str] | None, dispatched_ns: int, admitted_ns: int,
                        attributes: dict[str, object]) -> tuple[Span | None, str]:
    """Record the queue span and open the request span; returns it and the traceparent the
    worker should parent on ("" when tracing is off or the request carried no context)."""
    if not tracing_enabled() or not headers or "traceparent" not in headers:
        return None, ""
    parent = extract_context(headers)
    t = tracer()
    t.start_span("batcher.queue", context=parent, start_time=min(dispatched_ns, admitted_ns),
                 attributes=attributes).end(end_time=admitted_ns)
    span = t.start_span("batcher.request", context=parent, start_time=admitted_ns, attributes=attributes)
    return span, current_traceparent_of(span)


def current_traceparent_of(span: Span) -> str:
    with trace.use_span(span, end_on_exit=False):
        return current_traceparent()
