"""gRPC server interceptor that continues the caller's trace: the W3C traceparent in the
call metadata becomes the current context while the handler runs, so spans the handler
opens join the client's trace."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import grpc
from opentelemetry import context as otel_context

from .tracing import extract_context, tracing_enabled


def _with_context(behavior: Callable[..., Awaitable[Any]], ctx: otel_context.Context) -> Callable[..., Awaitable[Any]]:
    async def run(request: Any, servicer_context: grpc.aio.ServicerContext) -> Any:
        token = otel_context.attach(ctx)
        try:
            return await behavior(request, servicer_context)
        finally:
            otel_context.detach(token)
    return run


class TraceContextInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not tracing_enabled():
            return handler
        metadata = dict(details.invocation_metadata or ())  # type: ignore[arg-type]
        if "traceparent" not in metadata:
            return handler
        ctx = extract_context(metadata)
        kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_with_context(handler.unary_unary, ctx), **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_with_context(handler.unary_stream, ctx), **kw)
        return handler
