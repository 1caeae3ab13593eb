"""Model routing through the real stack: the virtual model `smollm2-auto` resolves per request
to the truncated small model (int4-l12) or the full int4 model by estimated difficulty, and
every layer of reporting says which one served."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import grpc
import httpx
import pytest

from switchyard.routing.difficulty import estimate_difficulty
from switchyard.runtime.stack import LocalStack
from switchyard.v1 import generate_pb2, generate_pb2_grpc

from conftest import start_stack

pytestmark = [pytest.mark.slow, pytest.mark.integration]
LARGE, SMALL, AUTO = "smollm2-135m-instruct-int4", "smollm2-135m-instruct-int4-l12", "smollm2-auto"
THRESHOLD = 0.5
EASY = "Hi there!"
HARD = "Write a Python function that returns the n-th prime number and explain its complexity step by step."


@pytest.fixture(scope="module")
def auto_stack(real_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    records = tmp_path_factory.mktemp("auto-records")
    stack = start_stack(real_models_dir, {LARGE: 1, SMALL: 1}, tmp_path_factory.mktemp("auto-stack"),
                        records_dir=records, router_args=("--model-routes", f"{AUTO}={SMALL}:{LARGE}:{THRESHOLD}"))
    yield stack
    stack.stop()


def ask(stack: LocalStack, question: str, model: str = AUTO) -> tuple[str, generate_pb2.FinalSummary]:
    req = generate_pb2.GenerateRequest(model=model, max_tokens=12)
    req.chat.messages.add(role="user", content=question)
    text = []
    with grpc.insecure_channel(stack.router_address) as ch:
        for event in generate_pb2_grpc.GenerationStub(ch).Generate(req, timeout=120):
            if event.HasField("tokens"):
                text.append(event.tokens.text)
            elif event.HasField("final"):
                return "".join(text), event.final
            else:
                raise AssertionError(event.error.message)
    raise AssertionError("no final event")


def test_the_estimator_separates_the_test_prompts() -> None:
    assert estimate_difficulty(EASY, [0] * 4).score < THRESHOLD <= estimate_difficulty(HARD, [0] * 24).score


def test_auto_serves_easy_prompts_small_and_hard_ones_large_and_records_which(auto_stack: LocalStack) -> None:
    easy_text, easy = ask(auto_stack, EASY)
    hard_text, hard = ask(auto_stack, HARD)
    assert easy.model == SMALL and hard.model == LARGE
    assert easy.usage.completion_tokens > 0 and hard.usage.completion_tokens > 0
    # the virtual model answers exactly as the model it chose would on its own
    assert ask(auto_stack, EASY, SMALL)[0] == easy_text
    assert ask(auto_stack, HARD, LARGE)[0] == hard_text
    # listed next to the real models, over gRPC and HTTP
    with grpc.insecure_channel(auto_stack.router_address) as ch:
        names = {m.name for m in generate_pb2_grpc.GenerationStub(ch).ListModels(generate_pb2.ListModelsRequest()).models}
    assert {AUTO, SMALL, LARGE} <= names
    body = httpx.post(f"{auto_stack.http_url}/v1/chat/completions", timeout=60, json={
        "model": AUTO, "max_tokens": 8, "messages": [{"role": "user", "content": EASY}]}).json()
    assert body["model"] == SMALL
    # router metrics count the choices
    metrics = httpx.get(f"http://{auto_stack.spec.host}:{auto_stack.router.metrics_port}/metrics").text  # type: ignore[union-attr]
    assert f'switchyard_model_routed_total{{model="{SMALL}",route="{AUTO}"}}' in metrics
    assert f'switchyard_model_routed_total{{model="{LARGE}",route="{AUTO}"}}' in metrics


def test_request_records_name_the_served_model_and_the_asked_one(auto_stack: LocalStack) -> None:
    ask(auto_stack, EASY)
    path = auto_stack.spec.records_dir / "requests.jsonl"  # type: ignore[operator]
    deadline = time.monotonic() + 10
    routed: list[dict[str, object]] = []
    while time.monotonic() < deadline and not routed:
        lines = path.read_text().splitlines() if path.exists() else []
        routed = [r for r in map(json.loads, lines) if r.get("requested_model") == AUTO]
        time.sleep(0.1)
    assert routed, "no record of a request for the virtual model"
    assert {r["model"] for r in routed} <= {SMALL, LARGE}
    assert all(isinstance(r["difficulty"], float) for r in routed)
    assert any(r["model"] == SMALL and r["difficulty"] < THRESHOLD for r in routed)  # type: ignore[operator]
