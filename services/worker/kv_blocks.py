"""Prefix-cache blocks cut from and placed into the KV pool on its own device (issue 13 §3).

A block is one tensor [2·layers, kv_heads, block_size, head_dim] (every past name's K or V for
block_size positions, in past-name order: the layout `PrefixCache` keeps on the host too). With
`DeviceBlocks` the blocks are OrtValues on the session's device: storing a prefix cuts its blocks
straight out of a pool row or a prompt's own buffer, and a hit assembles them into the new
sequence's buffer there — on CUDA no KV goes through the host either way. Both run as small
ONNX Runtime graphs on the session's provider, inputs bound by address like `KvCopier`'s.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

OPSET = 17


class DeviceBlocks:
    """Cuts blocks out of per-past-name KV buffers and assembles blocks back into them."""

    def __init__(self, providers: list[str], device: str, dtype: type, n_buffers: int, kv_heads: int,
                 head_dim: int, block_size: int) -> None:
        self.providers, self.device, self.dtype = providers, device, dtype
        self.n_buffers, self.kv_heads, self.head_dim, self.block_size = n_buffers, kv_heads, head_dim, block_size
        self._elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self._cut = self._session(self._cut_graph())
        self._assemble: dict[int, ort.InferenceSession] = {}  # by block count

    @property
    def block_bytes(self) -> int:
        return self.n_buffers * self.kv_heads * self.block_size * self.head_dim * np.dtype(self.dtype).itemsize

    def _session(self, graph: onnx.GraphProto) -> ort.InferenceSession:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        return ort.InferenceSession(model.SerializeToString(), providers=self.providers)

    def _cut_graph(self) -> onnx.GraphProto:
        """kv_i [1, h, t, d] (t may differ per buffer) and start [1] → block [n_buffers, h, bs, d]."""
        nodes = [helper.make_node("Constant", [], ["size"], value=helper.make_tensor(
                     "size", TensorProto.INT64, [1], [self.block_size])),
                 helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("axis", TensorProto.INT64, [1], [2])),
                 helper.make_node("Add", ["start", "size"], ["end"])]
        inputs = [helper.make_tensor_value_info("start", TensorProto.INT64, [1])]
        for i in range(self.n_buffers):
            inputs.append(helper.make_tensor_value_info(f"kv_{i}", self._elem, [1, self.kv_heads, f"t{i}", self.head_dim]))
            nodes.append(helper.make_node("Slice", [f"kv_{i}", "start", "end", "axis"], [f"cut_{i}"]))
        nodes.append(helper.make_node("Concat", [f"cut_{i}" for i in range(self.n_buffers)], ["block"], axis=0))
        block = helper.make_tensor_value_info("block", self._elem, [self.n_buffers, self.kv_heads, self.block_size,
                                                                    self.head_dim])
        return helper.make_graph(nodes, "kv_block_cut", inputs, [block])

    def _assemble_graph(self, n: int) -> onnx.GraphProto:
        """block_j [n_buffers, h, bs, d] for j < n → out_i [1, h, n·bs, d] per buffer."""
        shape = [self.n_buffers, self.kv_heads, self.block_size, self.head_dim]
        inputs = [helper.make_tensor_value_info(f"block_{j}", self._elem, shape) for j in range(n)]
        outputs = [helper.make_tensor_value_info(f"out_{i}", self._elem, [1, self.kv_heads, n * self.block_size,
                                                                          self.head_dim]) for i in range(self.n_buffers)]
        nodes = [helper.make_node("Concat", [f"block_{j}" for j in range(n)], ["prefix"], axis=2),
                 helper.make_node("Split", ["prefix"], [f"out_{i}" for i in range(self.n_buffers)], axis=0)]
        return helper.make_graph(nodes, f"kv_block_assemble_{n}", inputs, outputs)

    def cut(self, sources: list[tuple[int, list[int]]], index: int) -> ort.OrtValue:
        """Block `index` (positions index·bs ..) of the buffers at (address, [1, h, t, d]), a new
        OrtValue on the device."""
        binding = self._cut.io_binding()
        binding.bind_cpu_input("start", np.array([index * self.block_size], dtype=np.int64))
        for i, (address, shape) in enumerate(sources):
            binding.bind_input(f"kv_{i}", self.device, 0, self.dtype, shape, address)
        binding.bind_output("block", self.device)
        self._cut.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def assemble(self, blocks: list[ort.OrtValue]) -> list[ort.OrtValue]:
        """The prefix the blocks make, one OrtValue [1, h, n·bs, d] per buffer, on the device."""
        n = len(blocks)
        if n not in self._assemble:
            self._assemble[n] = self._session(self._assemble_graph(n))
        session = self._assemble[n]
        binding = session.io_binding()
        for j, block in enumerate(blocks):
            binding.bind_ortvalue_input(f"block_{j}", block)
        for i in range(self.n_buffers):
            binding.bind_output(f"out_{i}", self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()
