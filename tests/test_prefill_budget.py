"""How many prompt tokens a step takes while others decode (`--prefill-chunk-decoding`): small
chunks on a CPU worker, where a step's time grows with its tokens; prefill_chunk on a GPU,
where a 256-stream burst otherwise took 64 steps to admit (measured on an H200, 2026-12-04).
And when new prompts wait for each other (`--prefill-wait-steps N`, prefill_coalescing.py): with
a big batch decoding, a trickle of newcomers waits a few steps to share one prefill run; never
by default, never with a small batch, never past the bound."""

from __future__ import annotations

import time

import pytest

from services.batcher.config import CPU_PREFILL_CHUNK_DECODING, BatcherConfig
from services.batcher.prefill_coalescing import PrefillCoalescing
from services.batcher.scheduler import Active, Scheduler
from switchyard.config import ConfigError
from switchyard.v1 import bus_pb2, worker_pb2

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("setting, provider, expected", [
    (0, "CPUExecutionProvider", CPU_PREFILL_CHUNK_DECODING),
    (0, "", CPU_PREFILL_CHUNK_DECODING),  # a worker that did not say: treated as a CPU
    (0, "CUDAExecutionProvider", 512),
    (64, "CUDAExecutionProvider", 64),  # a setting wins over the provider
    (300, "CPUExecutionProvider", 300),
])
def test_decoding_prefill_chunk_follows_the_setting_or_the_workers_device(setting: int, provider: str,
                                                                          expected: int) -> None:
    config = BatcherConfig(prefill_chunk=512, prefill_chunk_decoding=setting)
    assert config.decoding_prefill_chunk(provider) == expected


def test_auto_on_the_cpu_never_exceeds_prefill_chunk() -> None:
    assert BatcherConfig(prefill_chunk=64).decoding_prefill_chunk("CPUExecutionProvider") == 64


def test_a_negative_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="prefill_chunk_decoding"):
        BatcherConfig(prefill_chunk_decoding=-1).validate()


def scheduler_with_burst(provider: str, waiting: int, prompt: int) -> Scheduler:
    """One sequence decoding and `waiting` newcomers whose prompts are still to prefill."""
    info = worker_pb2.InfoResponse(model="m", context_length=2048, max_sequences=256, execution_provider=provider)
    s = Scheduler(BatcherConfig(max_batch_size=256), "r", info, None, None, None)  # type: ignore[arg-type]
    now = time.time()
    running = Active(bus_pb2.DispatchRequest(request_id="running", prompt_token_ids=[1] * prompt, max_tokens=64),
                     now, prefill_left=0, generated=3)
    s.active["running"] = running
    for i in range(waiting):
        rid = f"new-{i}"
        s.active[rid] = Active(bus_pb2.DispatchRequest(request_id=rid, prompt_token_ids=[1] * prompt, max_tokens=64),
                               now, prefill_left=prompt)
    return s


@pytest.mark.parametrize("provider, prompts_in_step", [("CPUExecutionProvider", 4), ("CUDAExecutionProvider", 16)])
def test_a_step_during_decode_prefills_as_many_prompts_as_the_budget_holds(provider: str, prompts_in_step: int) -> None:
    s = scheduler_with_burst(provider, waiting=40, prompt=32)
    request = s._next_request()
    assert request is not None and request.decode
    assert len(request.prefill) == prompts_in_step
    assert sum(c.max_tokens for c in request.prefill) == 32 * prompts_in_step


@pytest.mark.parametrize("decoding, waiting, tokens, oldest, hold", [
    (256, 3, 96, 0, True),  # a trickle next to a big batch waits
    (256, 15, 480, 7, True),
    (256, 16, 512, 0, False),  # a group of 256 // 16 goes
    (256, 3, 96, 8, False),  # the oldest waited its 8 steps
    (256, 3, 600, 0, False),  # their tokens fill the step's budget
    (31, 1, 32, 0, False),  # a small batch: groups of one, nobody waits
    (64, 3, 96, 0, True),  # 64 decoding: groups of 4
    (0, 3, 96, 0, False),  # nothing decodes: nobody to stall
    (256, 0, 0, 0, False),
])
def test_coalescing_holds_a_trickle_next_to_a_big_batch(decoding: int, waiting: int, tokens: int, oldest: int,
                                                         hold: bool) -> None:
    assert PrefillCoalescing(max_wait_steps=8).hold(decoding, waiting, tokens, 512, oldest) is hold
    assert PrefillCoalescing(max_wait_steps=0).hold(decoding, waiting, tokens, 512, oldest) is False


def test_prompts_never_wait_by_default() -> None:
    assert BatcherConfig().prefill_coalescing().max_wait_steps == 0
    assert BatcherConfig(prefill_wait_steps=8).prefill_coalescing().max_wait_steps == 8


def test_a_negative_prefill_wait_is_refused() -> None:
    with pytest.raises(ConfigError, match="prefill_wait_steps"):
        BatcherConfig(prefill_wait_steps=-1).validate()


WAIT = 8


def big_batch_with_newcomers(decoding: int, newcomers: int, wait: int = WAIT) -> Scheduler:
    info = worker_pb2.InfoResponse(model="m", context_length=4096, max_sequences=512,
                                   execution_provider="CUDAExecutionProvider")
    s = Scheduler(BatcherConfig(max_batch_size=512, prefill_wait_steps=wait), "r", info,
                  None, None, None)  # type: ignore[arg-type]
    now = time.time()
    for i in range(decoding):
        s.active[f"run-{i}"] = Active(bus_pb2.DispatchRequest(request_id=f"run-{i}", prompt_token_ids=[1] * 32,
                                                              max_tokens=1000), now, prefill_left=0, generated=3)
    for i in range(newcomers):
        add_newcomer(s, f"new-{i}")
    return s


def add_newcomer(s: Scheduler, rid: str) -> None:
    s.active[rid] = Active(bus_pb2.DispatchRequest(request_id=rid, prompt_token_ids=[1] * 32, max_tokens=64),
                           time.time(), prefill_left=32)


def prefilled_ids(request: worker_pb2.StepRequest | None) -> list[str]:
    assert request is not None and request.decode
    return [c.sequence_id for c in request.prefill]


def test_a_trickle_of_newcomers_waits_for_its_group_then_for_the_bound() -> None:
    """256 decoding, prompts waiting up to 8 steps: 3 newcomers wait (groups of 16); one more
    joins them on the way; all 4 go in one step when the oldest has waited 8 steps. The decode
    steps go on meanwhile."""
    s = big_batch_with_newcomers(decoding=256, newcomers=3)
    for step in range(WAIT):
        if step == 4:
            add_newcomer(s, "late")
        assert prefilled_ids(s._next_request()) == []
    assert sorted(prefilled_ids(s._next_request())) == ["late", "new-0", "new-1", "new-2"]


def test_a_full_group_goes_at_once_and_nobody_waits_by_default_or_beside_a_small_batch() -> None:
    full = big_batch_with_newcomers(decoding=256, newcomers=16)
    assert len(prefilled_ids(full._next_request())) == 16
    default = big_batch_with_newcomers(decoding=256, newcomers=3, wait=0)
    assert len(prefilled_ids(default._next_request())) == 3
    small = big_batch_with_newcomers(decoding=20, newcomers=1)
    assert prefilled_ids(small._next_request()) == ["new-0"]
