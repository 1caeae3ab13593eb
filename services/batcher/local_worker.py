"""The worker's engine inside the batcher's process (`--worker local`): the co-located replica.

The batcher and its worker are one pair; a step between them over gRPC costs a serialisation on
each side and two process hand-offs, which the pipelined StepStream hides in time but not in CPU:
at a large batch the batcher and worker spend tens of µs per token on it (docs/benchmarks.md).
Here the scheduler drives the same `WorkerServicer` core the worker's gRPC server wraps, so both
placements run the same step code; only the transport differs (here the engine's result reaches
the scheduler as a `StepAnswer` with no wire message in between). Steps run on the engine's one
thread (ONNX Runtime releases the GIL), so the event loop keeps publishing tokens and pulling
requests while a step computes. Why this placement: docs/decisions/colocated-replica.md.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from switchyard.v1 import worker_pb2

from services.worker.engine import EngineError, StepResult
from services.worker.server import WorkerServicer

from .step_answer import StepAnswer, StepToken


def answer_from_result(result: StepResult, refused: dict[str, str]) -> StepAnswer:
    """The engine's result as the scheduler reads it, without the wire message in between."""
    cached = result.cached_prompt_tokens
    return StepAnswer(tokens=[StepToken(s, t, f, cached.get(s, 0) if f else 0) for s, t, f in result.tokens],
                      prefill_remaining=result.prefill_remaining, decode_batch_size=result.decode_batch_size,
                      refused_sequences=refused)


class LocalStepStream:
    """A StepStream in the process: each written step is submitted to the engine's thread at
    once (so a second one queues behind the first, as pipelining wants) and answered in order."""

    def __init__(self, servicer: WorkerServicer) -> None:
        self._servicer = servicer
        self._answers: collections.deque[asyncio.Future[StepAnswer]] = collections.deque()
        self._cancelled = False

    async def _answer(self, request: worker_pb2.StepRequest) -> StepAnswer:
        try:
            result, refused = await self._servicer.step(request, singly=True)
        except EngineError as exc:  # the step as a whole was refused: as the gRPC StepStream says it
            return StepAnswer(refused=str(exc))
        return answer_from_result(result, refused)

    async def write(self, request: worker_pb2.StepRequest) -> None:
        if self._cancelled:
            raise RuntimeError("the local step stream was cancelled")
        # A task starts in creation order and submits its step to the one engine thread before
        # its first await: steps run in the order written.
        self._answers.append(asyncio.ensure_future(self._answer(request)))

    async def read(self) -> StepAnswer:
        if not self._answers:
            raise RuntimeError("read() with no step written")
        return await self._answers.popleft()

    def done(self) -> bool:
        return self._cancelled

    def cancel(self) -> bool:
        """Drops unanswered steps (a step already on the engine's thread finishes there)."""
        self._cancelled = True
        while self._answers:
            self._answers.popleft().cancel()
        return True


class LocalWorker:
    """The calls the Scheduler makes on a `WorkerStub`, answered by the servicer's core in this
    process (keyword arguments of gRPC calls, such as `timeout` and `metadata`, do not apply)."""

    def __init__(self, servicer: WorkerServicer) -> None:
        self.servicer = servicer

    async def Info(self, request: worker_pb2.InfoRequest, **_: Any) -> worker_pb2.InfoResponse:
        return self.servicer.info()

    async def RemoveSequences(self, request: worker_pb2.RemoveSequencesRequest,
                              **_: Any) -> worker_pb2.RemoveSequencesResponse:
        return await self.servicer.remove(request)

    def StepStream(self, **_: Any) -> LocalStepStream:
        return LocalStepStream(self.servicer)
