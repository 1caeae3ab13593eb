"""Property-based fuzzing of both APIs (issue 10): whatever a client sends, the gateway answers
without a 5xx, every error is in the OpenAI envelope (HTTP) or a deliberate status code (gRPC),
and the stack keeps serving a normal request afterwards.

Bounded for `make test` (FUZZ_EXAMPLES, default 60 per API); `make fuzz` runs it longer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.router.tenants import write_tenant
from switchyard.runtime.stack import LocalStack
from switchyard.v1 import generate_pb2, generate_pb2_grpc

from conftest import TINY, start_stack

KEY = "sy-fuzz-key"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=10_000, derandomize=EXAMPLES <= 60,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
pytestmark = [pytest.mark.integration, pytest.mark.timeout(max(300, EXAMPLES * 5))]

# Any JSON value, including the awkward ones: lone surrogates, huge and negative numbers, deep nesting.
text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40) | st.sampled_from(
    ["", "\ud800", "<|im_start|>", "<|im_end|>\n<|im_start|>system\n", "\x00", "tiny-llama", "user", "🙂" * 5])
numbers = st.integers() | st.integers(min_value=2**31 - 2, max_value=2**64 + 2) | st.floats(allow_nan=False) \
    | st.sampled_from([0, 1, -1, 0.5, 1e308, 2**70, 10**80])
scalars = st.none() | st.booleans() | numbers | text
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text, kids, max_size=3),
                           max_leaves=8)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | text,
                                           "content": text | json_values}), max_size=3) | json_values
FIELDS = {
    "model": st.just(TINY) | text,
    "prompt": text | st.lists(text, max_size=2) | json_values,
    "max_tokens": st.integers(min_value=-2, max_value=8) | numbers | json_values,
    "max_completion_tokens": st.integers(min_value=-2, max_value=8) | numbers,
    "temperature": numbers | json_values, "top_p": numbers, "top_k": numbers, "seed": numbers,
    "repetition_penalty": numbers, "stop": text | st.lists(text, max_size=3) | json_values,
    "stream": st.booleans() | json_values, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "n": numbers, "user": text | json_values, "logprobs": json_values, "echo": json_values,
    "presence_penalty": numbers, "ignore_eos": st.booleans(), "bogus_field": json_values,
}


def bodies(chat: bool) -> st.SearchStrategy[dict[str, Any]]:
    optional = {k: v for k, v in FIELDS.items() if k != "model"}
    if chat:
        optional["messages"] = messages
        optional.pop("prompt")
    base = st.fixed_dictionaries({"model": FIELDS["model"]}, optional=optional)
    return base.map(lambda b: b if "max_tokens" in b else {**b, "max_tokens": 4})  # short generations when valid


@pytest.fixture(scope="module")
def fuzz_stack(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("fuzz")
    tenants = tmp / "tenants.toml"
    write_tenant(tenants, "fuzz", KEY, requests_per_minute=1_000_000, tokens_per_minute=100_000_000)
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp, tenants_file=tenants, api_key=KEY)
    yield stack
    stack.stop()


def check_http(resp: httpx.Response) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if resp.status_code == 200:
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            assert resp.text.rstrip().endswith("data: [DONE]") or '"error"' in resp.text, resp.text[-300:]
        else:
            assert "choices" in resp.json()
        return
    error = resp.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]


def still_serves(stack: LocalStack) -> None:
    ok = httpx.post(f"{stack.http_url}/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 2},
                    headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert ok.status_code == 200, ok.text
    with grpc.insecure_channel(stack.router_address) as ch:
        done = generate_pb2_grpc.GenerationStub(ch).Complete(
            generate_pb2.GenerateRequest(model=TINY, text="hi", max_tokens=2), timeout=30,
            metadata=stack.auth_metadata())
    assert done.summary.usage.completion_tokens >= 1


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_http_api_never_answers_5xx_and_keeps_serving(fuzz_stack: LocalStack, path: str) -> None:
    with httpx.Client(base_url=fuzz_stack.http_url, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}) as client:

        @FUZZ
        @given(body=bodies(chat="chat" in path), timeout=st.none() | st.sampled_from(["nan", "-1", "5", "1e9", "x"]))
        def one(body: dict[str, Any], timeout: str | None) -> None:
            raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
            headers = {"x-request-timeout": timeout} if timeout else {}
            check_http(client.post(path, content=raw, headers=headers))

        @FUZZ
        @given(raw=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
        def raw_bytes(raw: bytes) -> None:
            check_http(client.post(path, content=raw))

        one()
        raw_bytes()
    still_serves(fuzz_stack)


ALLOWED_GRPC = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}


def grpc_requests() -> st.SearchStrategy[generate_pb2.GenerateRequest]:
    def build(model: str, kind: int, t: str, ids: list[int], msgs: list[tuple[str, str]], max_tokens: int,
              temp: float, top_p: float, top_k: int, stops: list[str]) -> generate_pb2.GenerateRequest:
        req = generate_pb2.GenerateRequest(model=model, max_tokens=max_tokens, sampling=generate_pb2.SamplingParams(
            temperature=temp, top_p=top_p, top_k=top_k), stop=generate_pb2.StopConditions(stop=stops))
        if kind == 0:
            req.text = t
        elif kind == 1:
            req.token_ids.ids.extend(ids)
        elif kind == 2:
            for role, content in msgs:
                req.chat.messages.add(role=role, content=content)
        return req
    utf8 = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=30)
    return st.builds(build, st.just(TINY) | utf8, st.integers(0, 3), utf8,
                     st.lists(st.integers(0, 2**32 - 1), max_size=5),
                     st.lists(st.tuples(st.sampled_from(["user", "system", "assistant", "x"]), utf8), max_size=3),
                     st.integers(-2**31, 8), st.floats(width=32), st.floats(width=32),
                     st.integers(-2**31, 2**31 - 1), st.lists(utf8, max_size=20))


def test_grpc_api_answers_with_deliberate_codes_and_keeps_serving(fuzz_stack: LocalStack) -> None:
    with grpc.insecure_channel(fuzz_stack.router_address) as ch:
        complete = generate_pb2_grpc.GenerationStub(ch).Complete
        raw_complete = ch.unary_unary("/switchyard.v1.Generation/Complete")

        @FUZZ
        @given(req=grpc_requests())
        def one(req: generate_pb2.GenerateRequest) -> None:
            try:
                complete(req, timeout=30, metadata=fuzz_stack.auth_metadata())
            except grpc.RpcError as exc:
                assert exc.code() in ALLOWED_GRPC, (exc.code(), exc.details())

        @FUZZ
        @given(raw=st.binary(max_size=200))
        def raw_bytes(raw: bytes) -> None:
            try:
                raw_complete(raw, timeout=30, metadata=fuzz_stack.auth_metadata())
            except grpc.RpcError as exc:
                assert exc.code() in ALLOWED_GRPC, (exc.code(), exc.details())

        one()
        raw_bytes()
    still_serves(fuzz_stack)
