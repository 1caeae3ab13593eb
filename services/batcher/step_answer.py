"""A worker step's answer as the scheduler reads it: plain Python values, not protobuf.

The scheduler reads every token of every step (256 per step at a full GPU batch), and a
protobuf field costs per read; the co-located replica (`--worker local`) need not build the
message at all. So the answer crosses into the scheduler as a `StepAnswer`: converted from the
wire at the gRPC edge (`answer_from_proto`), or made straight from the engine's result in the
process (`local_worker.answer_from_result`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from switchyard.v1 import worker_pb2


class StepToken(NamedTuple):
    """One token a step produced for one sequence."""

    sequence_id: str
    token_id: int
    first: bool  # the sequence's first token (its prompt completed in this step)
    cached_prompt_tokens: int  # with the first token: prompt tokens the prefix cache supplied


@dataclass
class StepAnswer:
    """What one worker step did (worker.proto StepResponse, field for field)."""

    tokens: list[StepToken] = field(default_factory=list)  # in step order
    prefill_remaining: dict[str, int] = field(default_factory=dict)  # prompt tokens left, per chunked sequence
    decode_batch_size: int = 0
    refused: str = ""  # set: nothing of the step ran, and why
    refused_sequences: dict[str, str] = field(default_factory=dict)  # newcomers refused alone, and why


def answer_from_proto(response: worker_pb2.StepResponse) -> StepAnswer:
    return StepAnswer(
        tokens=[StepToken(t.sequence_id, t.token_id, t.first, t.cached_prompt_tokens) for t in response.tokens],
        prefill_remaining=dict(response.prefill_remaining), decode_batch_size=response.stats.decode_batch_size,
        refused=response.refused, refused_sequences=dict(response.refused_sequences))
