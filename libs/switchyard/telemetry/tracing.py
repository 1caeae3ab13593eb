"""Tracing set-up from the standard OTEL_* environment variables.

Tracing is on when an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) or SWITCHYARD_SPANS_FILE names a JSONL file, and
OTEL_SDK_DISABLED is not true. Otherwise no provider is installed and every span is the
API's non-recording no-op, so the hot path pays (almost) nothing — see docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, MutableMapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject

log = logging.getLogger(__name__)
SPANS_FILE_ENV = "SWITCHYARD_SPANS_FILE"
TRACER_NAME = "switchyard"

_provider = None


def tracing_requested() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").lower() == "none":
        return bool(os.environ.get(SPANS_FILE_ENV))
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get(SPANS_FILE_ENV))


def setup_tracing(service_name: str, extra_exporters: list[object] | None = None) -> bool:
    """Install a TracerProvider for this process when tracing is requested (or exporters
    are given, as tests do with the in-memory exporter). Returns whether tracing is on."""
    global _provider
    if not tracing_requested() and not extra_exporters:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # endpoint etc. from OTEL_* env
    if os.environ.get(SPANS_FILE_ENV):
        from .file_exporter import JsonlSpanExporter
        provider.add_span_processor(BatchSpanProcessor(JsonlSpanExporter(os.environ[SPANS_FILE_ENV], service_name)))
    for exporter in extra_exporters or []:
        provider.add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[arg-type]
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing on for %s", service_name)
    return True


def tracing_enabled() -> bool:
    return _provider is not None


def shutdown_tracing() -> None:
    """Flush pending spans (called on graceful stop)."""
    if _provider is not None:
        _provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject_context(carrier: MutableMapping[str, str], ctx: otel_context.Context | None = None) -> MutableMapping[str, str]:
    """Write the W3C traceparent (and tracestate) of `ctx` (default: current) into carrier."""
    inject(carrier, context=ctx)
    return carrier


def extract_context(carrier: Mapping[str, str] | None) -> otel_context.Context:
    return extract(carrier or {})


def context_from_traceparent(traceparent: str) -> otel_context.Context:
    return extract({"traceparent": traceparent}) if traceparent else otel_context.Context()


def current_traceparent() -> str:
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent", "")
