"""`PlainBatch`: the decode batch of a plain-op graph (I/O contract in switchyard.model.config).

Every running sequence lives in one batch whose KV tensors are [batch, kv_heads, T, head_dim]. A
sequence shorter than T is left-padded and its padding masked by `attention_mask`; its rotary
positions come from its own length, so padding never changes its results. A decode step is one
ONNX Runtime call for the whole batch, and its `present.*` outputs become the next step's
`past_key_values.*` inputs as OrtValues (I/O binding), so on CUDA the cache stays on the device.
Joins and leaves (rare next to steps) rebuild the batch tensors on the host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from switchyard.model.graph_io import past_names, present_names

from .decode_batch import run_bound

if TYPE_CHECKING:
    from .engine import Sequence


class PlainBatch:
    """Left-padded rows, KV concatenated by the graph every step."""

    def __init__(self, session: ort.InferenceSession, device: str, n_layers: int, kv_heads: int,
                 head_dim: int) -> None:
        self.session = session
        self.device = device
        self._logits: np.ndarray | None = None
        self._past_names, self._present_names = past_names(n_layers), present_names(n_layers)
        self._kv_heads, self._head_dim = kv_heads, head_dim
        self.ids: list[str] = []
        self._kv: list[ort.OrtValue] = []
        self._mask = np.zeros((0, 0), dtype=np.int64)
        self._host: list[np.ndarray] | None = None  # the batch KV on the host, until it changes

    # ---- model calls ---------------------------------------------------------------------
    def _run(self, feeds: dict[str, np.ndarray], past: list[ort.OrtValue]) -> tuple[np.ndarray, list[ort.OrtValue]]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self._past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device)
        outputs = run_bound(self.session, binding)
        return outputs[0].numpy(), list(outputs[1:])

    def _empty_kv(self, batch: int, length: int) -> list[ort.OrtValue]:
        zeros = np.zeros((batch, self._kv_heads, length, self._head_dim), dtype=np.float32)
        return [ort.OrtValue.ortvalue_from_numpy(zeros, self.device, 0) for _ in self._past_names]

    def prefill_whole(self, seqs: list["Sequence"]) -> tuple[np.ndarray, None]:
        """Left-padded to the longest, padding masked, positions counted per row: the rows come
        out laid out as the decode batch wants them, so they join it as they are."""
        lengths = [len(s.prompt) for s in seqs]
        width = max(lengths)
        ids = np.zeros((len(seqs), width), dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        positions = np.zeros((len(seqs), width), dtype=np.int64)
        for row, (seq, length) in enumerate(zip(seqs, lengths)):
            ids[row, width - length:] = seq.prompt
            mask[row, width - length:] = 1
            positions[row, width - length:] = np.arange(length)
        logits, present = self._run({"input_ids": ids, "attention_mask": mask, "position_ids": positions},
                                    self._empty_kv(len(seqs), 0))
        self._join_rows([s.sequence_id for s in seqs], [p.numpy() for p in present], mask)
        return logits[:, -1, :], None

    def seed(self, seq: "Sequence", kv: list[np.ndarray]) -> None:
        seq.private_kv = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a[None]), self.device, 0) for a in kv]

    def prefill_chunk(self, seq: "Sequence", n: int) -> np.ndarray:
        start = seq.processed
        past = seq.private_kv if seq.private_kv is not None else self._empty_kv(1, 0)
        feeds = {
            "input_ids": np.ascontiguousarray(seq.prompt[start:start + n][None, :]),
            "attention_mask": np.ones((1, start + n), dtype=np.int64),
            "position_ids": np.arange(start, start + n, dtype=np.int64)[None, :],
        }
        logits, seq.private_kv = self._run(feeds, past)
        return logits[0, -1]

    def private_kv(self, seq: "Sequence") -> list[np.ndarray]:
        return [v.numpy()[0] for v in seq.private_kv or []]

    def join(self, seq: "Sequence") -> None:
        own = [v.numpy() for v in seq.private_kv or []]
        seq.private_kv = None
        self._join_rows([seq.sequence_id], own, np.ones((1, own[0].shape[2]), dtype=np.int64))

    def decode(self, seqs: list["Sequence"], logits_on_host: bool = True) -> tuple[np.ndarray, None]:
        ids = np.array([[s.generated[-1]] for s in seqs], dtype=np.int64)
        positions = np.array([[s.cache_length] for s in seqs], dtype=np.int64)
        mask = np.concatenate([self._mask, np.ones((len(seqs), 1), dtype=np.int64)], axis=1)
        logits, present = self._run({"input_ids": ids, "attention_mask": mask, "position_ids": positions}, self._kv)
        self._kv, self._mask, self._host = present, mask, None
        self._logits = logits[:, -1:, :]
        return logits[:, -1, :], None

    def device_logits(self) -> np.ndarray | None:
        return self._logits  # the plain graph's logits always come to the host

    # ---- rows ----------------------------------------------------------------------------
    def row_kv(self, sequence_id: str, n: int) -> list[np.ndarray] | None:
        """A row's last n columns (rows are left-padded; the mask is 1 on them)."""
        row = self.ids.index(sequence_id)
        if int(self._mask[row].sum()) != n:
            return None
        width = self._mask.shape[1]
        return [a[row, :, width - n:, :] for a in self._host_kv()]

    def _host_kv(self) -> list[np.ndarray]:
        if self._host is None:
            self._host = [v.numpy() for v in self._kv]
        return self._host

    def kv_device(self) -> str:
        return self._kv[0].device_name().lower() if self._kv else ""

    def _set(self, ids: list[str], kv: list[np.ndarray], mask: np.ndarray) -> None:
        self.ids = ids
        self._mask = np.ascontiguousarray(mask)
        self._kv = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0) for a in kv]
        self._host = None

    def _join_rows(self, ids: list[str], kv: list[np.ndarray], mask: np.ndarray) -> None:
        """Append rows (KV per past name [rows, kv_heads, T, head_dim] and their mask),
        left-padding whichever side is shorter."""
        if not self.ids:
            self._set(list(ids), kv, mask)
            return
        batch_kv = self._host_kv()
        target = max(batch_kv[0].shape[2], kv[0].shape[2])
        self._set(self.ids + list(ids),
                  [np.concatenate([_left_pad(a, target), _left_pad(b, target)], axis=0) for a, b in zip(batch_kv, kv)],
                  np.concatenate([_left_pad_mask(self._mask, target), _left_pad_mask(mask, target)], axis=0))

    def drop(self, sequence_ids: set[str]) -> None:
        keep = [i for i, sid in enumerate(self.ids) if sid not in sequence_ids]
        if len(keep) == len(self.ids):
            return
        if not keep:
            self.ids, self._kv = [], []
            self._mask = np.zeros((0, 0), dtype=np.int64)
            return
        mask = self._mask[keep]
        # Columns that are padding in every remaining row are dropped (compaction).
        first = int(np.argmax(mask.any(axis=0)))
        self._set([self.ids[i] for i in keep], [a[keep][:, :, first:, :] for a in self._host_kv()], mask[:, first:])


def _left_pad(a: np.ndarray, width: int) -> np.ndarray:
    pad = width - a.shape[2]
    return a if pad == 0 else np.pad(a, ((0, 0), (0, 0), (pad, 0), (0, 0)))


def _left_pad_mask(mask: np.ndarray, width: int) -> np.ndarray:
    pad = width - mask.shape[1]
    return mask if pad == 0 else np.pad(mask, ((0, 0), (pad, 0)))
