"""Cache-aware routing through the real stack: router (prefix_aware) → NATS → batchers →
workers with prefix caches, tiny model. Follow-up turns land where their prefix is cached,
unless that replica is overloaded."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest

from switchyard.runtime.stack import LocalStack
from switchyard.v1 import generate_pb2, generate_pb2_grpc

from conftest import TINY, start_stack, wait_for_replicas

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cache_stack(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    # A batch of one: one long generation fills a replica, so "overloaded" is easy to arrange.
    stack = start_stack(tiny_models_dir, {TINY: 3}, tmp_path_factory.mktemp("cache-routing"),
                        balancing="prefix_aware", max_batch_size=1)
    yield stack
    stack.stop()


def conversation(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(10, 250, size=length).tolist()


def generate(stub: generate_pb2_grpc.GenerationStub, ids: list[int], max_tokens: int = 4,
             ignore_eos: bool = False) -> tuple[list[int], generate_pb2.FinalSummary]:
    req = generate_pb2.GenerateRequest(model=TINY, token_ids=generate_pb2.TokenIds(ids=ids), max_tokens=max_tokens,
                                       stop=generate_pb2.StopConditions(ignore_eos=ignore_eos))
    out: list[int] = []
    for event in stub.Generate(req, timeout=60):
        if event.HasField("tokens"):
            out += event.tokens.token_ids
        elif event.HasField("final"):
            return out, event.final
        else:
            raise AssertionError(event.error.message)
    raise AssertionError("no final event")


def test_follow_up_turns_land_on_the_replica_holding_their_prefix(cache_stack: LocalStack) -> None:
    with grpc.insecure_channel(cache_stack.router_address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        wait_for_replicas(cache_stack, 3)
        first: dict[int, str] = {}
        histories = {s: conversation(s, 200) for s in range(4)}
        for s, ids in histories.items():
            answer, final = generate(stub, ids)
            assert final.usage.cached_prompt_tokens == 0
            first[s] = final.replica_id
            histories[s] = ids + answer
        assert len(set(first.values())) == 3  # with nothing cached it balances: every replica got a conversation
        for turn in range(2):
            for s, ids in histories.items():
                follow_up = ids + conversation(100 + s * 10 + turn, 20)
                answer, final = generate(stub, follow_up)
                assert final.replica_id == first[s], (s, turn)
                # everything but the last partial block came from the cache: the history, the
                # previous answer included
                assert final.usage.cached_prompt_tokens >= len(ids) - 16 - 4, (s, turn, final.usage)
                histories[s] = follow_up + answer


def test_a_follow_up_goes_elsewhere_while_its_replica_is_overloaded(cache_stack: LocalStack) -> None:
    with grpc.insecure_channel(cache_stack.router_address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        wait_for_replicas(cache_stack, 3)
        history = conversation(7, 300)
        _, final = generate(stub, history)
        home = final.replica_id
        # A long generation on the same conversation goes home (its prefix is there) and fills
        # the home replica's batch of one.
        started = threading.Event()
        long_final: list[generate_pb2.FinalSummary] = []

        def long_generation() -> None:
            req = generate_pb2.GenerateRequest(
                model=TINY, token_ids=generate_pb2.TokenIds(ids=history + [5]), max_tokens=200,
                stop=generate_pb2.StopConditions(ignore_eos=True))
            for event in stub.Generate(req, timeout=60):
                started.set()
                if event.HasField("final"):
                    long_final.append(event.final)

        worker = threading.Thread(target=long_generation)
        worker.start()
        assert started.wait(30)
        _, busy_final = generate(stub, history + [6, 7, 8])
        worker.join(60)
        assert long_final and long_final[0].replica_id == home
        assert busy_final.replica_id != home  # the cache is not worth queueing behind a full batch
        assert busy_final.usage.cached_prompt_tokens == 0
        # once the home replica is free again, the conversation goes back to a cache: home's,
        # or the one the overflow request just filled (both now hold the history)
        _, after = generate(stub, history + [9, 10, 11])
        assert after.replica_id in {home, busy_final.replica_id}
        assert after.usage.cached_prompt_tokens >= 288
