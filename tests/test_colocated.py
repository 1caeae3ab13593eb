"""The co-located replica (`--worker local`): the worker's engine inside the batcher's process.

Its settings are checked at start-up; its step stream answers in order with steps pipelined on
the engine's thread; through the real stack it gives the tokens the engine gives, refuses a bad
newcomer alone. Failover with a co-located replica killed or stopped mid-stream:
tests/test_failover.py (both placements); refusing CUDA that cannot run: tests/test_providers.py."""

from __future__ import annotations

import asyncio
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from services.batcher.config import BatcherConfig
from services.batcher.local_worker import LocalWorker, answer_from_result
from services.batcher.step_answer import StepToken, answer_from_proto
from services.worker.engine import Engine, StepResult
from services.worker.sampling import SamplingParams
from services.worker.server import WorkerServicer, step_response_to_proto
from switchyard.config import ConfigError, load_config
from switchyard.runtime.stack import LocalStack
from switchyard.v1 import generate_pb2, generate_pb2_grpc, worker_pb2

from conftest import TINY, start_stack

PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11], [8, 8, 8, 120, 33], list(range(20, 60))]


# ---- configuration -------------------------------------------------------------------------------
@pytest.mark.unit
def test_local_worker_flags_are_read_and_checked_at_start_up(tiny_models_dir: Path) -> None:
    model = str(tiny_models_dir / TINY)
    config = load_config(BatcherConfig, ["--worker", "local", "--worker-flags",
                                         f"--model-dir {shlex.quote(model)} --max-sequences 7 --threads 1"])
    worker = config.local_worker_config()
    assert (worker.model_dir, worker.max_sequences, worker.threads) == (Path(model), 7, 1)
    with pytest.raises(ConfigError, match="--port, --auth-token describe a worker's own server"):
        load_config(BatcherConfig, ["--worker", "local", "--worker-flags",
                                    f"--model-dir {model} --port 5000 --auth-token x"])
    with pytest.raises(ConfigError, match="cannot read .* as worker flags"):
        load_config(BatcherConfig, ["--worker", "local", "--worker-flags", f"--model-dir {model} --no-such-flag 1"])
    with pytest.raises(ConfigError, match="is not a model folder"):
        load_config(BatcherConfig, ["--worker", "local", "--worker-flags", "--model-dir /nonexistent"])
    with pytest.raises(ConfigError, match="worker_flags apply only with --worker local"):
        load_config(BatcherConfig, ["--worker", "127.0.0.1:1", "--worker-flags", f"--model-dir {model}"])


# ---- the step stream in the process -----------------------------------------------------------------
def _spec(sid: str, prompt: list[int]) -> worker_pb2.SequenceSpec:
    return worker_pb2.SequenceSpec(sequence_id=sid, prompt_token_ids=prompt)


@pytest.mark.unit
def test_local_step_stream_answers_pipelined_steps_in_order_as_the_engine_does(tiny_models_dir: Path) -> None:
    reference = Engine(tiny_models_dir / TINY, max_sequences=4, threads=1)
    for i, prompt in enumerate(PROMPTS):
        reference.add(f"s{i}", prompt, SamplingParams(), 0)
    expected: list[list[tuple[str, int, bool]]] = [
        reference.step([(f"s{i}", len(p)) for i, p in enumerate(PROMPTS)], decode=False).tokens]
    for _ in range(5):
        expected.append(reference.step([], decode=True).tokens)

    async def run() -> list[list[tuple[str, int, bool]]]:
        executor = ThreadPoolExecutor(max_workers=1)
        worker = LocalWorker(WorkerServicer(executor, Engine(tiny_models_dir / TINY, max_sequences=4, threads=1)))
        call = worker.StepStream(metadata=None)
        await call.write(worker_pb2.StepRequest(
            add=[_spec(f"s{i}", p) for i, p in enumerate(PROMPTS)],
            prefill=[worker_pb2.PrefillChunk(sequence_id=f"s{i}", max_tokens=len(p)) for i, p in enumerate(PROMPTS)]))
        answers = []
        for _ in range(5):  # two steps in flight at a time, as the batcher's pipeline keeps them
            await call.write(worker_pb2.StepRequest(decode=True))
            answers.append(await call.read())
        answers.append(await call.read())
        # a step that cannot run is refused whole, and the stream goes on
        await call.write(worker_pb2.StepRequest(prefill=[worker_pb2.PrefillChunk(sequence_id="nobody", max_tokens=1)]))
        refused = await call.read()
        assert refused.refused_sequences == {"nobody": "unknown sequence 'nobody' in prefill"}
        info = await worker.Info(worker_pb2.InfoRequest())
        assert info.active_sequences == len(PROMPTS) and info.model == TINY
        removed = await worker.RemoveSequences(worker_pb2.RemoveSequencesRequest(all=True))
        assert removed.active_sequences == 0
        call.cancel()
        assert call.done()
        with pytest.raises(RuntimeError, match="cancelled"):
            await call.write(worker_pb2.StepRequest(decode=True))
        executor.shutdown()
        return [[(t.sequence_id, t.token_id, t.first) for t in a.tokens] for a in answers]

    assert asyncio.run(run()) == [[(s, t, f) for s, t, f in step] for step in expected]


# ---- through the real stack -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def colocated_stack(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = start_stack(tiny_models_dir, {TINY: 2}, tmp_path_factory.mktemp("colocated-logs"), colocate=True)
    yield stack
    stack.stop()


def _generate(stack: LocalStack, prompt: list[int], max_tokens: int) -> tuple[list[int], str]:
    with stack.grpc_channel() as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        tokens: list[int] = []
        for event in stub.Generate(generate_pb2.GenerateRequest(
                model=TINY, token_ids=generate_pb2.TokenIds(ids=prompt), max_tokens=max_tokens,
                stop=generate_pb2.StopConditions(ignore_eos=True)), timeout=30):
            if event.HasField("tokens"):
                tokens += event.tokens.token_ids
            elif event.HasField("final"):
                return tokens, event.final.replica_id
            else:
                raise AssertionError(event.error.message)
    raise AssertionError("stream ended without a final event")


@pytest.mark.integration
def test_colocated_stack_has_no_worker_process_and_streams_the_engines_tokens(
        colocated_stack: LocalStack, tiny_models_dir: Path) -> None:
    assert colocated_stack.workers == [] and len(colocated_stack.batchers) == 2
    engine = Engine(tiny_models_dir / TINY, max_sequences=4, threads=1)
    for i, prompt in enumerate(PROMPTS):
        engine.add(f"r{i}", prompt, SamplingParams(), 0)
        want = [engine.step([(f"r{i}", len(prompt))], decode=False).tokens[0][1]]
        while len(want) < 24:
            want += [t for s, t, _ in engine.step([], decode=True).tokens if s == f"r{i}"]
        engine.remove([f"r{i}"])
        got, replica = _generate(colocated_stack, prompt, 24)
        assert got == want, (i, replica)


@pytest.mark.integration
def test_a_refused_newcomer_fails_alone_in_a_colocated_replica(tiny_models_dir: Path, tmp_path: Path) -> None:
    """Half the sequences are refused by a planted fault: each gets INVALID_ARGUMENT with the
    reason, and every other stream of the same batches completes."""
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path, colocate=True,
                        worker_args={TINY: ("--fault-fail-fraction", "0.5")})
    try:
        async def run() -> list[tuple[int, str]]:
            async with grpc.aio.insecure_channel(stack.router_address) as channel:
                stub = generate_pb2_grpc.GenerationStub(channel)

                async def one(i: int) -> tuple[int, str]:
                    n = 0
                    try:  # refused before its first token: the call's status says why
                        async for event in stub.Generate(generate_pb2.GenerateRequest(
                                model=TINY, token_ids=generate_pb2.TokenIds(ids=[5 + i, 9, 13]), max_tokens=16,
                                stop=generate_pb2.StopConditions(ignore_eos=True)), timeout=30):
                            if event.HasField("tokens"):
                                n += len(event.tokens.token_ids)
                            elif event.HasField("error"):
                                return n, f"event {event.error.message}"
                    except grpc.aio.AioRpcError as exc:
                        return n, f"{exc.code().name}: {exc.details()}"
                    return n, ""
                return await asyncio.gather(*(one(i) for i in range(16)))
        results = asyncio.run(run())
    finally:
        stack.stop()
    refused = [why for n, why in results if why]
    assert 0 < len(refused) < 16, results
    assert all(why.startswith("INVALID_ARGUMENT: planted fault: sequence ") for why in refused), refused
    assert all(n == 16 for n, why in results if not why), results


@pytest.mark.unit
def test_a_colocated_answer_equals_what_the_wire_carries() -> None:
    """The co-located replica hands the engine's result to the scheduler without a StepResponse:
    the same values as a separate worker's answer read off the wire."""
    result = StepResult(tokens=[("a", 5, False), ("b", 9, True), ("a", 6, False)], prefill_remaining={"c": 40},
                        decode_batch_size=2, decode_steps=2, cached_prompt_tokens={"b": 32})
    wire = step_response_to_proto(result)
    wire.refused_sequences.update({"d": "prompt too long"})
    local = answer_from_result(result, {"d": "prompt too long"})
    assert local == answer_from_proto(wire)
    assert local.tokens == [StepToken("a", 5, False, 0), StepToken("b", 9, True, 32), StepToken("a", 6, False, 0)]
    assert (local.prefill_remaining, local.decode_batch_size, local.refused) == ({"c": 40}, 2, "")
