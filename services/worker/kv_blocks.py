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
        """kv_i [R, h, t, d] (R rows side by side; t may differ per buffer), start and end [1]
        (positions, whole blocks) → blocks [R, k, n_buffers, h, bs, d]: every block of the range,
        of every row, in one run — a run's cost on CUDA is its kernel launches, not its bytes."""
        m, h, bs, d = self.n_buffers, self.kv_heads, self.block_size, self.head_dim
        nodes = [helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("axis", TensorProto.INT64, [1], [2])),
                 helper.make_node("Constant", [], ["shape"], value=helper.make_tensor(
                     "shape", TensorProto.INT64, [6], [0, m, h, -1, bs, d]))]
        inputs = [helper.make_tensor_value_info("start", TensorProto.INT64, [1]),
                  helper.make_tensor_value_info("end", TensorProto.INT64, [1])]
        for i in range(m):
            inputs.append(helper.make_tensor_value_info(f"kv_{i}", self._elem, ["rows", h, f"t{i}", d]))
            nodes.append(helper.make_node("Slice", [f"kv_{i}", "start", "end", "axis"], [f"cut_{i}"]))
        nodes += [helper.make_node("Concat", [f"cut_{i}" for i in range(m)], ["by_buffer"], axis=1),  # [R, m·h, k·bs, d]
                  helper.make_node("Reshape", ["by_buffer", "shape"], ["split"]),  # [R, m, h, k, bs, d]
                  helper.make_node("Transpose", ["split"], ["blocks"], perm=[0, 3, 1, 2, 4, 5])]
        blocks = helper.make_tensor_value_info("blocks", self._elem, ["rows", "k", m, h, bs, d])
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

    def cut(self, sources: list[tuple[int, list[int]]], indices: list[int]) -> list[ort.OrtValue]:
        """Blocks ``indices`` (block i: positions i·bs ..) of one row's buffers at (address,
        [1, h, t, d]), each a new OrtValue [n_buffers, h, bs, d] on the device: the range they
        span cut in one run, then each block copied out of it (one copy each)."""
        if not indices:
            return []
        first = min(indices)
        span = self.cut_span(sources, first, max(indices) + 1 - first)
        if len(indices) == 1:
            return [span]  # [1, 1, n_buffers, h, bs, d]: the block's bytes, nothing to copy out
        return self.copy_out(span, 0, [i - first for i in indices])

    def cut_span(self, sources: list[tuple[int, list[int]]], first: int, count: int) -> ort.OrtValue:
        """Blocks first .. first+count-1 of R contiguous rows, whose buffers are at (address,
        [R, h, t, d]): one run, one OrtValue [R, count, n_buffers, h, bs, d]."""
        binding = self._cut.io_binding()
        binding.bind_cpu_input("start", np.array([first * self.block_size], dtype=np.int64))
        binding.bind_cpu_input("end", np.array([(first + count) * self.block_size], dtype=np.int64))
        for i, (address, shape) in enumerate(sources):
            binding.bind_input(f"kv_{i}", self.device, 0, self.dtype, shape, address)
        binding.bind_output("blocks", self.device)
        self._cut.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def copy_out(self, span: ort.OrtValue, row: int, positions: list[int]) -> list[ort.OrtValue]:
        """Blocks of `span` (from cut_span) for one row, at positions within the span, each
        copied into an OrtValue [n_buffers, h, bs, d] of its own (one copy each)."""
        count = span.shape()[1]
        shape = [self.n_buffers, self.kv_heads, self.block_size, self.head_dim]
        out = []
        for j in positions:
            block = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0)
            self.copier.copy(span.data_ptr() + (row * count + j) * self.block_bytes, block.data_ptr(), shape)
            out.append(block)
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
