"""How many prompt tokens a step takes while others decode (`--prefill-chunk-decoding`): small
chunks on a CPU worker, where a step's time grows with its tokens; prefill_chunk on a GPU,
where a 256-stream burst otherwise took 64 steps to admit (measured on an H200, 2026-12-04)."""

from __future__ import annotations

import time

import pytest

from services.batcher.config import CPU_PREFILL_CHUNK_DECODING, BatcherConfig
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
