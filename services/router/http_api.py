"""OpenAI-compatible HTTP front end (FastAPI): /v1/models, /v1/completions,
/v1/chat/completions (streamed as server-sent events or whole), and /health.

Bodies are parsed here (size cap, UTF-8, JSON, then pydantic) so every bad input gets an
OpenAI-style error body naming the field; everything after parsing is the shared pipeline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from typing import Any, AsyncGenerator, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from switchyard.telemetry.asgi_context import TraceContextMiddleware
from switchyard.v1 import generate_pb2

from .cutoff import WriteCutoff
from .errors import ErrorKind, RequestError, invalid
from .pipeline import Completion, GenerationRequest, RequestPipeline, TokenDelta

log = logging.getLogger(__name__)
FINISH = {generate_pb2.FINISH_REASON_EOS: "stop", generate_pb2.FINISH_REASON_STOP: "stop",
          generate_pb2.FINISH_REASON_LENGTH: "length", generate_pb2.FINISH_REASON_CANCELLED: "stop"}
ERROR_TYPES = {ErrorKind.INVALID_ARGUMENT: "invalid_request_error", ErrorKind.NOT_FOUND: "not_found_error",
               ErrorKind.UNAUTHENTICATED: "authentication_error", ErrorKind.RESOURCE_EXHAUSTED: "rate_limit_error",
               ErrorKind.UNAVAILABLE: "service_unavailable", ErrorKind.DEADLINE_EXCEEDED: "timeout_error"}
SESSION_HEADER = "x-session-id"  # a session key for sticky A/B assignment and routing when `user` is unset
TIMEOUT_HEADER = "x-request-timeout"  # seconds; lowers the server's default request timeout
MAX_JSON_DEPTH = 32  # the deepest body a valid request has is 4 levels (messages[i].content)
MAX_INT_DIGITS = 64  # longer integers are read as floats (inf): a type or range error at their field
INT32_MAX, UINT64_MAX = 2**31 - 1, 2**64 - 1


def param_path(path: tuple[str | int, ...]) -> str:
    """('messages', 0, 'content') → 'messages[0].content' (the pipeline names fields the same way)."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def field_path(loc: tuple[Any, ...], data: Any) -> tuple[str | int, ...]:
    """A pydantic error location as a path into the body: union members' tags ('str',
    'list[str]') are not fields and are dropped; a missing field is kept."""
    path: list[str | int] = []
    current = data
    for i, part in enumerate(loc):
        if isinstance(current, dict) and isinstance(part, str) and (part in current or i == len(loc) - 1):
            path.append(part)
            current = current.get(part)
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            path.append(part)
            current = current[part]
    return tuple(path)


def _parse_int(digits: str) -> int | float:
    return int(digits) if len(digits) <= MAX_INT_DIGITS else float(digits)


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:]')


def _too_deep_field(text: str) -> str:
    """The top-level field whose value nests past the parser's limit (only on that error)."""
    depth, key, last = 0, "", ""
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return key or "body"
        elif token in "]}":
            depth -= 1
        elif token == ":":
            if depth == 1 and last.startswith('"'):
                try:
                    key = json.loads(last)
                except ValueError:
                    key = ""
        last = token
    return "body"


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def check_tree(data: Any) -> None:
    """Bounds what pydantic and the tokenizer get: nesting depth, and strings that are valid
    Unicode (a JSON escape can spell a lone surrogate, which no UTF-8 encoder accepts)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise invalid(param_path(path[:1]), f"is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise invalid(param_path(path), f"holds a lone surrogate (\\u{ord(value[exc.start]):04x} at "
                              f"character {exc.start}); send valid Unicode text") from None
        elif isinstance(value, dict):
            for key, item in value.items():
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    raise invalid(param_path(path) if path else "body", "has a field name with a lone surrogate") from None
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))


STRICT = ConfigDict(extra="forbid", strict=True)  # no coercion: "5", true and 5.0 are not integers


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by both endpoints; unknown fields are rejected so typos are caught."""

    model_config = STRICT
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0)
    top_p: float = Field(1.0)
    top_k: int = Field(0, le=INT32_MAX)  # extension
    repetition_penalty: float = 1.0  # extension
    ignore_eos: bool = False  # extension (as in vLLM): generate max_tokens even past EOS
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None


class CompletionBody(_Common):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str | None = None


class ChatBody(_Common):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None


def error_response(error: RequestError) -> JSONResponse:
    headers = {}
    if error.retry_after_s:
        headers["Retry-After"] = str(max(1, int(error.retry_after_s + 0.999)))
    body = {"error": {"message": error.message, "type": ERROR_TYPES.get(error.kind, "server_error"),
                      "param": error.field, "code": error.kind.name.lower()}}
    return JSONResponse(body, status_code=error.kind.http_status, headers=headers)


def _unsupported(body: _Common) -> None:
    if body.n != 1:
        raise invalid("n", "only n=1 is supported")
    if body.logprobs not in (None, False, 0):
        raise invalid("logprobs", "logprobs are not supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise invalid(name, "presence/frequency penalties are not supported; use repetition_penalty")
    if body.seed is not None and body.seed < 0:
        raise invalid("seed", "must be a non-negative integer")


def to_request(body: CompletionBody | ChatBody, timeout_s: float | None) -> GenerationRequest:
    _unsupported(body)
    sampling = generate_pb2.SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                           repetition_penalty=body.repetition_penalty)
    if body.top_p == 0:
        # OpenAI: the smallest nucleus, the most likely token alone. In the proto 0 means
        # "unset" (no nucleus), so say it as top_k = 1.
        sampling.top_k = 1
    if body.seed is not None:
        sampling.seed = body.seed
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    req = GenerationRequest(model=body.model, sampling=sampling, stop=stop, timeout_s=timeout_s,
                            request_id=uuid.uuid4().hex, ignore_eos=body.ignore_eos,
                            request_type="chat" if isinstance(body, ChatBody) else "completion",
                            session_id=body.user or "")
    if isinstance(body, ChatBody):
        req.field_names["prompt"] = "messages"
        if body.max_completion_tokens is not None:
            req.field_names["max_tokens"] = "max_completion_tokens"
        req.max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        req.messages = [(m.role, m.content or "") for m in body.messages]
    else:
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise invalid("prompt", "send one prompt per request")
            req.text = body.prompt[0]
        else:
            req.text = body.prompt
        req.max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default
        if body.echo or body.suffix:
            raise invalid("echo" if body.echo else "suffix", "echo and suffix are not supported")
    if req.max_tokens is not None and req.max_tokens <= 0:
        raise invalid(req.field_names.get("max_tokens", "max_tokens"), f"must be at least 1, got {req.max_tokens}")
    return req


async def client_gone(receive: Receive) -> None:
    """Returns when the client has disconnected (ASGI http.disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(work: Any, receive: Receive, events: AsyncGenerator[Any, None]) -> Any:
    """Run `work` unless the client disconnects first; then cancel it and close `events`, so
    the replica's sequence is freed instead of generating for nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(client_gone(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise RequestError(ErrorKind.CANCELLED, "client disconnected")
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
        await events.aclose()


class SSEResponse(Response):
    """Streams events as server-sent events. A client that disconnects is noticed at once
    (uvicorn's send() ignores a gone client, so `receive` is watched for http.disconnect), and
    each send has a timeout, so a client that stops reading (TCP window full) is cut off; either
    way the generation is cancelled and its sequence freed."""

    def __init__(self, events: AsyncGenerator[dict[str, Any], None], write_timeout_s: float) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.events = events
        self.write_timeout_s = write_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnected(self._stream(send), receive, self.events)
        except RequestError:
            pass  # the client is gone; nobody to tell

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        # Not wait_for: 3.11's wait_for can swallow a cancel that arrives as the send
        # completes, and the stream would outlive its client.
        cutoff = WriteCutoff(self.write_timeout_s)
        try:
            async for payload in self.events:
                data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
                await cutoff.bound(send({"type": "http.response.body", "body": data, "more_body": True}))
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except (asyncio.TimeoutError, OSError):
            pass  # client gone or not reading; closing the generator cancels the replica's work
        finally:
            await self.events.aclose()


def create_http_app(pipeline: RequestPipeline, *, max_body_bytes: int = 1 << 20,
                    request_timeout_s: float = 600.0, write_timeout_s: float = 30.0) -> FastAPI:
    app = FastAPI(title="Switchyard", docs_url=None, redoc_url=None)
    app.add_middleware(TraceContextMiddleware)

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        size = int(request.headers.get("content-length") or 0)
        if size > max_body_bytes:
            raise RequestError(ErrorKind.INVALID_ARGUMENT, f"body of {size} bytes exceeds {max_body_bytes}; "
                               "send a shorter prompt", field="body")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise RequestError(ErrorKind.INVALID_ARGUMENT, f"body exceeds {max_body_bytes} bytes", field="body")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise invalid("body", f"is not valid UTF-8 (byte {exc.start})") from None
        try:
            data = json.loads(text, parse_int=_parse_int, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise invalid("body", f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except RecursionError:
            raise invalid(_too_deep_field(text), f"is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
        except ValueError as exc:
            raise invalid("body", f"is not valid JSON: {exc}") from None
        check_tree(data)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            # The deepest error names the field best (a union's members each report one).
            paths = [(field_path(e["loc"], data), e["msg"]) for e in exc.errors()]
            path, msg = max(paths, key=lambda p: len(p[0]))
            raise invalid(param_path(path), msg) from None

    def timeout_for(request: Request) -> float:
        header = request.headers.get(TIMEOUT_HEADER)
        if header is None:
            return request_timeout_s
        try:
            seconds = float(header)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            raise invalid(TIMEOUT_HEADER, f"must be a positive number of seconds, got {header[:32]!r}")
        return min(seconds, request_timeout_s)

    def tenant_of(request: Request) -> Any:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else (request.headers.get("x-api-key") or None)
        return pipeline.authenticate(key)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes (404), wrong methods (405) and the like, in the OpenAI error envelope."""
        status = exc.status_code
        if status == 404:
            message, kind = f"unknown endpoint {request.method} {request.url.path}", "not_found_error"
        elif status == 405:
            message, kind = f"method {request.method} is not allowed on {request.url.path}", "invalid_request_error"
        else:
            message, kind = str(exc.detail), "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": None,
                          "code": "not_found" if status == 404 else str(status)}}
        return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return error_response(RequestError(ErrorKind.INTERNAL, "internal error; the cause is logged"))

    @app.get("/health")
    async def health() -> JSONResponse:
        models = pipeline.served_models()
        ok = any(models.values())
        return JSONResponse({"status": "ok" if ok else "no replica can serve",
                             "models": {m: len(r) for m, r in models.items()}}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        tenant_of(request)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "switchyard",
                 "replicas": len(reps), "context_length": reps[0].report.context_length}
                for name, reps in sorted(pipeline.served_models().items())]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(request: Request, model_id: str) -> JSONResponse:
        tenant_of(request)
        replicas = pipeline.served_models().get(model_id)
        if not replicas:
            raise RequestError(ErrorKind.NOT_FOUND, f"model {model_id!r} not found; GET /v1/models lists "
                               "the served models", field="model")
        return JSONResponse({"id": model_id, "object": "model", "created": 0, "owned_by": "switchyard",
                             "replicas": len(replicas), "context_length": replicas[0].report.context_length})

    async def run(request: Request, body_model: type[CompletionBody] | type[ChatBody], chat: bool) -> Any:
        tenant = tenant_of(request)
        body = await parse(request, body_model)
        req = to_request(body, timeout_for(request))
        req.tenant = tenant
        req.session_id = req.session_id or request.headers.get(SESSION_HEADER, "")[:256]  # A/B key without `user`
        rid = ("chatcmpl-" if chat else "cmpl-") + req.request_id
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        events = pipeline.generate(req)
        if not body.stream:
            async def whole() -> JSONResponse:
                parts: list[str] = []
                async for event in events:
                    if isinstance(event, TokenDelta):
                        parts.append(event.text)
                        continue
                    choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH.get(event.finish_reason, "stop"),
                                              "logprobs": None}
                    if chat:
                        choice["message"] = {"role": "assistant", "content": "".join(parts)}
                    else:
                        choice["text"] = "".join(parts)
                    return JSONResponse({"id": rid, "object": obj, "created": created, "model": event.model,
                                         "choices": [choice], "usage": usage(event)})
                raise RequestError(ErrorKind.INTERNAL, "generation ended without a result")
            return await until_disconnected(whole(), request.receive, events)
        # Streamed: pull the first event before answering 200, so validation, limits and
        # routing errors still come back as proper HTTP errors.
        first = await anext(events)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(sse_chunks(first, events, rid, created, req.model, chat, include_usage), write_timeout_s)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await run(request, CompletionBody, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await run(request, ChatBody, chat=True)

    return app


def usage(c: Completion) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens are prompt tokens whose KV a replica's prefix cache
    supplied (OpenAI's prompt caching reports them the same way)."""
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": c.cached_prompt_tokens}}


async def sse_chunks(first: TokenDelta | Completion, rest: AsyncGenerator[TokenDelta | Completion, None], rid: str,
                     created: int, model: str, chat: bool, include_usage: bool) -> AsyncGenerator[dict[str, Any], None]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text is not None else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    try:
        if chat:
            yield chunk(None, None, role=True)

        async def all_events() -> AsyncIterator[TokenDelta | Completion]:
            yield first
            async for e in rest:
                yield e

        async for event in all_events():
            if isinstance(event, TokenDelta):
                if event.text:
                    yield chunk(event.text, None)
            else:
                yield chunk(None, FINISH.get(event.finish_reason, "stop"))
                if include_usage:
                    yield {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                           "usage": usage(event)}
    except RequestError as error:
        # Headers are gone already: report the failure in the stream, OpenAI style.
        yield {"error": {"message": error.message, "type": ERROR_TYPES.get(error.kind, "server_error"),
                         "code": error.kind.name.lower()}}
    finally:
        await rest.aclose()
