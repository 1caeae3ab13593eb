"""Everything the router observes about a request, in one place: the `router.request`
span and its attributes, Prometheus metrics, and the per-request record for reports."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from switchyard.reporting.records import RecordWriter, RequestRecord, cap_samples
from switchyard.telemetry.metrics import LATENCY_BUCKETS
from switchyard.telemetry.tracing import tracer, tracing_enabled
from switchyard.v1 import generate_pb2

TTFT = Histogram("switchyard_time_to_first_token_seconds", "Router receipt to first token relayed",
                 ["model", "tenant"], buckets=LATENCY_BUCKETS)
ITL = Histogram("switchyard_inter_token_latency_seconds", "Gap between successive token chunks",
                ["model", "tenant"], buckets=LATENCY_BUCKETS)
E2E = Histogram("switchyard_request_duration_seconds", "Router receipt to the end of the stream",
                ["model", "tenant"], buckets=LATENCY_BUCKETS)
REQUESTS = Counter("switchyard_requests", "Requests by outcome code (OK or the error's gRPC code)",
                   ["model", "tenant", "code"])
PROMPT_TOKENS = Counter("switchyard_prompt_tokens", "Prompt tokens of finished requests", ["model", "tenant"])
COMPLETION_TOKENS = Counter("switchyard_completion_tokens", "Tokens generated", ["model", "tenant"])
INFLIGHT = Gauge("switchyard_router_inflight_requests", "Requests being served", ["model"])
FAILOVERS = Counter("switchyard_failovers", "Requests re-dispatched after their replica failed, by phase "
                    "(before_first_token: a retry; mid_stream: a continuation)", ["model", "phase"])
MODEL_ROUTED = Counter("switchyard_model_routed", "Requests for a virtual model, by the model chosen to serve them",
                       ["route", "model"])


class ServedModelsCollector(Collector):
    """Live replicas per served model as this router sees them, read at scrape time: with
    several routers each holds its own fleet view, and a stack waits until all of them see
    every replica (LocalStack.wait_ready)."""

    def __init__(self, served_models: Callable[[], dict[str, Sized]]) -> None:
        self._served_models = served_models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("switchyard_router_live_replicas",
                                   "Live replicas serving each model, in this router's fleet view", labels=["model"])
        for model, replicas in sorted(self._served_models().items()):
            family.add_metric([model], len(replicas))
        yield family


@dataclass
class Observation:
    model: str
    tenant: str
    request_type: str
    request_id: str
    writer: RecordWriter | None
    started: float = field(default_factory=time.monotonic)
    started_unix: float = field(default_factory=time.time)
    chunk_times: list[float] = field(default_factory=list)
    span: Span | None = None
    completion_tokens: int = 0
    served_model: str = ""  # set when a virtual model resolved to another
    failovers: int = 0
    difficulty: float | None = None

    def on_failover(self, failed: str, replica_id: str, reason: str, tokens_so_far: int) -> None:
        """The request moved from replica `failed` to `replica_id` after `tokens_so_far` tokens."""
        self.failovers += 1
        FAILOVERS.labels(self.served_model or self.model, "mid_stream" if tokens_so_far else "before_first_token").inc()
        if self.span is not None:
            self.span.add_event("failover", {"switchyard.failed_replica": failed, "switchyard.replica": replica_id,
                                             "switchyard.reason": reason, "switchyard.tokens_so_far": tokens_so_far})

    def routed(self, model: str, difficulty: float | None) -> None:
        """The request will be served by `model` (a virtual model's choice when it differs)."""
        if model == self.model:
            return
        self.served_model, self.difficulty = model, difficulty
        MODEL_ROUTED.labels(self.model, model).inc()
        if self.span is not None:
            self.span.set_attribute("switchyard.served_model", model)
            if difficulty is not None:
                self.span.set_attribute("switchyard.difficulty", difficulty)

    def context(self) -> Context | None:
        """Trace context to propagate downstream (None when tracing is off)."""
        return trace.set_span_in_context(self.span) if self.span is not None else None

    def on_tokens(self, count: int) -> None:
        self.chunk_times.append(time.monotonic())
        self.completion_tokens += count

    def finish(self, *, code: str, replica_id: str = "", prompt_tokens: int = 0, finish_reason: int = 0,
               queue_wait_s: float = 0.0, batch_size: int = 0, cached_prompt_tokens: int = 0,
               message: str = "") -> None:
        end = time.monotonic()
        e2e = end - self.started
        ttft = self.chunk_times[0] - self.started if self.chunk_times else None
        gaps = RequestRecord.gaps(self.chunk_times)
        labels = (self.model, self.tenant)
        REQUESTS.labels(*labels, code).inc()
        INFLIGHT.labels(self.model).dec()
        if code == "OK":
            E2E.labels(*labels).observe(e2e)
            if ttft is not None:
                TTFT.labels(*labels).observe(ttft)
            itl = ITL.labels(*labels)
            for gap in gaps:
                itl.observe(gap)
            PROMPT_TOKENS.labels(*labels).inc(prompt_tokens)
        COMPLETION_TOKENS.labels(*labels).inc(self.completion_tokens)
        trace_id = None
        if self.span is not None:
            ctx = self.span.get_span_context()
            trace_id = f"{ctx.trace_id:032x}"
            self.span.set_attributes({
                "switchyard.replica": replica_id, "switchyard.prompt_tokens": prompt_tokens,
                "switchyard.output_tokens": self.completion_tokens, "switchyard.batch_size": batch_size,
                "switchyard.cached_prompt_tokens": cached_prompt_tokens,
                "switchyard.queue_wait_s": queue_wait_s, "switchyard.ttft_s": ttft if ttft is not None else -1.0,
                "switchyard.code": code, "switchyard.failovers": self.failovers})
            if code != "OK":
                self.span.set_status(Status(StatusCode.ERROR, message))
            self.span.end()
        if self.writer is not None:
            self.writer.write(RequestRecord(
                request_id=self.request_id, tenant=self.tenant, model=self.served_model or self.model,
                requested_model=self.model if self.served_model else "", difficulty=self.difficulty,
                failovers=self.failovers,
                replica_id=replica_id,
                request_type=self.request_type, started_unix_s=self.started_unix, ttft_s=ttft, e2e_s=e2e,
                queue_wait_s=queue_wait_s, prompt_tokens=prompt_tokens, completion_tokens=self.completion_tokens,
                cached_prompt_tokens=cached_prompt_tokens,
                finish_reason=generate_pb2.FinishReason.Name(finish_reason).removeprefix("FINISH_REASON_").lower()
                if code == "OK" else "", status="ok" if code == "OK" else code,
                inter_token_s=cap_samples(gaps), trace_id=trace_id))


class RequestObserver:
    def __init__(self, writer: RecordWriter | None = None) -> None:
        self.writer = writer

    def begin(self, model: str, tenant: str, request_type: str, request_id: str) -> Observation:
        obs = Observation(model, tenant, request_type, request_id, self.writer)
        INFLIGHT.labels(model).inc()
        if tracing_enabled():
            obs.span = tracer().start_span("router.request", kind=trace.SpanKind.SERVER, attributes={
                "switchyard.model": model, "switchyard.tenant": tenant, "switchyard.request_type": request_type,
                "switchyard.request_id": request_id})
        return obs

    def prepare_span(self, obs: Observation) -> Span | None:
        if obs.span is None:
            return None
        return tracer().start_span("router.prepare", context=obs.context())
