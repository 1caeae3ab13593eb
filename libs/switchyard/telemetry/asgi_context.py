"""ASGI middleware that continues the caller's trace from the `traceparent` header (the
HTTP counterpart of grpc_context.TraceContextInterceptor)."""

from __future__ import annotations

from opentelemetry import context as otel_context
from starlette.types import ASGIApp, Receive, Scope, Send

from .tracing import extract_context, tracing_enabled


class TraceContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and tracing_enabled():
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if "traceparent" in headers:
                token = otel_context.attach(extract_context(headers))
                try:
                    await self.app(scope, receive, send)
                finally:
                    otel_context.detach(token)
                return
        await self.app(scope, receive, send)
