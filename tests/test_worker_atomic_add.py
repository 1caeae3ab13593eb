"""A worker Step (or AddSequences) that adds several sequences is all or none (issue 10): a
refused one leaves none of the others behind, so the batcher's one-by-one retry succeeds."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from services.worker.engine import Engine, EngineError
from services.worker.sampling import SamplingParams
from switchyard.v1 import generate_pb2, worker_pb2, worker_pb2_grpc

from conftest import TINY


@pytest.mark.unit
def test_engine_add_many_is_all_or_none(tiny_models_dir: Path) -> None:
    engine = Engine(tiny_models_dir / TINY, max_sequences=4)
    good = dict(sequence_id="good", prompt=[1, 2, 3], params=SamplingParams(), seed=0)
    with pytest.raises(EngineError):
        engine.add_many([good, dict(sequence_id="bad", prompt=[], params=SamplingParams(), seed=0)])
    assert engine.sequences == {}
    engine.add_many([good])  # the retry of the good one alone
    assert list(engine.sequences) == ["good"]
    with pytest.raises(EngineError, match="already exists"):
        engine.add_many([dict(good, sequence_id="other"), good])
    assert list(engine.sequences) == ["good"]


@pytest.mark.integration
def test_worker_step_with_a_bad_add_leaves_no_sequence_behind(tiny_stack) -> None:  # type: ignore[no-untyped-def]
    spec = worker_pb2.SequenceSpec(sequence_id="atomic-good", prompt_token_ids=[5, 6, 7],
                                   sampling=generate_pb2.SamplingParams(), seed=1)
    bad = worker_pb2.SequenceSpec(sequence_id="atomic-bad", prompt_token_ids=[], seed=1)
    token = tiny_stack.worker_metadata(tiny_stack.workers[0])
    with grpc.insecure_channel(f"127.0.0.1:{tiny_stack.workers[0].port}") as ch:
        worker = worker_pb2_grpc.WorkerStub(ch)
        try:
            with pytest.raises(grpc.RpcError) as err:
                worker.Step(worker_pb2.StepRequest(add=[spec, bad]), timeout=10, metadata=token)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as err:  # a prefill chunk for no sequence: adds undone
                worker.Step(worker_pb2.StepRequest(add=[spec], prefill=[worker_pb2.PrefillChunk(
                    sequence_id="nobody", max_tokens=0)]), timeout=10, metadata=token)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # what the batcher does next: add the good one alone — not "already exists"
            worker.AddSequences(worker_pb2.AddSequencesRequest(sequences=[spec]), timeout=10, metadata=token)
        finally:
            worker.RemoveSequences(worker_pb2.RemoveSequencesRequest(sequence_ids=["atomic-good"]), timeout=10, metadata=token)
