"""gRPC front end: a thin servicer; proto ↔ domain conversion lives in the helpers here."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from typing import Callable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

from switchyard.v1 import generate_pb2, generate_pb2_grpc

from .cutoff import WriteCutoff
from .errors import RequestError
from .pipeline import Completion, GenerationRequest, RequestPipeline, TokenDelta


def api_key_from_metadata(context: grpc.aio.ServicerContext) -> str | None:
    """`authorization: Bearer <key>` (or `x-api-key: <key>`) from the call's metadata."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
        if key == "x-api-key":
            return value.strip()
    return None


# Pipeline field names → GenerateRequest's (errors name the field as the client sets it).
GRPC_FIELD_NAMES = {"temperature": "sampling.temperature", "top_p": "sampling.top_p", "top_k": "sampling.top_k",
                    "repetition_penalty": "sampling.repetition_penalty", "stop": "stop.stop",
                    "stop_token_ids": "stop.stop_token_ids", "token_ids": "token_ids.ids"}


def request_from_proto(msg: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> GenerationRequest:
    kind = msg.WhichOneof("input")
    remaining = context.time_remaining()
    return GenerationRequest(
        model=msg.model,
        text=msg.text if kind == "text" else None,
        token_ids=list(msg.token_ids.ids) if kind == "token_ids" else None,
        messages=[(m.role, m.content) for m in msg.chat.messages] if kind == "chat" else None,
        max_tokens=msg.max_tokens, sampling=msg.sampling, stop=list(msg.stop.stop),
        stop_token_ids=list(msg.stop.stop_token_ids), ignore_eos=msg.stop.ignore_eos,
        request_id=msg.request_id or uuid.uuid4().hex, session_id=msg.session_id,
        timeout_s=remaining if remaining is not None else None, field_names=dict(GRPC_FIELD_NAMES, prompt={
            "text": "text", "chat": "chat.messages", "token_ids": "token_ids.ids"}.get(kind or "", "input")))


def summary_to_proto(c: Completion) -> generate_pb2.FinalSummary:
    return generate_pb2.FinalSummary(
        finish_reason=c.finish_reason,
        usage=generate_pb2.Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                                 cached_prompt_tokens=c.cached_prompt_tokens),
        timings=generate_pb2.Timings(time_to_first_token_s=c.time_to_first_token_s,
                                     end_to_end_s=c.end_to_end_s, queue_wait_s=c.queue_wait_s),
        replica_id=c.replica_id, model=c.model)


def retry_metadata(error: RequestError) -> tuple[tuple[str, str | bytes], ...]:
    """A retry delay in the standard google.rpc.RetryInfo status detail (what gRPC client
    libraries read) and as plain `retry-after-s` metadata (what a human or curl reads)."""
    if not error.retry_after_s:
        return ()
    delay = duration_pb2.Duration()
    delay.FromTimedelta(datetime.timedelta(seconds=error.retry_after_s))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=error.kind.grpc_code.value[0], message=error.message, details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()), ("retry-after-s", f"{error.retry_after_s:.3f}"))


async def abort_with(context: grpc.aio.ServicerContext, error: RequestError) -> None:
    await context.abort(error.kind.grpc_code, error.message, trailing_metadata=retry_metadata(error))


class MalformedRequest:
    """What a request that is not a valid protobuf of its type deserializes to, so the handler
    answers INVALID_ARGUMENT (grpc would answer UNKNOWN for a deserializer that raises)."""

    def __init__(self, type_name: str, error: str) -> None:
        self.message = f"request is not a valid {type_name} protobuf: {error or 'cannot be parsed'}"


def _lenient(message_type: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError) as exc:
            return MalformedRequest(message_type.DESCRIPTOR.full_name, str(exc))
    return parse


def add_generation_servicer(servicer: "GenerationServicer", server: grpc.aio.Server) -> None:
    """generate_pb2_grpc.add_GenerationServicer_to_server with deserializers that turn a
    malformed request into MalformedRequest instead of raising."""
    g = generate_pb2
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(g.GenerateRequest),
            response_serializer=g.GenerateResponse.SerializeToString),
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete, request_deserializer=_lenient(g.GenerateRequest),
            response_serializer=g.CompleteResponse.SerializeToString),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, request_deserializer=_lenient(g.ListModelsRequest),
            response_serializer=g.ListModelsResponse.SerializeToString),
    }
    service = g.DESCRIPTOR.services_by_name["Generation"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _register_reflection_v1_descriptor() -> None:
    """grpcio-reflection ships only v1alpha; v1 is the same protocol (same messages and field
    numbers) in package grpc.reflection.v1. Its descriptor is added to the default pool so
    that clients can also describe the v1 service itself."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    from grpc_reflection.v1alpha import reflection_pb2
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    proto.ClearField("options")
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for f in message.field:
            if f.type_name:
                f.type_name = f.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)


def enable_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Server reflection as grpc.reflection.v1 (what current grpcurl and Postman ask first)
    and v1alpha (older clients), listing both."""
    from grpc_reflection.v1alpha import reflection, reflection_pb2
    from grpc_reflection.v1alpha._async import ReflectionServicer
    _register_reflection_v1_descriptor()
    names = (*service_names, reflection.SERVICE_NAME, REFLECTION_V1)
    reflection.enable_server_reflection(names, server)
    servicer = ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        REFLECTION_V1, {"ServerReflectionInfo": handler}),))


async def reject_malformed(request: object, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, MalformedRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    def __init__(self, pipeline: RequestPipeline, write_timeout_s: float = 30.0) -> None:
        self._pipeline = pipeline
        self._write_timeout_s = write_timeout_s

    def _request(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> GenerationRequest:
        req = request_from_proto(request, context)
        req.tenant = self._pipeline.authenticate(api_key_from_metadata(context))
        return req

    async def Generate(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        await reject_malformed(request, context)
        try:
            req = self._request(request, context)
            events = self._pipeline.generate(req)
            # A client that stops reading blocks a write once HTTP/2 flow control fills; cut it
            # off instead of holding its sequence forever.
            cutoff = WriteCutoff(self._write_timeout_s)
            try:
                async for event in events:
                    if isinstance(event, TokenDelta):
                        reply = generate_pb2.GenerateResponse(request_id=req.request_id, tokens=generate_pb2.TokenChunk(
                            token_ids=event.token_ids, text=event.text, index=event.index))
                    else:
                        reply = generate_pb2.GenerateResponse(request_id=req.request_id, final=summary_to_proto(event))
                    await cutoff.bound(context.write(reply))
            except asyncio.TimeoutError:
                await events.aclose()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"client did not read the stream for {self._write_timeout_s:.0f}s; cut off")
            finally:
                await events.aclose()
        except RequestError as error:
            await abort_with(context, error)

    async def Complete(self, request: generate_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> generate_pb2.CompleteResponse:
        await reject_malformed(request, context)
        try:
            req = self._request(request, context)
        except RequestError as error:
            await abort_with(context, error)
        text: list[str] = []
        ids: list[int] = []
        try:
            async for event in self._pipeline.generate(req):
                if isinstance(event, TokenDelta):
                    text.append(event.text)
                    ids += event.token_ids
                else:
                    return generate_pb2.CompleteResponse(request_id=req.request_id, text="".join(text),
                                                         token_ids=ids, summary=summary_to_proto(event))
        except RequestError as error:
            await abort_with(context, error)
        raise AssertionError("pipeline ended without a completion")

    async def ListModels(self, request: generate_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> generate_pb2.ListModelsResponse:
        await reject_malformed(request, context)
        try:
            self._pipeline.authenticate(api_key_from_metadata(context))
        except RequestError as error:
            await abort_with(context, error)
        out = []
        for name, replicas in sorted(self._pipeline.served_models().items()):
            entry = self._pipeline.catalog.get(name)
            report = replicas[0].report
            out.append(generate_pb2.ModelInfo(
                name=name, context_length=report.context_length, max_output_tokens=report.max_output_tokens,
                replicas=len(replicas), chat=bool(entry and entry.template)))
        return generate_pb2.ListModelsResponse(models=out)
