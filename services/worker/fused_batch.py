"""`FusedBatch`: the decode batch of a fused graph (GroupQueryAttention, FUSED_CONTRACT in
switchyard.model.config), with its KV in a preallocated pool on the session's device.

The pool holds one buffer per past name, [rows, kv_heads, length, head_dim]. Row r belongs to the
r-th running sequence and is right-padded: its first ``lengths[r]`` positions are its tokens.
Rows 0..B-1 are the batch; a step binds that leading slice of every buffer as both
``past_key_values.*`` and ``present.*`` (I/O binding by address), so GroupQueryAttention appends
each new token's K/V in place — nothing of the KV is copied or reallocated per step, and only
token ids and a few int32 lengths go in. Whole prompts prefill straight into the rows they will
decode in. A sequence leaving is one row copy (the last row moves into its place); a sequence
whose prompt was prefilled in chunks (its own buffer, ``seq.private_kv``) joins with one row
copy. The pool grows by doubling (rows up to max_sequences, length up to the context), which
copies the live rows once per doubling.

Copies run as tiny ONNX Runtime graphs (Identity, Pad, Slice) on the session's own provider
with the same address binding, so the pool works the same on CUDA and on the CPU.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from switchyard.model.graph_io import past_names, present_names

from .decode_batch import run_bound
from .kv_blocks import DeviceBlocks

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .engine import Sequence

_INITIAL_ROWS = 4
_INITIAL_LENGTH = 256
# Captured CUDA graphs a decoder keeps at most: one per (batch bucket, pool state) it met. With
# graphs the pool holds every row from the start and only doubles its length (KvPool settled),
# so a worker going from 256 to 8,192 positions meets 6 pool states × up to 9 buckets (256 rows).
MAX_CUDA_GRAPHS = 64
# Runs of a decode graph id before it is ready to replay (ONNX Runtime's CUDA provider runs a
# graph id normally twice, then captures it).
CAPTURE_RUNS = 3
# Most copies in one KvCopier run (copy_many splits larger sets): prefix blocks stored per step.
COPIES_PER_RUN = 64


class KvCopier:
    """Device-side copies between KV regions given by address and shape."""

    def __init__(self, providers: list[str], device: str, dtype: type = np.float32) -> None:
        self.device, self.dtype, self._providers = device, dtype, providers
        x, y = self._kv("x"), self._kv("y", "u")
        pads = helper.make_tensor_value_info("pads", TensorProto.INT64, [8])
        ends = helper.make_tensor_value_info("ends", TensorProto.INT64, [1])
        self._copy = self._session([helper.make_node("Identity", ["x"], ["y"])], [x], [y])
        self._copy_many: dict[int, ort.InferenceSession] = {}  # by copies per run
        self._pad = self._session([helper.make_node("Pad", ["x", "pads"], ["y"], mode="constant")], [x, pads], [y])
        zero = helper.make_tensor("zero", TensorProto.INT64, [1], [0])
        axis = helper.make_tensor("axis", TensorProto.INT64, [1], [2])
        self._slice = self._session([helper.make_node("Constant", [], ["starts"], value=zero),
                                     helper.make_node("Constant", [], ["axes"], value=axis),
                                     helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])], [x, ends], [y])
        if device == "cuda":  # every batched-copy size now, not inside the first burst's steps
            n = 1
            while n <= COPIES_PER_RUN:
                self._copy_session(n)
                n *= 2

    def _kv(self, name: str, length: str = "t", rows: str = "b") -> onnx.ValueInfoProto:
        """A [rows, h, length, d] KV tensor of this copier's dtype."""
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype)),
                                             [rows, "h", length, "d"])

    def _session(self, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
                 outputs: list[onnx.ValueInfoProto]) -> ort.InferenceSession:
        graph = helper.make_graph(nodes, "kv_copy", inputs, outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return ort.InferenceSession(model.SerializeToString(), providers=self._providers)

    def copy(self, src: int, dst: int, shape: list[int]) -> None:
        """dst[shape] = src[shape] (same layout)."""
        b = self._copy.io_binding()
        b.bind_input("x", self.device, 0, self.dtype, shape, src)
        b.bind_output("y", self.device, 0, self.dtype, shape, dst)
        run_bound(self._copy, b)

    def copy_many(self, pairs: list[tuple[int, int]], shape: list[int]) -> None:
        """dst[shape] = src[shape] for every (src, dst) pair; see copy_regions."""
        self.copy_regions([(src, dst, shape) for src, dst in pairs])

    def copy_regions(self, copies: list[tuple[int, int, list[int]]]) -> None:
        """dst[shape] = src[shape] for every (src, dst, shape), in as few runs as the
        power-of-two split of their number (at most COPIES_PER_RUN each): on CUDA a run costs
        its kernel launches, not its bytes, and a few graph sizes serve every count."""
        while copies:
            n = min(COPIES_PER_RUN, 1 << (len(copies).bit_length() - 1))
            self._copy_run(copies[:n])
            copies = copies[n:]

    def _copy_session(self, n: int) -> ort.InferenceSession:
        """The graph of n copies (created once: a session costs tens of ms to create)."""
        if n not in self._copy_many:  # each input its own leading dim: copies of different rows
            self._copy_many[n] = self._session([helper.make_node("Identity", [f"x{i}"], [f"y{i}"]) for i in range(n)],
                                               [self._kv(f"x{i}", rows=f"b{i}") for i in range(n)],
                                               [self._kv(f"y{i}", rows=f"b{i}") for i in range(n)])
        return self._copy_many[n]

    def _copy_run(self, copies: list[tuple[int, int, list[int]]]) -> None:
        session = self._copy_session(len(copies))
        b = session.io_binding()
        for i, (src, dst, shape) in enumerate(copies):
            b.bind_input(f"x{i}", self.device, 0, self.dtype, shape, src)
            b.bind_output(f"y{i}", self.device, 0, self.dtype, shape, dst)
        run_bound(session, b)

    def widen(self, src: int, shape: list[int], dst: int, length: int) -> None:
        """Copy [b, h, t, d] at src into [b, h, length, d] at dst (positions t.. are zero)."""
        b = self._pad.io_binding()
        b.bind_input("x", self.device, 0, self.dtype, shape, src)
        b.bind_cpu_input("pads", np.array([0, 0, 0, 0, 0, 0, length - shape[2], 0], dtype=np.int64))
        b.bind_output("y", self.device, 0, self.dtype, [shape[0], shape[1], length, shape[3]], dst)
        run_bound(self._pad, b)

    def narrow(self, src: int, shape: list[int], dst: int, length: int) -> None:
        """Copy the first ``length`` positions of [b, h, t, d] at src into [b, h, length, d] at dst."""
        b = self._slice.io_binding()
        b.bind_input("x", self.device, 0, self.dtype, shape, src)
        b.bind_cpu_input("ends", np.array([length], dtype=np.int64))
        b.bind_output("y", self.device, 0, self.dtype, [shape[0], shape[1], length, shape[3]], dst)
        run_bound(self._slice, b)

    def to_host(self, src: int, shape: list[int], n: int) -> np.ndarray:
        """The first n positions of [b, h, t, d] at src, on the host."""
        b = self._slice.io_binding()
        b.bind_input("x", self.device, 0, self.dtype, shape, src)
        b.bind_cpu_input("ends", np.array([n], dtype=np.int64))
        b.bind_output("y", "cpu")
        return run_bound(self._slice, b)[0].numpy()


class KvPool:
    """One [rows, kv_heads, length, head_dim] buffer per past name, grown by doubling and halved
    again when mostly idle (a burst does not hold its peak memory forever).

    ``settled``: all max_rows rows from the start, and never halved — the buffers then move only
    when a longer sequence doubles the length. Captured CUDA graphs name the buffers by address,
    so every move costs a capture per batch bucket; a pool that came and went with each burst
    used up the decoder's bound of graphs and left a long-running worker decoding eagerly."""

    def __init__(self, copier: KvCopier, n_buffers: int, kv_heads: int, head_dim: int, *,
                 max_rows: int, max_length: int, settled: bool = False) -> None:
        self.copier = copier
        self.n_buffers, self.kv_heads, self.head_dim = n_buffers, kv_heads, head_dim
        self.max_rows, self.max_length = max_rows, max_length
        self.settled = settled
        self.rows = max_rows if settled else min(_INITIAL_ROWS, max_rows)
        self.length = min(_INITIAL_LENGTH, max_length)
        self.buffers = self._allocate(self.rows, self.length)

    def _allocate(self, rows: int, length: int) -> list[ort.OrtValue]:
        shape = [rows, self.kv_heads, length, self.head_dim]
        return [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.copier.dtype, self.copier.device, 0)
                for _ in range(self.n_buffers)]

    @property
    def nbytes(self) -> int:
        return self.n_buffers * self.rows * self.kv_heads * self.length * self.head_dim * self.itemsize

    @property
    def itemsize(self) -> int:
        return np.dtype(self.copier.dtype).itemsize

    def row_shape(self, rows: int = 1) -> list[int]:
        return [rows, self.kv_heads, self.length, self.head_dim]

    def address(self, buffer: int, row: int) -> int:
        return self.buffers[buffer].data_ptr() + row * self.kv_heads * self.length * self.head_dim * self.itemsize

    def ensure(self, rows: int, length: int, live_rows: int) -> None:
        """Room for ``rows`` rows of ``length`` positions; the first ``live_rows`` rows keep their KV."""
        if rows > self.max_rows or length > self.max_length:
            raise ValueError(f"KV pool cannot hold {rows} rows × {length} positions "
                             f"(max {self.max_rows} × {self.max_length})")
        if rows <= self.rows and length <= self.length:
            return
        new_rows, new_length = self.rows, self.length
        while new_rows < rows:
            new_rows = min(new_rows * 2, self.max_rows)
        while new_length < length:
            new_length = min(new_length * 2, self.max_length)
        self._reallocate(new_rows, new_length, live_rows)

    def fit(self, live_rows: int, length: int) -> None:
        """Halve rows or length while the half still leaves four times what is used
        (``live_rows`` rows holding at most ``length`` positions). The wide band (shrink below
        1/8 use, grow when full) keeps a batch that comes and goes from copying back and forth.
        A settled pool keeps its size."""
        if self.settled:
            return
        new_rows, new_length = self.rows, self.length
        while new_rows // 2 >= max(min(_INITIAL_ROWS, self.max_rows), 4 * live_rows):
            new_rows //= 2
        while new_length // 2 >= max(min(_INITIAL_LENGTH, self.max_length), 4 * length):
            new_length //= 2
        if (new_rows, new_length) != (self.rows, self.length):
            self._reallocate(new_rows, new_length, live_rows)

    def _reallocate(self, rows: int, length: int, live_rows: int) -> None:
        fresh = self._allocate(rows, length)
        if live_rows:
            for old, new in zip(self.buffers, fresh):
                copy = self.copier.widen if length >= self.length else self.copier.narrow
                copy(old.data_ptr(), self.row_shape(live_rows), new.data_ptr(), length)
        self.buffers, self.rows, self.length = fresh, rows, length


class FusedBatch:
    """Right-padded rows in a KV pool; GroupQueryAttention appends in place."""

    def __init__(self, session: ort.InferenceSession, providers: list[str], device: str, n_layers: int,
                 kv_heads: int, head_dim: int, *, max_rows: int, max_length: int, cuda_graph: bool = False,
                 block_size: int = 0) -> None:
        """``block_size`` > 0: prefix-cache blocks are cut and placed on the device (`blocks`)."""
        self.session = session
        self.device = device
        self._past_names, self._present_names = past_names(n_layers), present_names(n_layers)
        self._kv_heads, self._head_dim = kv_heads, head_dim
        kv_type = next(i.type for i in session.get_inputs() if i.name == self._past_names[0])
        self.dtype = np.float16 if kv_type == "tensor(float16)" else np.float32
        self.copier = KvCopier(providers, device, self.dtype)
        self.blocks = (DeviceBlocks(self.copier, providers, len(self._past_names), kv_heads, head_dim, block_size)
                       if block_size > 0 else None)
        self.pool = KvPool(self.copier, len(self._past_names), kv_heads, head_dim,
                           max_rows=max_rows, max_length=max_length, settled=cuda_graph)
        self.ids: list[str] = []
        self.lengths: list[int] = []  # KV positions held per row
        self._decode_binding: tuple[tuple, ort.IOBinding] | None = None  # (shape key, binding)
        self._logits: ort.OrtValue | None = None  # the last step's, where the model left them
        # A session created with enable_cuda_graph replays captured graphs for decode; every
        # other run must say it is not one of them (gpu_graph_id -1).
        self.graphs = CudaGraphDecoder(self) if cuda_graph else None
        self._eager = ort.RunOptions()
        if cuda_graph:
            self._eager.add_run_config_entry("gpu_graph_id", "-1")

    # ---- model calls ---------------------------------------------------------------------
    def _bind_rows(self, binding: ort.IOBinding, first: int, rows: int) -> None:
        shape = self.pool.row_shape(rows)
        for k, (past, present) in enumerate(zip(self._past_names, self._present_names)):
            address = self.pool.address(k, first)
            binding.bind_input(past, self.device, 0, self.dtype, shape, address)
            binding.bind_output(present, self.device, 0, self.dtype, shape, address)

    def _new_binding(self, bind_kv: Callable[[ort.IOBinding], None], logits_on_host: bool = True) -> ort.IOBinding:
        binding = self.session.io_binding()
        # Outputs bound first: get_outputs() follows binding order. Logits not wanted on the host
        # stay on the device (on CUDA: no [batch, vocab] copy per step, only the token ids).
        binding.bind_output("logits", "cpu" if logits_on_host else self.device)
        binding.bind_output("next_token", "cpu")
        bind_kv(binding)
        return binding

    def _run(self, binding: ort.IOBinding, ids: np.ndarray, last: np.ndarray, seqlens: np.ndarray,
             total: int, logits_on_host: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        # the graph takes an index into the flattened [rows * seq] tokens
        flat = np.arange(len(last), dtype=np.int64) * ids.shape[1] + np.asarray(last, dtype=np.int64)
        binding.bind_cpu_input("last_token_index", flat)
        binding.bind_cpu_input("seqlens_k", np.ascontiguousarray(seqlens, dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        outputs = run_bound(self.session, binding, self._eager)
        self._logits = outputs[0]
        return (outputs[0].numpy()[:, 0, :] if logits_on_host else None), outputs[1].numpy()

    def device_logits(self) -> ort.OrtValue | None:
        return self._logits

    def prefill_whole(self, seqs: list["Sequence"]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded to the longest, straight into rows B..B+n-1 of the pool."""
        lengths = [len(s.prompt) for s in seqs]
        width, first, n = max(lengths), len(self.ids), len(seqs)
        self.pool.ensure(first + n, width, first)
        ids = np.zeros((n, width), dtype=np.int64)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq.prompt)] = seq.prompt
        last = np.array(lengths, dtype=np.int64) - 1
        binding = self._new_binding(lambda b: self._bind_rows(b, first, n))
        logits, best = self._run(binding, ids, last, last.astype(np.int32), width)
        self.ids += [s.sequence_id for s in seqs]
        self.lengths += lengths
        return logits, best

    def _private(self, seq: "Sequence") -> ort.OrtValue:
        """A chunked prompt's own buffer [1, kv_heads, len(prompt), head_dim] per past name."""
        if seq.private_kv is None:
            shape = [1, self._kv_heads, len(seq.prompt), self._head_dim]
            seq.private_kv = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0)
                              for _ in self._past_names]
        return seq.private_kv

    def seed(self, seq: "Sequence", kv: list[np.ndarray]) -> None:
        host = np.zeros((1, self._kv_heads, len(seq.prompt), self._head_dim), dtype=self.dtype)
        values = []
        for a in kv:
            host[0, :, :a.shape[1], :] = a
            values.append(ort.OrtValue.ortvalue_from_numpy(host.copy(), self.device, 0))
        seq.private_kv = values

    def seed_blocks(self, seq: "Sequence", blocks: list[ort.OrtValue]) -> None:
        """Start ``seq``'s own buffer from cached device blocks (a prefix of its prompt)."""
        assert self.blocks is not None
        values = []
        for prefix in self.blocks.assemble(blocks):
            own = ort.OrtValue.ortvalue_from_shape_and_type([1, self._kv_heads, len(seq.prompt), self._head_dim],
                                                            self.dtype, self.device, 0)
            self.copier.widen(prefix.data_ptr(), prefix.shape(), own.data_ptr(), len(seq.prompt))
            values.append(own)
        seq.private_kv = values

    def row_holding(self, sequence_id: str, n: int) -> int | None:
        """The pool row of a sequence in the batch, None unless it holds exactly n KV positions."""
        row = self.ids.index(sequence_id)
        return row if self.lengths[row] == n else None

    def pool_sources(self) -> list[tuple[int, list[int]]]:
        """Where the batch's rows are (address of row 0, [rows, h, length, d]) per past name."""
        shape = self.pool.row_shape(len(self.ids))
        return [(self.pool.address(k, 0), shape) for k in range(len(self._past_names))]

    def private_sources(self, seq: "Sequence") -> list[tuple[int, list[int]]]:
        """Where a prefilling sequence's own KV is (address, shape per past name)."""
        return [(v.data_ptr(), v.shape()) for v in seq.private_kv or []]

    def prefill_chunk(self, seq: "Sequence", n: int) -> np.ndarray:
        start = seq.processed
        own = self._private(seq)

        def bind(binding: ort.IOBinding) -> None:
            for past, present, value in zip(self._past_names, self._present_names, own):
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)

        logits, _ = self._run(self._new_binding(bind), seq.prompt[start:start + n][None, :], np.array([n - 1]),
                              np.array([start + n - 1]), start + n)
        assert logits is not None
        return logits[0]

    def private_kv(self, seq: "Sequence") -> list[np.ndarray]:
        return [v.numpy()[0, :, :seq.processed, :] for v in seq.private_kv or []]

    def join(self, seq: "Sequence") -> None:
        own = self._private(seq)
        row = len(self.ids)
        self.pool.ensure(row + 1, len(seq.prompt), row)
        for k, value in enumerate(own):
            self.copier.widen(value.data_ptr(), value.shape(), self.pool.address(k, row), self.pool.length)
        seq.private_kv = None
        self.ids.append(seq.sequence_id)
        self.lengths.append(seq.processed)

    def decode(self, seqs: list["Sequence"], logits_on_host: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """One step of rows 0..B-1. The binding of the KV (120 addresses for 30 layers) is kept
        from step to step while the batch and the pool keep their shape; only the ids and
        lengths are bound anew."""
        if self.graphs is not None and self.graphs.enabled:
            out = self.graphs.decode(seqs, logits_on_host)
            if out is not None:
                self.lengths = [n + 1 for n in self.lengths]
                return out
        rows = len(seqs)
        seqlens = np.array(self.lengths, dtype=np.int32)
        total = int(seqlens.max()) + 1
        self.pool.ensure(rows, total, rows)
        key = (rows, self.pool.length, self.pool.buffers[0].data_ptr(), logits_on_host)
        if self._decode_binding is None or self._decode_binding[0] != key:
            self._decode_binding = (key, self._new_binding(lambda b: self._bind_rows(b, 0, rows), logits_on_host))
        ids = np.array([[s.generated[-1]] for s in seqs], dtype=np.int64)
        out = self._run(self._decode_binding[1], ids, np.zeros(rows, dtype=np.int64), seqlens, total, logits_on_host)
        self.lengths = [n + 1 for n in self.lengths]
        return out

    # ---- rows ----------------------------------------------------------------------------
    def row_kv(self, sequence_id: str, n: int) -> list[np.ndarray] | None:
        row = self.ids.index(sequence_id)
        if self.lengths[row] != n:
            return None
        return [self.copier.to_host(self.pool.address(k, row), self.pool.row_shape(), n)[0]
                for k in range(len(self._past_names))]

    def drop(self, sequence_ids: set[str]) -> None:
        """Compact the batch: the rows staying past the new end move, in order, into the
        leavers' places. Consecutive rows moving into consecutive places are one copy per
        buffer, all in one run: a step's leavers are usually prompts that joined together
        (side by side), so a step costs one run of a copy per buffer, however many leave."""
        leaving = {r for r, sid in enumerate(self.ids) if sid in sequence_ids}
        if not leaving:
            return
        keep = len(self.ids) - len(leaving)
        holes = sorted(r for r in leaving if r < keep)
        movers = [r for r in range(keep, len(self.ids)) if r not in leaving]
        copies = []
        for hole, mover, rows in row_moves(holes, movers):
            shape = self.pool.row_shape(rows)
            copies += [(self.pool.address(k, mover), self.pool.address(k, hole), shape)
                       for k in range(len(self._past_names))]
        self.copier.copy_regions(copies)
        for hole, mover in zip(holes, movers, strict=True):
            self.ids[hole], self.lengths[hole] = self.ids[mover], self.lengths[mover]
        del self.ids[keep:], self.lengths[keep:]
        self.pool.fit(len(self.ids), max(self.lengths, default=0) + 1)

    def kv_device(self) -> str:
        return self.pool.buffers[0].device_name().lower() if self.ids else ""


def row_moves(holes: list[int], movers: list[int]) -> list[tuple[int, int, int]]:
    """The i-th mover goes to the i-th hole, as (first hole, first mover, rows) runs where both
    are consecutive."""
    runs: list[tuple[int, int, int]] = []
    for hole, mover in zip(holes, movers, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == hole and runs[-1][1] + runs[-1][2] == mover:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((hole, mover, 1))
    return runs


def decode_bucket(rows: int, max_rows: int) -> int:
    """The captured batch size that serves ``rows`` rows: the next power of two, at most max_rows."""
    if not 1 <= rows <= max_rows:
        raise ValueError(f"rows must be in [1, {max_rows}], got {rows}")
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return min(bucket, max_rows)


class CudaGraphDecoder:
    """Decode steps replayed from CUDA graphs captured by ONNX Runtime (session provider option
    ``enable_cuda_graph``), one graph per (batch bucket, pool length, pool address).

    A captured graph replays with the same device addresses, so every input and output lives in
    a fixed device buffer per bucket: ids, lengths and the flat logits index are copied in
    (``update_inplace``), the KV is the pool's leading ``bucket`` rows by address, and
    ``total_sequence_length`` is the pool's length (GroupQueryAttention then reads each row's
    own length from ``seqlens_k``; the same results as the exact total, checked on the CPU).
    At most ``max_graphs`` are captured; steps of a shape met after that run eagerly. Rows past
    the live ones decode a dummy token into free pool rows. Per step only the ids and
    lengths go to the device and the argmax ids come back. A capture or replay that fails turns
    the decoder off (logged) and the step runs eagerly instead, so a worker never stops on it.

    Measured on an H200 (docs/benchmarks.md, "GPU on the H200"): tokens equal to eager decode,
    1.44 ms per step at batch 1 and 2.64 ms at 256 (int4), against 5.4 and 6.6 ms eager.
    """

    def __init__(self, batch: FusedBatch, max_graphs: int = MAX_CUDA_GRAPHS) -> None:
        self.batch = batch
        self.enabled = True
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, tuple[ort.RunOptions, dict[str, ort.OrtValue], ort.IOBinding]] = {}
        # Input and output buffers per bucket, shared by that bucket's graphs of every pool state
        # (one graph replays at a time): a new pool state costs a capture, not new buffers.
        self._buffers: dict[int, dict[str, ort.OrtValue]] = {}
        self.eager_steps = 0  # steps decoded eagerly because max_graphs were captured already
        vocab = next(o.shape[-1] for o in batch.session.get_outputs() if o.name == "logits")
        self._vocab = int(vocab)

    def _values(self, bucket: int) -> dict[str, ort.OrtValue]:
        device = self.batch.device
        if bucket not in self._buffers:
            self._buffers[bucket] = {
                "input_ids": ort.OrtValue.ortvalue_from_numpy(np.zeros((bucket, 1), np.int64), device, 0),
                "last_token_index": ort.OrtValue.ortvalue_from_numpy(np.arange(bucket, dtype=np.int64), device, 0),
                "seqlens_k": ort.OrtValue.ortvalue_from_numpy(np.zeros(bucket, np.int32), device, 0),
                "logits": ort.OrtValue.ortvalue_from_shape_and_type([bucket, 1, self._vocab], np.float32, device, 0),
                "next_token": ort.OrtValue.ortvalue_from_shape_and_type([bucket], np.int64, device, 0),
            }
        return self._buffers[bucket]

    def _graph(self, bucket: int) -> tuple[ort.RunOptions, dict[str, ort.OrtValue], ort.IOBinding] | None:
        """The graph for this bucket and the pool as it is now; None when it is not captured
        and max_graphs are (ONNX Runtime keeps every captured graph for the session's life, so
        their number is what bounds the device memory they hold)."""
        pool = self.batch.pool
        key = (bucket, pool.length, pool.buffers[0].data_ptr())
        if key not in self._graphs:
            if len(self._graphs) >= self.max_graphs:
                if self.eager_steps == 0:
                    log.warning("%d CUDA graphs captured: new batch or pool shapes decode eagerly from now on",
                                len(self._graphs))
                return None
            values = self._values(bucket)
            binding = self.batch.session.io_binding()
            binding.bind_ortvalue_output("logits", values["logits"])
            binding.bind_ortvalue_output("next_token", values["next_token"])
            for name in ("input_ids", "last_token_index", "seqlens_k"):
                binding.bind_ortvalue_input(name, values[name])
            binding.bind_cpu_input("total_sequence_length", np.array(pool.length, dtype=np.int32))
            self.batch._bind_rows(binding, 0, bucket)
            options = ort.RunOptions()  # names the captured graph this binding replays
            options.add_run_config_entry("gpu_graph_id", str(len(self._graphs) + 1))
            self._graphs[key] = (options, values, binding)
        return self._graphs[key]

    def capture_all(self) -> list[int]:
        """Capture every batch bucket's graph for the pool as it is, before serving: the first
        steps at a new batch size then replay instead of capturing (tens of ms each, on the
        critical path of whoever decodes then). Dummy tokens decode into the free rows, warmed
        CAPTURE_RUNS times (ONNX Runtime runs a graph id normally before capturing it). Returns
        the buckets captured; a failure turns the decoder off, as in decode()."""
        pool, done = self.batch.pool, []
        bucket = 1
        try:
            while True:
                graph = self._graph(bucket)
                if graph is None:
                    break
                options, values, binding = graph
                values["input_ids"].update_inplace(np.zeros((bucket, 1), np.int64))
                values["seqlens_k"].update_inplace(np.zeros(bucket, np.int32))
                for _ in range(CAPTURE_RUNS):
                    self.batch.session.run_with_iobinding(binding, options)
                done.append(bucket)
                if bucket >= pool.max_rows:
                    break
                bucket = min(2 * bucket, pool.max_rows)
        except Exception:  # noqa: BLE001 — as in decode: serve eagerly rather than not at all
            log.exception("CUDA graph capture failed; decoding without CUDA graphs")
            self.enabled = False
        return done

    def decode(self, seqs: list["Sequence"], logits_on_host: bool) -> tuple[np.ndarray | None, np.ndarray] | None:
        """One step, or None when the decoder is off or has no graph for this shape and may
        capture no more (the caller then runs it eagerly)."""
        rows, pool = len(seqs), self.batch.pool
        try:
            bucket = decode_bucket(rows, pool.max_rows)
            pool.ensure(bucket, max(self.batch.lengths) + 1, rows)
            graph = self._graph(bucket)
            if graph is None:
                self.eager_steps += 1
                return None
            options, values, binding = graph
            ids = np.zeros((bucket, 1), np.int64)
            ids[:rows, 0] = [s.generated[-1] for s in seqs]
            seqlens = np.zeros(bucket, np.int32)
            seqlens[:rows] = self.batch.lengths
            values["input_ids"].update_inplace(ids)
            values["seqlens_k"].update_inplace(seqlens)
            self.batch.session.run_with_iobinding(binding, options)
            best = values["next_token"].numpy()[:rows]
            self.batch._logits = values["logits"]  # [bucket, 1, vocab]: rows past `rows` are dummies
            logits = values["logits"].numpy()[:rows, 0, :] if logits_on_host else None
            return logits, best
        except Exception:  # noqa: BLE001 — any failure: decode eagerly from now on
            log.exception("CUDA graph decode failed; decoding without CUDA graphs from now on")
            self.enabled = False
            return None
