"""Exports spans as JSON lines for `switchyard report` (tail attribution), one object per
span: trace_id, span_id, parent_span_id, name, service, start_unix_s, end_unix_s, attributes."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


class JsonlSpanExporter(SpanExporter):
    def __init__(self, path: str | Path, service: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.service = service
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            parent = span.parent
            lines.append(json.dumps({
                "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
                "parent_span_id": f"{parent.span_id:016x}" if parent else None,
                "name": span.name, "service": self.service,
                "start_unix_s": (span.start_time or 0) / 1e9, "end_unix_s": (span.end_time or 0) / 1e9,
                "attributes": dict(span.attributes or {})}))
        with self._lock, self.path.open("a") as f:  # O_APPEND: several processes share one file
            f.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass
