"""Regression tests for the bugs found by probing the gateway from outside (issue 10, "Bugs at
the edge", §3 special tokens and §5 bounded metric labels): each failed before its fix."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.router.tenants import write_tenant
from switchyard.runtime.stack import LocalStack
from switchyard.v1 import generate_pb2, generate_pb2_grpc

from conftest import TINY, start_stack

KEY = "sy-edge-key"
SMALL_KEY = "sy-edge-small-key"  # a tenant whose tokens-per-minute fit no large request
SMALL_TPM = 100

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def edge(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("edge")
    tenants = tmp / "tenants.toml"
    write_tenant(tenants, "edge", KEY, requests_per_minute=100_000, tokens_per_minute=10_000_000)
    write_tenant(tenants, "small", SMALL_KEY, requests_per_minute=100_000, tokens_per_minute=SMALL_TPM)
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp, tenants_file=tenants, api_key=KEY, records_dir=tmp / "run")
    yield stack
    stack.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(stack: LocalStack, path: str, body: Any = None, *, content: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    hdrs = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    if content is None:
        content = json.dumps(body).encode()
    return httpx.post(f"{stack.http_url}{path}", content=content, headers=hdrs, timeout=30)


def metric_samples(stack: LocalStack) -> list[Any]:
    assert stack.router is not None and stack.router.metrics_port
    resp = httpx.get(f"http://127.0.0.1:{stack.router.metrics_port}/metrics", timeout=5)
    assert resp.status_code == 200, resp.text[:500]
    return [s for f in text_string_to_metric_families(resp.text) for s in f.samples]


def metric(stack: LocalStack, name: str, **labels: str) -> float:
    return sum(s.value for s in metric_samples(stack)
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def assert_envelope(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    if param is not None:
        assert error["param"] == param, error
    return error


def still_serves(stack: LocalStack) -> None:
    ok = post(stack, "/v1/completions", {"model": TINY, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


# ---- outcomes of successful non-streamed requests --------------------------------------------

def test_successful_non_streamed_requests_are_recorded_ok_with_their_latency(edge: LocalStack) -> None:
    labels = {"model": TINY, "tenant": "edge"}
    ok_before = metric(edge, "switchyard_requests_total", code="OK", **labels)
    cancelled_before = metric(edge, "switchyard_requests_total", code="CANCELLED", **labels)
    e2e_before = metric(edge, "switchyard_request_duration_seconds_count", **labels)
    prompt_before = metric(edge, "switchyard_prompt_tokens_total", **labels)
    chat = post(edge, "/v1/chat/completions", {"model": TINY, "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 3, "ignore_eos": True})
    text = post(edge, "/v1/completions", {"model": TINY, "prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    assert chat.status_code == 200 and text.status_code == 200, (chat.text, text.text)
    with grpc.insecure_channel(edge.router_address) as ch:
        done = generate_pb2_grpc.GenerationStub(ch).Complete(
            generate_pb2.GenerateRequest(model=TINY, text="hey", max_tokens=3,
                                         stop=generate_pb2.StopConditions(ignore_eos=True)), timeout=30,
            metadata=edge.auth_metadata())
    ids = {chat.json()["id"].removeprefix("chatcmpl-"), text.json()["id"].removeprefix("cmpl-"), done.request_id}
    time.sleep(0.3)  # the pipeline records after the response is written
    assert metric(edge, "switchyard_requests_total", code="OK", **labels) == ok_before + 3
    assert metric(edge, "switchyard_requests_total", code="CANCELLED", **labels) == cancelled_before
    assert metric(edge, "switchyard_request_duration_seconds_count", **labels) == e2e_before + 3
    assert metric(edge, "switchyard_prompt_tokens_total", **labels) > prompt_before
    records = [json.loads(line) for line in (edge.spec.records_dir / "requests.jsonl").read_text().splitlines()]
    mine = [r for r in records if r["request_id"] in ids]
    assert len(mine) == 3 and all(r["status"] == "ok" for r in mine), mine
    assert all(r["finish_reason"] == "length" and r["completion_tokens"] == 3 for r in mine), mine


# ---- metric labels from client input -----------------------------------------------------------

def test_unknown_models_share_one_label_and_a_surrogate_name_does_not_break_metrics(edge: LocalStack) -> None:
    for name in ('"\\ud800"', '"no-such-model-1"', '"no-such-model-2"', '"../tiny-llama"'):
        resp = post(edge, "/v1/completions", content=b'{"model": ' + name.encode() + b', "prompt": "hi"}')
        assert resp.status_code in (400, 404), resp.text
        assert resp.json()["error"]["param"] == "model"
    samples = metric_samples(edge)  # scraping still works
    models = {s.labels["model"] for s in samples if s.name == "switchyard_requests_total"}
    assert "unknown" in models
    assert not any(m.startswith("no-such-model") or "\ud800" in m or "/" in m for m in models), models
    still_serves(edge)


# ---- inputs that gave 500 ----------------------------------------------------------------------

DEEP = 200_000
MALFORMED = [
    (b'{"model": "tiny-llama", "prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}", "prompt"),
    (b'{"model": "tiny-llama", "prompt": "hi", "user": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}", "user"),
    (b'{"model": "tiny-llama", "prompt": "hi", "user": ' + b"[" * 900 + b"]" * 900 + b"}", "user"),
    (b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "max_tokens"),
    (b'{"model": "tiny-llama", "prompt": "hi", "top_k": 2147483648}', "top_k"),
    (b'{"model": "tiny-llama", "prompt": "hi", "seed": 18446744073709551616}', "seed"),
    (b'{"model": "tiny-llama", "prompt": "a\\ud800b"}', "prompt"),
    (b'{"model": "tiny-llama", "prompt": "hi", "stop": ["\\udfff"]}', "stop[0]"),
]


@pytest.mark.parametrize("content, param", MALFORMED, ids=[p for _, p in MALFORMED])
def test_hostile_bodies_get_400_naming_the_field(edge: LocalStack, content: bytes, param: str) -> None:
    assert_envelope(post(edge, "/v1/completions", content=content), 400, param)
    still_serves(edge)


def test_chat_content_with_a_lone_surrogate_gets_400(edge: LocalStack) -> None:
    content = b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x\\udc80"}]}'
    assert_envelope(post(edge, "/v1/chat/completions", content=content), 400, "messages[0].content")


@pytest.mark.parametrize("method", ["Complete", "Generate"])
def test_malformed_protobuf_is_invalid_argument(edge: LocalStack, method: str) -> None:
    with grpc.insecure_channel(edge.router_address) as ch:
        call = (ch.unary_unary if method == "Complete" else ch.unary_stream)(f"/switchyard.v1.Generation/{method}")
        with pytest.raises(grpc.RpcError) as err:
            result = call(b"\xff\xff\xff\xff", timeout=10, metadata=edge.auth_metadata())
            if method == "Generate":
                list(result)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "protobuf" in (err.value.details() or "")


def test_grpc_lone_surrogate_is_rejected_by_protobuf_and_text_prompt_ok(edge: LocalStack) -> None:
    # The gRPC path carries UTF-8 protobuf strings; one that is not valid UTF-8 is malformed.
    raw = generate_pb2.GenerateRequest(model=TINY, text="ab", max_tokens=2).SerializeToString()
    raw = raw.replace(b"ab", b"\xed\xa0")  # a UTF-8-encoded surrogate half
    with grpc.insecure_channel(edge.router_address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/switchyard.v1.Generation/Complete")(raw, timeout=10, metadata=edge.auth_metadata())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- semantics ----------------------------------------------------------------------------------

def test_top_p_zero_is_greedy(edge: LocalStack) -> None:
    base = {"model": TINY, "prompt": "once upon a time", "max_tokens": 12, "ignore_eos": True}
    greedy = post(edge, "/v1/completions", {**base, "temperature": 0}).json()["choices"][0]["text"]
    for seed in (1, 2, 3):
        out = post(edge, "/v1/completions", {**base, "temperature": 1.5, "top_p": 0, "seed": seed})
        assert out.status_code == 200 and out.json()["choices"][0]["text"] == greedy


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf", "-inf", "abc"])
def test_bad_request_timeout_header_is_400(edge: LocalStack, value: str) -> None:
    resp = post(edge, "/v1/completions", {"model": TINY, "prompt": "hi", "max_tokens": 2},
                headers={"x-request-timeout": value})
    assert_envelope(resp, 400, "x-request-timeout")


def test_request_that_can_never_fit_the_tenant_tpm_is_400_not_retryable_429(edge: LocalStack) -> None:
    resp = post(edge, "/v1/completions", {"model": TINY, "prompt": "hi", "max_tokens": SMALL_TPM + 10},
                headers={"Authorization": f"Bearer {SMALL_KEY}"})
    error = assert_envelope(resp, 400, "max_tokens")
    assert "Retry-After" not in resp.headers and str(SMALL_TPM) in error["message"]
    ok = post(edge, "/v1/completions", {"model": TINY, "prompt": "hi", "max_tokens": 3},
              headers={"Authorization": f"Bearer {SMALL_KEY}"})
    assert ok.status_code == 200, ok.text


# ---- OpenAI compatibility -----------------------------------------------------------------------

def test_unknown_routes_and_methods_answer_in_the_error_envelope(edge: LocalStack) -> None:
    error = assert_envelope(httpx.get(f"{edge.http_url}/v1/nothing-here", headers=AUTH, timeout=5), 404)
    assert error["type"] == "not_found_error"
    error = assert_envelope(httpx.get(f"{edge.http_url}/v1/completions", headers=AUTH, timeout=5), 405)
    assert error["type"] == "invalid_request_error"


def test_models_retrieve_with_the_official_sdk(edge: LocalStack) -> None:
    client = openai.OpenAI(base_url=f"{edge.http_url}/v1", api_key=KEY, max_retries=0)
    model = client.models.retrieve(TINY)
    assert model.id == TINY and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{edge.http_url}/v1", api_key="wrong", max_retries=0).models.retrieve(TINY)


PARAMS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -2},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100_000},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": 1}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5.0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "hi", "temperature": "1"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
]


@pytest.mark.parametrize("path, body, param", PARAMS, ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(PARAMS)])
def test_errors_name_the_field_the_client_sent_and_types_are_strict(edge: LocalStack, path: str, body: dict,
                                                                     param: str) -> None:
    assert_envelope(post(edge, path, {"model": TINY, **body}), 400, param)


@pytest.mark.parametrize("request_, field", [
    (generate_pb2.GenerateRequest(model=TINY, text="word " * 3000), "text"),
    (generate_pb2.GenerateRequest(model=TINY, chat=generate_pb2.ChatInput(messages=[
        generate_pb2.ChatMessage(role="user", content="word " * 3000)])), "chat.messages"),
    (generate_pb2.GenerateRequest(model=TINY, text="hi", max_tokens=2, sampling=generate_pb2.SamplingParams(top_p=3)),
     "sampling.top_p"),
])
def test_grpc_errors_name_the_proto_field(edge: LocalStack, request_: Any, field: str) -> None:
    with grpc.insecure_channel(edge.router_address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            generate_pb2_grpc.GenerationStub(ch).Complete(request_, timeout=10, metadata=edge.auth_metadata())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field + ":"), err.value.details()


def test_grpc_reflection_v1_is_served(edge: LocalStack) -> None:
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2
    with grpc.insecure_channel(edge.router_address) as ch:
        info = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="switchyard.v1.Generation"),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")]
        listed, described, itself = list(info(iter(reqs), timeout=10))
    assert not itself.HasField("error_response"), itself.error_response
    names = {s.name for s in listed.list_services_response.service}
    assert {"switchyard.v1.Generation", "grpc.reflection.v1.ServerReflection"} <= names, names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    assert any(s.name == "Generation" for f in files for s in f.service)


# ---- §3 special tokens in user content ---------------------------------------------------------

def test_special_tokens_in_user_text_are_plain_text_over_the_api(edge: LocalStack) -> None:
    # "<|im_start|>" is one control token when the template writes it, ~10 byte tokens when a user does.
    with grpc.insecure_channel(edge.router_address) as ch:
        done = generate_pb2_grpc.GenerationStub(ch).Complete(
            generate_pb2.GenerateRequest(model=TINY, text="<|im_start|>", max_tokens=1), timeout=30,
            metadata=edge.auth_metadata())
    assert done.summary.usage.prompt_tokens > 1


# ---- readiness -----------------------------------------------------------------------------------

def test_stack_with_a_tenants_file_and_no_key_becomes_ready(tiny_models_dir: Path, tmp_path: Path) -> None:
    """`switchyard up --tenants-file F` passes no key: readiness must not need one."""
    from switchyard.runtime.stack import StackSpec
    tenants = tmp_path / "tenants.toml"
    write_tenant(tenants, "someone", "sy-key-the-stack-does-not-know")
    spec = StackSpec(models_dir=tiny_models_dir, replicas={TINY: 1}, heartbeat_s=0.2, log_dir=tmp_path,
                     tenants_file=tenants, metrics=False)
    stack = LocalStack(spec)
    try:
        stack.start(timeout_s=30)
        resp = httpx.get(f"{stack.http_url}/v1/models", timeout=5,
                         headers={"Authorization": "Bearer sy-key-the-stack-does-not-know"})
        assert [m["id"] for m in resp.json()["data"]] == [TINY]
    finally:
        stack.stop()
