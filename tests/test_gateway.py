"""Gateway for real clients: OpenAI-compatible HTTP/SSE, tenants, rate limits, validation,
deadlines and bounded buffering — on a real router, real stack, official clients."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Iterator

import grpc
import httpx
import nats
import openai
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client.parser import text_string_to_metric_families

from services.router.dispatch import POKE, Dispatcher
from services.router.cutoff import WriteCutoff
from services.router.http_api import SSEResponse
from services.router.tenants import write_tenant
from switchyard.bus import subjects
from switchyard.bus.queue import flushed
from switchyard.bus.server import NatsServer
from switchyard.runtime.stack import LocalStack
from switchyard.v1 import bus_pb2, generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc

from conftest import TINY, start_stack

ALPHA_KEY = "sy-test-alpha-key"  # small token budget
BETA_KEY = "sy-test-beta-key"
ALPHA_TPM = 400


@pytest.fixture(scope="module")
def gateway(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("gateway")
    tenants = tmp / "tenants.toml"
    write_tenant(tenants, "alpha", ALPHA_KEY, requests_per_minute=1000, tokens_per_minute=ALPHA_TPM)
    write_tenant(tenants, "beta", BETA_KEY, requests_per_minute=1000, tokens_per_minute=1_000_000)
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp, tenants_file=tenants, api_key=BETA_KEY)
    yield stack
    stack.stop()


@pytest.fixture
def client(gateway: LocalStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.http_url}/v1", api_key=BETA_KEY, max_retries=0)


def grpc_complete(stack: LocalStack, messages: list[tuple[str, str]], max_tokens: int) -> generate_pb2.CompleteResponse:
    req = generate_pb2.GenerateRequest(model=TINY, max_tokens=max_tokens)
    for role, content in messages:
        req.chat.messages.add(role=role, content=content)
    with grpc.insecure_channel(stack.router_address) as ch:
        return generate_pb2_grpc.GenerationStub(ch).Complete(req, timeout=30, metadata=stack.auth_metadata())


@pytest.mark.integration
def test_openai_sdk_streams_and_completes_chat(gateway: LocalStack, client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    expected = grpc_complete(gateway, [(m["role"], m["content"]) for m in messages], 20)

    whole = client.chat.completions.create(model=TINY, messages=messages, max_tokens=20, temperature=0)  # type: ignore[arg-type]
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected.text
    assert whole.usage is not None
    assert whole.usage.completion_tokens == expected.summary.usage.completion_tokens
    assert whole.usage.prompt_tokens == expected.summary.usage.prompt_tokens
    assert whole.choices[0].finish_reason == ("length" if expected.summary.finish_reason ==
                                              generate_pb2.FINISH_REASON_LENGTH else "stop")

    stream = client.chat.completions.create(model=TINY, messages=messages, max_tokens=20, temperature=0,  # type: ignore[arg-type]
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


@pytest.mark.integration
def test_openai_sdk_text_completion_and_model_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [TINY]
    done = client.completions.create(model=TINY, prompt="the quick brown fox", max_tokens=7, temperature=0,
                                     extra_body={"repetition_penalty": 1.0})
    assert done.object == "text_completion"
    assert done.usage is not None and 1 <= done.usage.completion_tokens <= 7
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=TINY, prompt="the quick brown fox", max_tokens=7, temperature=0, stream=True))
    assert streamed == done.choices[0].text


@pytest.mark.integration
def test_sse_wire_format_on_raw_http(gateway: LocalStack) -> None:
    body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{gateway.http_url}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {BETA_KEY}"}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert len({p["id"] for p in payloads}) == 1 and payloads[0]["id"].startswith("chatcmpl-")
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] >= 1


@pytest.mark.integration
def test_missing_or_bad_key_is_rejected_on_http_and_grpc(gateway: LocalStack) -> None:
    body = {"model": TINY, "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer sy-wrong"}):
        resp = httpx.post(f"{gateway.http_url}/v1/completions", json=body, headers=headers, timeout=10)
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=f"{gateway.http_url}/v1", api_key="sy-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    req = generate_pb2.GenerateRequest(model=TINY, text="hi", max_tokens=2)
    with grpc.insecure_channel(gateway.router_address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        for metadata in ((), (("authorization", "Bearer sy-wrong"),)):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(req, timeout=10, metadata=metadata))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.integration
def test_tenant_over_its_token_budget_gets_429_while_another_keeps_going(gateway: LocalStack) -> None:
    alpha = openai.OpenAI(base_url=f"{gateway.http_url}/v1", api_key=ALPHA_KEY, max_retries=0)
    beta = openai.OpenAI(base_url=f"{gateway.http_url}/v1", api_key=BETA_KEY, max_retries=0)
    # Each request reserves prompt + max_tokens = ~3 + 150 of alpha's 400 tokens per minute.
    rejected = None
    for _ in range(4):
        try:
            alpha.completions.create(model=TINY, prompt="hi", max_tokens=150, temperature=0,
                                     extra_body={"ignore_eos": True})
        except openai.RateLimitError as exc:
            rejected = exc
            break
    assert rejected is not None, "alpha was never limited"
    assert rejected.status_code == 429
    assert int(rejected.response.headers["retry-after"]) >= 1
    assert "tokens-per-minute" in rejected.message
    with grpc.insecure_channel(gateway.router_address) as ch:  # the same limit over gRPC
        with pytest.raises(grpc.RpcError) as err:
            list(generate_pb2_grpc.GenerationStub(ch).Generate(
                generate_pb2.GenerateRequest(model=TINY, text="hi", max_tokens=150), timeout=10,
                metadata=(("authorization", f"Bearer {ALPHA_KEY}"),)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(err.value.trailing_metadata() or ())
    assert float(trailing["retry-after-s"]) > 0
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])  # standard RetryInfo
    retry_info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry_info)
    assert retry_info.retry_delay.ToTimedelta().total_seconds() == pytest.approx(float(trailing["retry-after-s"]), abs=1e-3)
    for _ in range(3):  # beta is unaffected
        assert beta.completions.create(model=TINY, prompt="hi", max_tokens=20, temperature=0).usage is not None


INVALID = [
    ({"model": TINY, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": TINY, "prompt": "hi", "max_tokens": 100_000}, 400, "max_tokens"),
    ({"model": TINY, "prompt": "word " * 3000, "max_tokens": 4}, 400, "prompt"),
    ({"model": TINY, "prompt": "hi", "temperature": 5}, 400, "temperature"),
    ({"model": TINY, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"model": TINY, "prompt": "hi", "top_k": -1}, 400, "top_k"),
    ({"model": TINY, "prompt": "hi", "n": 3}, 400, "n"),
    ({"model": TINY, "prompt": "hi", "bogus_field": 1}, 400, "bogus_field"),
    ({"prompt": "hi"}, 400, "model"),
    ({"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ({"model": TINY, "prompt": ""}, 400, "prompt"),
    ({"model": TINY, "prompt": "hi", "stop": ["s"] * 40}, 400, "stop"),
    ({"model": TINY, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": TINY, "messages": []}, 400, "messages"),
    ({"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -2}, 400, "max_completion_tokens"),
]


@pytest.mark.integration
@pytest.mark.parametrize("body, status, field", INVALID)
def test_invalid_requests_get_the_right_code_and_name_the_field(gateway: LocalStack, body: dict, status: int,
                                                                field: str) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    resp = httpx.post(f"{gateway.http_url}{path}", json=body, timeout=10, headers={"Authorization": f"Bearer {BETA_KEY}"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert field in error["message"] or field == error["param"], error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


@pytest.mark.integration
@pytest.mark.parametrize("content, field", [
    (b'{"model": "tiny-llama", "prompt": "hi"', "JSON"),
    (b'{"model": "tiny-llama", "prompt": "\xff\xfe"}', "UTF-8"),
    (b'{"model": "tiny-llama", "prompt": "' + b"a" * (2 << 20) + b'"}', "bytes"),
])
def test_malformed_bodies_are_rejected_and_the_gateway_keeps_serving(gateway: LocalStack, content: bytes,
                                                                     field: str) -> None:
    auth = {"Authorization": f"Bearer {BETA_KEY}", "Content-Type": "application/json"}
    resp = httpx.post(f"{gateway.http_url}/v1/completions", content=content, headers=auth, timeout=10)
    assert resp.status_code == 400
    assert field in resp.json()["error"]["message"]
    ok = httpx.post(f"{gateway.http_url}/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 3},
                    headers=auth, timeout=10)
    assert ok.status_code == 200


def worker_active(stack: LocalStack) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{stack.workers[0].port}") as ch:
        return worker_pb2_grpc.WorkerStub(ch).Info(worker_pb2.InfoRequest(), timeout=5,
                                                   metadata=stack.worker_metadata(stack.workers[0])).active_sequences


def wait_idle(stack: LocalStack, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while worker_active(stack) and time.monotonic() < deadline:
        time.sleep(0.05)
    return worker_active(stack)


@pytest.mark.integration
def test_deadline_shorter_than_generation_ends_with_deadline_exceeded_and_frees_the_slot(gateway: LocalStack) -> None:
    req = generate_pb2.GenerateRequest(model=TINY, text="a long one", max_tokens=250,
                                       stop=generate_pb2.StopConditions(ignore_eos=True))
    with grpc.insecure_channel(gateway.router_address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            # 250 tokens take the tiny model ≥ 0.2 s (one pipelined stream: ~1,000-1,250 tokens/s)
            list(generate_pb2_grpc.GenerationStub(ch).Generate(req, timeout=0.05, metadata=gateway.auth_metadata()))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_idle(gateway) == 0
    resp = httpx.post(f"{gateway.http_url}/v1/completions", timeout=10,
                      json={"model": TINY, "prompt": "a long one", "max_tokens": 250, "ignore_eos": True},
                      headers={"Authorization": f"Bearer {BETA_KEY}", "x-request-timeout": "0.05"})
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "deadline_exceeded"
    assert wait_idle(gateway) == 0


@pytest.mark.integration
def test_health_endpoint_reflects_live_replicas(gateway: LocalStack) -> None:
    resp = httpx.get(f"{gateway.http_url}/health", timeout=5)
    assert resp.status_code == 200 and resp.json()["models"] == {TINY: 1}


@pytest.mark.integration
async def test_replies_for_a_client_that_stops_reading_are_bounded_and_its_sequence_cancelled() -> None:
    """Events arrive on real NATS for a stream whose consumer never reads: the router keeps
    at most `max_buffered_events`, asks the replica to cancel, and ends the stream."""
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        cancels: list[str] = []

        async def on_cancel(msg: nats.aio.msg.Msg) -> None:
            cancels.append(bus_pb2.CancelRequest.FromString(msg.data).request_id)
        await nc.subscribe(subjects.cancel_subject("replica-a"), cb=on_cancel)
        dispatcher = Dispatcher(nc, nc.jetstream(), "router-t", max_buffered_events=8)
        await dispatcher.start()
        queue = dispatcher.open("req-1")
        for i in range(50):
            event = bus_pb2.ReplicaEvent(request_id="req-1", replica_id="replica-a",
                                         tokens=bus_pb2.TokenStep(token_ids=[i], index=i))
            await nc.publish(dispatcher.reply_subject("req-1"), event.SerializeToString())
        await flushed(nc)
        await asyncio.sleep(0.3)
        assert queue.qsize() == 9  # 8 buffered + the cut-off error
        events = [queue.get_nowait() for _ in range(9)]
        assert events[-1].error.code == generate_pb2.ERROR_CODE_RESOURCE_EXHAUSTED
        assert cancels == ["req-1"]
        await dispatcher.stop()
        await nc.close()


@pytest.mark.integration
async def test_dispatcher_wakes_waiting_readers_by_sweep_and_at_their_deadline_without_timers_per_event() -> None:
    """A reader waiting on its queue gets POKE every poke interval (to re-check its replica)
    and at its deadline; a queue with events waiting is not poked; close() disarms the deadline.
    A step's events for several requests arrive as one ReplicaEventBatch, each in its queue."""
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        dispatcher = Dispatcher(nc, nc.jetstream(), "router-p", poke_interval_s=0.5)
        await dispatcher.start()
        loop = asyncio.get_running_loop()
        idle, busy = dispatcher.open("idle"), dispatcher.open("busy")
        closed = dispatcher.open("closed", time.monotonic() + 0.05)
        dispatcher.close("closed")
        started = loop.time()
        timed = dispatcher.open("timed", time.monotonic() + 0.1)
        assert await asyncio.wait_for(timed.get(), 1) is POKE
        assert 0.09 <= loop.time() - started < 0.45  # the deadline's POKE, not the sweep's (at 0.5 s)
        # A deadline timer that fires early (the loop's clock is coarse) waits out the rest.
        early = dispatcher.open("early")
        dispatcher._deadline_due("early", early, time.monotonic() + 0.1)
        assert early.empty()
        assert await asyncio.wait_for(early.get(), 1) is POKE and time.monotonic() - started >= 0.19
        dispatcher.close("early")
        batch = bus_pb2.ReplicaEventBatch(events=[
            bus_pb2.ReplicaEvent(request_id="busy", replica_id="r", tokens=bus_pb2.TokenStep(token_ids=[7], index=0)),
            bus_pb2.ReplicaEvent(request_id="gone", replica_id="r", tokens=bus_pb2.TokenStep(token_ids=[8], index=0)),
            bus_pb2.ReplicaEvent(request_id="busy", replica_id="r", tokens=bus_pb2.TokenStep(token_ids=[9], index=1))])
        await nc.publish(subjects.reply_batch_subject("router-p"), batch.SerializeToString())
        await flushed(nc)
        assert await asyncio.wait_for(idle.get(), 2) is POKE  # the first sweep, ~0.5 s in
        assert 0.45 <= loop.time() - started
        assert [list(busy.get_nowait().tokens.token_ids) for _ in range(2)] == [[7], [9]]  # not poked: it had events
        assert busy.empty() and closed.empty()
        assert await asyncio.wait_for(busy.get(), 2) is POKE and await asyncio.wait_for(idle.get(), 2) is POKE
        assert closed.empty()  # closed: neither its deadline nor the sweeps poke it
        await dispatcher.stop()
        await nc.close()


@pytest.mark.unit
async def test_write_cutoff_times_out_a_blocked_write_and_lets_a_client_cancel_through() -> None:
    class Context:  # a stream whose writes block after the first two (flow control full)
        def __init__(self) -> None:
            self.written: list[int] = []

        async def write(self, reply: generate_pb2.GenerateResponse) -> None:
            if len(self.written) >= 2:
                await asyncio.sleep(3600)
            self.written.append(reply.tokens.index)

    async def stream(context: Context, timeout_s: float) -> str:
        cutoff = WriteCutoff(timeout_s)
        try:
            for i in range(5):
                await cutoff.bound(context.write(generate_pb2.GenerateResponse(tokens=generate_pb2.TokenChunk(index=i))))
        except asyncio.TimeoutError:
            return "cut off"
        return "done"

    context = Context()
    started = time.monotonic()
    assert await stream(context, 0.2) == "cut off" and context.written == [0, 1]
    assert 0.2 <= time.monotonic() - started < 2
    blocked = asyncio.create_task(stream(Context(), 30))
    await asyncio.sleep(0.05)
    blocked.cancel()  # the client went away: a cancel, not a timeout
    with pytest.raises(asyncio.CancelledError):
        await blocked

    class Reading(Context):  # a client that keeps reading: no write blocks
        async def write(self, reply: generate_pb2.GenerateResponse) -> None:
            self.written.append(reply.tokens.index)

    reading = Reading()
    assert await stream(reading, 0.05) == "done" and reading.written == [0, 1, 2, 3, 4]
    await asyncio.sleep(0.1)  # a timer left armed would cancel this task here


@pytest.mark.unit
async def test_sse_response_cuts_off_a_client_that_does_not_read() -> None:
    closed = asyncio.Event()

    async def endless():  # type: ignore[no-untyped-def]
        try:
            while True:
                yield {"choices": []}
        finally:
            closed.set()

    sent: list[dict] = []

    async def send(message: dict) -> None:  # a client whose socket never drains after 3 writes
        sent.append(message)
        if len(sent) > 3:
            await asyncio.sleep(3600)

    async def receive() -> dict:  # a client that stays connected
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    started = time.monotonic()
    await SSEResponse(endless(), write_timeout_s=0.2)({"type": "http"}, receive, send)
    assert closed.is_set() and time.monotonic() - started < 2
    assert len(sent) == 4


@pytest.mark.integration
def test_a_full_model_sheds_at_once_with_a_retry_delay(tiny_models_dir: Path, tmp_path: Path) -> None:
    """Batch capacity 2 and no queue: of six concurrent long requests two run, the rest get
    429 + Retry-After immediately instead of waiting; afterwards the model serves again."""
    from concurrent.futures import ThreadPoolExecutor
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path, max_batch_size=2, router_args=("--queue-limit", "0"))
    body = {"model": TINY, "prompt": "long", "max_tokens": 250, "ignore_eos": True}

    def call(_: int) -> tuple[int, float, str | None]:
        started = time.monotonic()
        resp = httpx.post(f"{stack.http_url}/v1/completions", json=body, timeout=60)
        return resp.status_code, time.monotonic() - started, resp.headers.get("retry-after")

    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(call, range(6)))
        ok = [r for r in results if r[0] == 200]
        shed = [r for r in results if r[0] == 429]
        assert len(ok) >= 2 and len(shed) >= 1 and len(ok) + len(shed) == 6, results
        slowest_ok = max(t for _, t, _ in ok)
        assert all(t < slowest_ok / 2 for _, t, _ in shed), "shed requests waited instead of failing fast"
        assert all(int(retry) >= 1 for _, _, retry in shed if retry is not None)
        assert all(retry is not None for _, _, retry in shed)
        assert httpx.post(f"{stack.http_url}/v1/completions", json={**body, "max_tokens": 4}, timeout=30).status_code == 200
    finally:
        stack.stop()


@pytest.mark.integration
def cancelled_requests(stack: LocalStack) -> float:
    assert stack.router is not None and stack.router.metrics_port
    text = httpx.get(f"http://127.0.0.1:{stack.router.metrics_port}/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "switchyard_requests_total" and s.labels.get("code") == "CANCELLED")


def test_http_client_that_disconnects_mid_stream_frees_its_sequence(gateway: LocalStack) -> None:
    body = {"model": TINY, "prompt": "walk away", "max_tokens": 250, "ignore_eos": True, "stream": True}
    before = cancelled_requests(gateway)
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {BETA_KEY}"}) as client:
        with client.stream("POST", f"{gateway.http_url}/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            assert worker_active(gateway) == 1
        # leaving the block closes the connection mid-stream
    assert wait_idle(gateway) == 0
    deadline = time.monotonic() + 5
    while cancelled_requests(gateway) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled_requests(gateway) == before + 1  # ended as cancelled, not by finishing its 250 tokens


@pytest.mark.unit
async def test_sse_response_stops_generating_when_the_client_disconnects() -> None:
    closed = asyncio.Event()
    produced = 0

    async def slow_tokens():  # type: ignore[no-untyped-def]
        nonlocal produced
        try:
            while True:
                produced += 1
                yield {"choices": []}
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    async def send(message: dict) -> None:  # uvicorn's send: silently ignores a gone client
        pass

    async def receive() -> dict:
        await asyncio.sleep(0.1)
        return {"type": "http.disconnect"}

    await asyncio.wait_for(SSEResponse(slow_tokens(), write_timeout_s=5)({"type": "http"}, receive, send), 2)
    assert closed.is_set() and produced < 30


@pytest.mark.integration
def test_non_streamed_request_is_cancelled_when_its_client_gives_up(gateway: LocalStack) -> None:
    body = {"model": TINY, "prompt": "impatient", "max_tokens": 250, "ignore_eos": True}
    before = cancelled_requests(gateway)
    # The client hangs up after 0.05 s; 250 tokens take the tiny model ≥ 0.2 s even with the
    # batcher's steps pipelined (~1,000-1,250 tokens/s for one stream), 0.2 s was no longer enough.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{gateway.http_url}/v1/completions", json=body, timeout=0.05,
                   headers={"Authorization": f"Bearer {BETA_KEY}"})
    deadline = time.monotonic() + 5
    while cancelled_requests(gateway) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled_requests(gateway) == before + 1
    assert wait_idle(gateway) == 0


@pytest.mark.unit
def test_http_impl_is_validated() -> None:
    from services.router.config import RouterConfig
    from switchyard.config import ConfigError, load_config
    assert load_config(RouterConfig, ["--http-impl", "h11"]).http_impl == "h11"
    assert load_config(RouterConfig, ["--http-impl", "httptools"]).http_impl == "httptools"  # installed here
    assert load_config(RouterConfig, []).http_impl == "auto"
    with pytest.raises(ConfigError, match="auto, httptools or h11"):
        load_config(RouterConfig, ["--http-impl", "tornado"])


@pytest.mark.integration
def test_the_pure_python_http_impl_streams_the_same_completion(tiny_models_dir: Path, tmp_path: Path) -> None:
    """`--http-impl h11` (the fallback to the default httptools) serves the OpenAI SDK's stream
    with the same text as the default router does."""
    body = {"model": TINY, "prompt": "hello", "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    texts = []
    for impl in ("h11", "httptools"):
        stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path / impl, router_args=("--http-impl", impl))
        try:
            client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused", max_retries=0)
            chunks = list(client.completions.create(**body, stream=True))  # type: ignore[call-overload]
            texts.append("".join(c.choices[0].text for c in chunks if c.choices))
            assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        finally:
            stack.stop()
    assert texts[0] == texts[1] and texts[0]
