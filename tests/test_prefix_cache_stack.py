"""The prefix cache through the real stack (router → NATS → batcher → worker, one tiny-model
replica): a repeated chat and a follow-up turn report cached prompt tokens on gRPC and HTTP with
unchanged output, the replica's load reports carry its cached block hashes, and the worker's
metrics count the hits."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import httpx
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from switchyard.bus import subjects
from switchyard.model.catalog import ModelCatalog
from switchyard.prefix.blocks import BLOCK_SIZE, block_hashes
from switchyard.runtime.stack import LocalStack
from switchyard.v1 import bus_pb2, generate_pb2, generate_pb2_grpc

from conftest import TINY, start_stack

pytestmark = pytest.mark.integration
SYSTEM = "You answer questions about the weather in the mountains, in one or two sentences, always politely."


@pytest.fixture(scope="module")
def stack(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s = start_stack(tiny_models_dir, {TINY: 1}, tmp_path_factory.mktemp("prefix-stack"))
    yield s
    s.stop()


def complete(stack: LocalStack, messages: list[tuple[str, str]], max_tokens: int = 12) -> generate_pb2.CompleteResponse:
    req = generate_pb2.GenerateRequest(model=TINY, max_tokens=max_tokens)
    for role, content in messages:
        req.chat.messages.add(role=role, content=content)
    with grpc.insecure_channel(stack.router_address) as ch:
        return generate_pb2_grpc.GenerationStub(ch).Complete(req, timeout=60)


def prompt_ids(tiny_models_dir: Path, messages: list[tuple[str, str]]) -> list[int]:
    entry = ModelCatalog(tiny_models_dir).get(TINY)
    assert entry is not None
    return entry.encode(entry.render_chat(messages))


def test_repeated_chat_and_follow_up_reuse_the_prefix_over_grpc(stack: LocalStack, tiny_models_dir: Path) -> None:
    messages = [("system", SYSTEM), ("user", "Will it snow on the pass tomorrow?")]
    first = complete(stack, messages)
    again = complete(stack, messages)
    n_prompt = first.summary.usage.prompt_tokens
    assert n_prompt == len(prompt_ids(tiny_models_dir, messages)) > 2 * BLOCK_SIZE
    assert first.summary.usage.cached_prompt_tokens == 0
    assert again.summary.usage.cached_prompt_tokens == (n_prompt - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert again.text == first.text and again.token_ids == first.token_ids
    # the next turn carries the first prompt (and, when it re-tokenizes the same, the answer)
    follow = complete(stack, messages + [("assistant", first.text), ("user", "And on Sunday?")])
    assert follow.summary.usage.cached_prompt_tokens >= n_prompt // BLOCK_SIZE * BLOCK_SIZE


def test_http_usage_reports_cached_tokens(stack: LocalStack) -> None:
    body = {"model": TINY, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "system", "content": "Mention the altitude in metres. " + SYSTEM},
                         {"role": "user", "content": "Is the summit windy in March?"}]}
    with httpx.Client(base_url=stack.http_url, timeout=60) as client:
        first = client.post("/v1/chat/completions", json=body).json()
        again = client.post("/v1/chat/completions", json=body).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (again["usage"]["prompt_tokens"] - 1) // BLOCK_SIZE * BLOCK_SIZE > 0
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


def test_load_reports_carry_the_cached_blocks(stack: LocalStack, tiny_models_dir: Path) -> None:
    messages = [("system", SYSTEM), ("user", "How cold is it at night above the tree line?")]
    complete(stack, messages)
    expected = block_hashes(prompt_ids(tiny_models_dir, messages), TINY)
    replica = stack.batchers[0].name.replace("batcher-", "", 1)

    async def next_report_holding(hashes: list[int]) -> bus_pb2.LoadReport:
        nc = await nats.connect(stack.nats.url, **stack.nats_observer)  # type: ignore[union-attr]
        try:
            sub = await nc.subscribe(subjects.load_subject(TINY, replica))
            async with asyncio.timeout(10):
                while True:
                    report = bus_pb2.LoadReport.FromString((await sub.next_msg(timeout=5)).data)
                    if set(hashes) <= set(report.cached_blocks):
                        return report
        finally:
            await nc.close()

    report = asyncio.run(next_report_holding(expected))
    assert report.block_size == BLOCK_SIZE
    assert report.prefix_cache_capacity_bytes == 256 << 20
    assert 0 < report.prefix_cache_bytes <= report.prefix_cache_capacity_bytes
    assert len(report.cached_blocks) == len(set(report.cached_blocks))


def test_worker_metrics_count_prefix_cache_hits(stack: LocalStack) -> None:
    messages = [("system", SYSTEM), ("user", "Should I carry chains for the tyres?")]
    complete(stack, messages)
    complete(stack, messages)
    port = stack.workers[0].metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.labels.get("model") == TINY}
    assert values["switchyard_prefix_cache_hit_tokens_total"] >= 2 * BLOCK_SIZE
    assert values["switchyard_prefix_cache_query_tokens_total"] >= values["switchyard_prefix_cache_hit_tokens_total"]
    assert values["switchyard_prefix_cache_blocks_stored_total"] > 0
    assert values["switchyard_prefix_cache_bytes"] > 0
    assert values["switchyard_prefix_cache_capacity_bytes"] == 256 << 20
