"""Prefix-cache blocks cut from KV buffers on the device (DeviceBlocks, issue 13 §3): blocks of
any rows cut in one run and copied apart hold exactly the positions each block names, in the
cache's layout, and assembling blocks gives back the prefix they came from. KvCopier's batched
copies (one run for a step's leavers' rows) move exactly the rows they name."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from services.worker.fused_batch import KvCopier, row_moves
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
    out = blocks.cut(sources, [(0, i) for i in indices])
    assert len(out) == len(indices)
    for i, block in zip(indices, out):
        got = block.numpy().reshape(BUFFERS, HEADS, BS, DIM)
        np.testing.assert_array_equal(got, expected_block(arrays, i))
        assert block.data_ptr() != values[0].data_ptr()  # its own memory, not a view of the row


@pytest.mark.unit
def test_blocks_assemble_into_the_prefix_they_came_from(blocks: DeviceBlocks) -> None:
    arrays, values = kv_buffers(length=4 * BS)
    sources = [(v.data_ptr(), v.shape()) for v in values]
    cut = blocks.cut(sources, [(0, 0), (0, 1), (0, 2)])
    prefix = blocks.assemble(cut)
    assert len(prefix) == BUFFERS
    for a, p in zip(arrays, prefix):
        np.testing.assert_array_equal(p.numpy(), a[:, :, :3 * BS, :])


@pytest.mark.unit
def test_cutting_no_blocks_runs_nothing(blocks: DeviceBlocks) -> None:
    assert blocks.cut([], []) == []


@pytest.mark.unit
def test_one_cut_serves_blocks_of_many_rows(blocks: DeviceBlocks) -> None:
    """A step's leavers sit in any rows of the pool: one cut takes any blocks of any of them,
    equal to the positions each (row, block) names."""
    rows, length = 5, 6 * BS
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((rows, HEADS, length, DIM)).astype(np.float32) for _ in range(BUFFERS)]
    values = [ort.OrtValue.ortvalue_from_numpy(a, "cpu", 0) for a in arrays]
    picks = [(4, 0), (1, 3), (4, 5), (0, 2), (1, 0)]
    got = blocks.cut([(v.data_ptr(), v.shape()) for v in values], picks)
    assert len(got) == len(picks)
    assert len({block.data_ptr() for block in got}) == len(picks)  # each its own memory
    for block, (row, i) in zip(got, picks):
        want = np.stack([a[row, :, i * BS:(i + 1) * BS, :] for a in arrays])
        np.testing.assert_array_equal(block.numpy().reshape(want.shape), want)


def pool_rows(rows: int, length: int = 3) -> tuple[list[np.ndarray], list[ort.OrtValue]]:
    """BUFFERS buffers [rows, HEADS, length, DIM] whose every row is distinct, and their OrtValues."""
    arrays = [np.arange(rows * HEADS * length * DIM, dtype=np.float32).reshape(rows, HEADS, length, DIM) + 1000 * k
              for k in range(BUFFERS)]
    return arrays, [ort.OrtValue.ortvalue_from_numpy(a, "cpu", 0) for a in arrays]


@pytest.mark.unit
def test_copy_regions_copies_row_ranges_of_any_size_in_one_run() -> None:
    """A batch's rows moving as runs of consecutive rows: each (src, dst, shape) copies exactly
    that many rows, whatever the others' sizes."""
    copier = KvCopier(["CPUExecutionProvider"], "cpu", np.float32)
    arrays, values = pool_rows(rows=8)
    before = [a.copy() for a in arrays]
    row_bytes = HEADS * 3 * DIM * 4
    copies = [(v.data_ptr() + src * row_bytes, v.data_ptr() + dst * row_bytes, [rows, HEADS, 3, DIM])
              for v in values for src, dst, rows in ((5, 0, 3), (4, 3, 1))]  # rows 5..7 → 0..2, row 4 → 3
    copier.copy_regions(copies)
    for v, b in zip(values, before):
        want = b.copy()
        want[0:3], want[3] = b[5:8], b[4]
        np.testing.assert_array_equal(v.numpy(), want)


@pytest.mark.unit
@pytest.mark.parametrize("holes, movers, runs", [
    ([], [], []),
    ([2, 3, 4], [7, 8, 9], [(2, 7, 3)]),  # a group leaving together: one run
    ([1, 3], [6, 7], [(1, 6, 1), (3, 7, 1)]),
    ([1, 2, 5], [6, 8, 9], [(1, 6, 1), (2, 8, 1), (5, 9, 1)]),
    ([0, 1, 4, 5], [6, 7, 8, 9], [(0, 6, 2), (4, 8, 2)]),
])
def test_row_moves_join_consecutive_rows_into_runs(holes: list[int], movers: list[int],
                                                   runs: list[tuple[int, int, int]]) -> None:
    assert row_moves(holes, movers) == runs


@pytest.mark.unit
@pytest.mark.parametrize("count", [1, 3, 64, 100])
def test_copy_many_copies_every_pair_whatever_their_number(count: int) -> None:
    """Split into power-of-two runs of at most 64 copies: every pair copied, nothing else written."""
    copier = KvCopier(["CPUExecutionProvider"], "cpu", np.float32)
    shape = [1, HEADS, 3, DIM]
    rng = np.random.default_rng(count)
    src = [ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape).astype(np.float32), "cpu", 0) for _ in range(count)]
    dst = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32), "cpu", 0) for _ in range(count + 1)]
    copier.copy_many([(s.data_ptr(), d.data_ptr()) for s, d in zip(src, dst)], shape)
    for s, d in zip(src, dst):
        np.testing.assert_array_equal(d.numpy(), s.numpy())
    assert not dst[-1].numpy().any()
