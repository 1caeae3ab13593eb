"""gRPC front end: a thin servicer; proto ↔ domain conversion lives in the helpers here."""

from __future__ import annotations

import uuid
from typing import AsyncIterator

import grpc

from switchyard.v1 import generate_pb2, generate_pb2_grpc

from .errors import RequestError
from .pipeline import Completion, GenerationRequest, RequestPipeline, TokenDelta


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
        request_id=msg.request_id or uuid.uuid4().hex,
        timeout_s=remaining if remaining is not None else None)


def summary_to_proto(c: Completion) -> generate_pb2.FinalSummary:
    return generate_pb2.FinalSummary(
        finish_reason=c.finish_reason,
        usage=generate_pb2.Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens),
        timings=generate_pb2.Timings(time_to_first_token_s=c.time_to_first_token_s,
                                     end_to_end_s=c.end_to_end_s, queue_wait_s=c.queue_wait_s),
        replica_id=c.replica_id, model=c.model)


async def abort_with(context: grpc.aio.ServicerContext, error: RequestError) -> None:
    if error.retry_after_s:
        context.set_trailing_metadata((("retry-after-s", f"{error.retry_after_s:.3f}"),))
    await context.abort(error.kind.grpc_code, error.message)


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    def __init__(self, pipeline: RequestPipeline) -> None:
        self._pipeline = pipeline

    async def Generate(self, request: generate_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generate_pb2.GenerateResponse]:
        req = request_from_proto(request, context)
        try:
            async for event in self._pipeline.generate(req):
                if isinstance(event, TokenDelta):
                    yield generate_pb2.GenerateResponse(request_id=req.request_id, tokens=generate_pb2.TokenChunk(
                        token_ids=event.token_ids, text=event.text, index=event.index))
                else:
                    yield generate_pb2.GenerateResponse(request_id=req.request_id, final=summary_to_proto(event))
        except RequestError as error:
            await abort_with(context, error)

    async def Complete(self, request: generate_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> generate_pb2.CompleteResponse:
        req = request_from_proto(request, context)
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
        out = []
        for name, replicas in sorted(self._pipeline.registry.models().items()):
            entry = self._pipeline.catalog.get(name)
            report = replicas[0].report
            out.append(generate_pb2.ModelInfo(
                name=name, context_length=report.context_length, max_output_tokens=report.max_output_tokens,
                replicas=len(replicas), chat=bool(entry and entry.template)))
        return generate_pb2.ListModelsResponse(models=out)
