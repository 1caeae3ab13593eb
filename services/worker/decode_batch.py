"""The decode batch: where a worker's running sequences keep their KV, and the ONNX Runtime calls
that read and extend it. One interface, one implementation per graph kind:

- `PlainBatch` (plain_batch.py) for graphs on standard ONNX ops (the I/O contract in
  switchyard.model.config): rows left-padded and masked, KV concatenated per step;
- `FusedBatch` (fused_batch.py) for graphs on ONNX Runtime's contrib operators
  (GroupQueryAttention, FUSED_CONTRACT): KV in a preallocated pool that the graph appends to in
  place; a row joining or leaving is one row copy, not a rebuild of the batch.

The engine owns the sequences, sampling and the prefix cache and calls the batch in row order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    from .engine import Sequence


class DecodeBatch(Protocol):
    """Rows of the running sequences, their KV, and the model calls over them."""

    ids: list[str]  # sequence ids in row order

    def prefill_whole(self, seqs: list["Sequence"]) -> tuple[np.ndarray, np.ndarray | None]:
        """Whole prompts (nothing cached) in one call; the rows join the batch. Returns the
        last prompt token's logits [n, vocab] and, when the graph computes it, argmax [n]."""

    def prefill_chunk(self, seq: "Sequence", n: int) -> np.ndarray:
        """The next ``n`` prompt tokens of ``seq`` on its private KV (seq.private_kv), logits of
        the last [vocab]. The caller advances ``seq.processed`` and calls ``join`` when done."""

    def seed(self, seq: "Sequence", kv: list[np.ndarray]) -> None:
        """Start ``seq``'s private KV from a cached prefix (per past name [kv_heads, T, head_dim])."""

    def join(self, seq: "Sequence") -> None:
        """Move a fully prefilled sequence's private KV into the batch (a new last row)."""

    def decode(self, seqs: list["Sequence"], logits_on_host: bool = True
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """One step of every row (``seqs`` in row order): logits [B, vocab], argmax [B] or None.
        ``logits_on_host=False`` (every row greedy): a batch whose graph computes the argmax may
        leave the logits on the device and return None for them."""

    def device_logits(self) -> "ort.OrtValue | np.ndarray | None":
        """The last decode step's logits where the model left them ([n, 1, vocab], n ≥ the
        batch's rows; rows past them are padding), for sampling without a copy to the host."""

    def private_kv(self, seq: "Sequence") -> list[np.ndarray]:
        """A prefilling sequence's cached tokens' KV on the host, per past name [kv_heads, T, head_dim]."""

    def row_kv(self, sequence_id: str, n: int) -> list[np.ndarray] | None:
        """The first ``n`` KV positions of a row on the host (per past name), None if the row
        does not hold ``n`` tokens."""

    def drop(self, sequence_ids: set[str]) -> None:
        """Take rows out of the batch (ids not in it are ignored)."""

    def kv_device(self) -> str:
        """Where the batch's KV lives ("cpu", "cuda"); "" when the batch is empty."""


def run_bound(session: ort.InferenceSession, binding: ort.IOBinding,
              run_options: ort.RunOptions | None = None) -> list[ort.OrtValue]:
    """Run a prepared I/O binding and return its outputs in binding order."""
    session.run_with_iobinding(binding, run_options)
    return binding.get_outputs()
