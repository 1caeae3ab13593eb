"""The real model end to end: SmolLM2-135M-Instruct (fp32 and int4) through router →
NATS → batcher → worker, answering real questions."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import grpc
import pytest

from switchyard.runtime.stack import LocalStack
from switchyard.v1 import generate_pb2, generate_pb2_grpc

from conftest import start_stack

pytestmark = [pytest.mark.slow, pytest.mark.integration]
FP32, INT4 = "smollm2-135m-instruct", "smollm2-135m-instruct-int4"


@pytest.fixture(scope="module")
def real_stack(real_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = start_stack(real_models_dir, {INT4: 1, FP32: 1}, tmp_path_factory.mktemp("real-stack"))
    yield stack
    stack.stop()


def chat(stack: LocalStack, model: str, question: str, max_tokens: int = 32,
         stop: list[str] | None = None) -> tuple[list[str], generate_pb2.FinalSummary]:
    req = generate_pb2.GenerateRequest(model=model, max_tokens=max_tokens,
                                       stop=generate_pb2.StopConditions(stop=stop or []))
    req.chat.messages.add(role="user", content=question)
    chunks: list[str] = []
    with grpc.insecure_channel(stack.router_address) as ch:
        for event in generate_pb2_grpc.GenerationStub(ch).Generate(req, timeout=120):
            if event.HasField("tokens"):
                chunks.append(event.tokens.text)
            else:
                return chunks, event.final
    raise AssertionError("no final event")


@pytest.mark.parametrize("model", [INT4, FP32])
def test_real_model_knows_the_capital_of_france(real_stack: LocalStack, model: str) -> None:
    chunks, final = chat(real_stack, model, "What is the capital of France?")
    answer = "".join(chunks)
    assert "Paris" in answer, answer
    assert final.finish_reason == generate_pb2.FINISH_REASON_EOS  # a short answer ends on <|im_end|>
    assert final.model == model and final.usage.completion_tokens < 32


def test_every_streamed_chunk_is_whole_utf8(real_stack: LocalStack) -> None:
    chunks, _ = chat(real_stack, INT4, "Write the words café, naïve and 日本 in a sentence.", max_tokens=48)
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks).encode("utf-8").decode("utf-8") == "".join(chunks)


def test_stop_string_ends_the_answer_before_it(real_stack: LocalStack) -> None:
    chunks, final = chat(real_stack, INT4, "What is the capital of France?", stop=["Paris"])
    assert final.finish_reason == generate_pb2.FINISH_REASON_STOP
    assert "Paris" not in "".join(chunks)


def test_int4_and_fp32_agree_on_a_greedy_answer(real_stack: LocalStack) -> None:
    question = "Name three primary colors."
    assert "".join(chat(real_stack, INT4, question)[0]) == "".join(chat(real_stack, FP32, question)[0])


@pytest.mark.parametrize("model", [INT4, FP32])
def test_a_repeated_chat_reuses_its_prefix_with_the_same_answer(real_stack: LocalStack, model: str) -> None:
    """One replica per model: the second identical chat finds its prompt in the worker's prefix
    cache and answers the same, token for token."""
    question = "Name three rivers of France and say in one sentence where each one flows."
    first_chunks, first = chat(real_stack, model, question, max_tokens=24)
    again_chunks, again = chat(real_stack, model, question, max_tokens=24)
    prompt = again.usage.prompt_tokens
    assert again.usage.cached_prompt_tokens == (prompt - 1) // 16 * 16 > 0
    assert "".join(again_chunks) == "".join(first_chunks)
