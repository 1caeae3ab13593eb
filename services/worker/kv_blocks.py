"""Prefix-cache blocks cut from and placed into the KV pool on its own device (issue 13 §3).

A block is one tensor [2·layers, kv_heads, block_size, head_dim] (every past name's K or V for
block_size positions, in past-name order: the layout `PrefixCache` keeps on the host too). With
`DeviceBlocks` the blocks are OrtValues on the session's device: storing a prefix cuts its blocks
straight out of a pool row or a prompt's own buffer, and a hit assembles them into the new
sequence's buffer there — on CUDA no KV goes through the host either way. Both run as small
ONNX Runtime graphs on the session's provider, inputs bound by address like `KvCopier`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

if TYPE_CHECKING:
    from .fused_batch import KvCopier

OPSET = 17


class DeviceBlocks:
    """Cuts blocks out of per-past-name KV buffers and assembles blocks back into them."""

    def __init__(self, copier: "KvCopier", providers: list[str], n_buffers: int, kv_heads: int,
                 head_dim: int, block_size: int) -> None:
        self.copier, self.providers, self.device, self.dtype = copier, providers, copier.device, copier.dtype
        self.n_buffers, self.kv_heads, self.head_dim, self.block_size = n_buffers, kv_heads, head_dim, block_size
        self._elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        self._cut = self._session(self._cut_graph())
        self._assemble = self._session(self._assemble_graph())

    @property
    def block_bytes(self) -> int:
        return self.n_buffers * self.kv_heads * self.block_size * self.head_dim * np.dtype(self.dtype).itemsize

    def _session(self, graph: onnx.GraphProto) -> ort.InferenceSession:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        return ort.InferenceSession(model.SerializeToString(), providers=self.providers)

    def _cut_graph(self) -> onnx.GraphProto:
        """kv_i [R, h, t, d] (R rows side by side; t may differ per buffer) and index [n, h, bs, 3]
        ((row, head, position) of every element of n blocks) → blocks [n, n_buffers, h, bs, d]:
        any blocks of any rows in one run — a run's cost on CUDA is its launches, not its bytes —
        reading only the blocks' own positions."""
        m, h, bs, d = self.n_buffers, self.kv_heads, self.block_size, self.head_dim
        nodes = [helper.make_node("Constant", [], ["shape"], value=helper.make_tensor(
            "shape", TensorProto.INT64, [5], [0, m, h, bs, d]))]
        inputs = [helper.make_tensor_value_info("index", TensorProto.INT64, ["n", h, bs, 3])]
        for i in range(m):
            inputs.append(helper.make_tensor_value_info(f"kv_{i}", self._elem, ["rows", h, f"t{i}", d]))
            nodes.append(helper.make_node("GatherND", [f"kv_{i}", "index"], [f"cut_{i}"]))  # [n, h, bs, d]
        nodes += [helper.make_node("Concat", [f"cut_{i}" for i in range(m)], ["by_buffer"], axis=1),  # [n, m·h, bs, d]
                  helper.make_node("Reshape", ["by_buffer", "shape"], ["blocks"])]
        blocks = helper.make_tensor_value_info("blocks", self._elem, ["n", m, h, bs, d])
        return helper.make_graph(nodes, "kv_block_cut", inputs, [blocks])

    def _assemble_graph(self) -> onnx.GraphProto:
        """blocks [n, n_buffers, h, bs, d] (n blocks side by side) → out_i [1, h, n·bs, d] per buffer."""
        m, h, bs, d = self.n_buffers, self.kv_heads, self.block_size, self.head_dim
        inputs = [helper.make_tensor_value_info("blocks", self._elem, ["n", m, h, bs, d])]
        outputs = [helper.make_tensor_value_info(f"out_{i}", self._elem, [1, h, "t", d]) for i in range(m)]
        nodes = [helper.make_node("Transpose", ["blocks"], ["by_buffer"], perm=[1, 2, 0, 3, 4]),  # [m, h, n, bs, d]
                 helper.make_node("Constant", [], ["shape"], value=helper.make_tensor(
                     "shape", TensorProto.INT64, [4], [m, h, -1, d])),
                 helper.make_node("Reshape", ["by_buffer", "shape"], ["prefix"]),
                 helper.make_node("Split", ["prefix"], [f"out_{i}" for i in range(m)], axis=0)]
        return helper.make_graph(nodes, "kv_block_assemble", inputs, outputs)

    def cut(self, sources: list[tuple[int, list[int]]], picks: list[tuple[int, int]]) -> list[ort.OrtValue]:
        """Blocks (row, block index) of the rows whose buffers are at (address, [R, h, t, d]) per
        past name — block i holds positions i·bs .. (i+1)·bs — each a new OrtValue [n_buffers,
        h, bs, d] on the device: all cut in one run, then copied apart in a few (KvCopier.copy_many)."""
        if not picks:
            return []
        bs = self.block_size
        rows = np.array([row for row, _ in picks], dtype=np.int64)[:, None, None]
        starts = np.array([block * bs for _, block in picks], dtype=np.int64)[:, None, None]
        index = np.empty((len(picks), self.kv_heads, bs, 3), dtype=np.int64)
        index[..., 0] = rows
        index[..., 1] = np.arange(self.kv_heads, dtype=np.int64)[None, :, None]
        index[..., 2] = starts + np.arange(bs, dtype=np.int64)[None, None, :]
        binding = self._cut.io_binding()
        binding.bind_cpu_input("index", index)
        for i, (address, shape) in enumerate(sources):
            binding.bind_input(f"kv_{i}", self.device, 0, self.dtype, shape, address)
        binding.bind_output("blocks", self.device)
        self._cut.run_with_iobinding(binding)
        span = binding.get_outputs()[0]
        if len(picks) == 1:
            return [span]  # [1, n_buffers, h, bs, d]: the block's bytes, nothing to copy apart
        shape = [self.n_buffers, self.kv_heads, bs, self.head_dim]
        out = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0) for _ in picks]
        self.copier.copy_many([(span.data_ptr() + j * self.block_bytes, block.data_ptr())
                               for j, block in enumerate(out)], shape)
        return out

    def assemble(self, blocks: list[ort.OrtValue]) -> list[ort.OrtValue]:
        """The prefix the blocks make, one OrtValue [1, h, n·bs, d] per buffer, on the device:
        the blocks copied side by side (one contiguous copy each), then one transpose."""
        shape = [self.n_buffers, self.kv_heads, self.block_size, self.head_dim]
        staged = ort.OrtValue.ortvalue_from_shape_and_type([len(blocks), *shape], self.dtype, self.device, 0)
        for j, block in enumerate(blocks):
            self.copier.copy(block.data_ptr(), staged.data_ptr() + j * self.block_bytes, shape)
        binding = self._assemble.io_binding()
        binding.bind_ortvalue_input("blocks", staged)
        for i in range(self.n_buffers):
            binding.bind_output(f"out_{i}", self.device)
        self._assemble.run_with_iobinding(binding)
        return binding.get_outputs()
