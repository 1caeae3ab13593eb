"""Prefix-cache blocks cut from KV buffers on the device (DeviceBlocks, issue 13 §3): a range of
blocks cut in one run and copied out block by block holds exactly the positions each block
names, in the cache's layout, and assembling blocks gives back the prefix they came from."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from services.worker.fused_batch import KvCopier
from services.worker.kv_blocks import DeviceBlocks

BUFFERS, HEADS, BS, DIM = 4, 2, 16, 8


@pytest.fixture
def blocks() -> DeviceBlocks:
    copier = KvCopier(["CPUExecutionProvider"], "cpu", np.float32)
    return DeviceBlocks(copier, ["CPUExecutionProvider"], BUFFERS, HEADS, DIM, BS)


def kv_buffers(length: int, seed: int = 0) -> tuple[list[np.ndarray], list[ort.OrtValue]]:
    """Per past name [1, heads, length, dim] with distinct values, and their OrtValues."""
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((1, HEADS, length, DIM)).astype(np.float32) for _ in range(BUFFERS)]
    return arrays, [ort.OrtValue.ortvalue_from_numpy(a, "cpu", 0) for a in arrays]


def expected_block(arrays: list[np.ndarray], i: int) -> np.ndarray:
    """The cache's layout: [buffers, heads, block_size, dim] of positions i·bs .. (i+1)·bs."""
    return np.stack([a[0, :, i * BS:(i + 1) * BS, :] for a in arrays])


@pytest.mark.unit
@pytest.mark.parametrize("indices", [[0], [3], [0, 1, 2], [2, 3, 5], [1, 4]])
def test_cut_blocks_hold_the_positions_they_name(blocks: DeviceBlocks, indices: list[int]) -> None:
    arrays, values = kv_buffers(length=7 * BS + 5)  # a row longer than the blocks cut from it
    sources = [(v.data_ptr(), v.shape()) for v in values]
    out = blocks.cut(sources, indices)
    assert len(out) == len(indices)
    for i, block in zip(indices, out):
        got = block.numpy().reshape(BUFFERS, HEADS, BS, DIM)
        np.testing.assert_array_equal(got, expected_block(arrays, i))
        assert block.data_ptr() != values[0].data_ptr()  # its own memory, not a view of the row


@pytest.mark.unit
def test_blocks_assemble_into_the_prefix_they_came_from(blocks: DeviceBlocks) -> None:
    arrays, values = kv_buffers(length=4 * BS)
    sources = [(v.data_ptr(), v.shape()) for v in values]
    cut = blocks.cut(sources, [0, 1, 2])
    prefix = blocks.assemble(cut)
    assert len(prefix) == BUFFERS
    for a, p in zip(arrays, prefix):
        np.testing.assert_array_equal(p.numpy(), a[:, :, :3 * BS, :])


@pytest.mark.unit
def test_cutting_no_blocks_runs_nothing(blocks: DeviceBlocks) -> None:
    assert blocks.cut([], []) == []


@pytest.mark.unit
def test_one_cut_serves_rows_side_by_side(blocks: DeviceBlocks) -> None:
    """A group of prompts prefilled together sits in consecutive pool rows: one cut_span over
    them, then each row's blocks copied out, equal to cutting each row alone."""
    rows, length = 3, 5 * BS
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((rows, HEADS, length, DIM)).astype(np.float32) for _ in range(BUFFERS)]
    values = [ort.OrtValue.ortvalue_from_numpy(a, "cpu", 0) for a in arrays]
    span = blocks.cut_span([(v.data_ptr(), v.shape()) for v in values], 1, 3)  # blocks 1..3
    assert span.shape() == [rows, 3, BUFFERS, HEADS, BS, DIM]
    for row in range(rows):
        got = blocks.copy_out(span, row, [0, 2])  # blocks 1 and 3 of this row
        for block, i in zip(got, (1, 3)):
            want = np.stack([a[row, :, i * BS:(i + 1) * BS, :] for a in arrays])
            np.testing.assert_array_equal(block.numpy(), want)
