"""The pair layout kernels (``kernels/pairs``) on this machine's backend against the reference:
every (row, slot) pair lands once, in its expert's range, with its row and weight; each row's
sum of its pairs' outputs is the reference's bit for bit. Outputs are poisoned first
(XMOE_POISON, conftest), so an unwritten element shows."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe import reference
from xmoe.device_memory import on_gpu, xp
from xmoe.interop import BFLOAT16, to_host
from xmoe.kernels.pairs import gather_pairs, sum_pairs


def to_device(array: np.ndarray):
    """``array`` as a backend array (CuPy on the GPU, NumPy on the simulator), as the kernels take them."""
    return xp().asarray(array)


def _stream():
    if not on_gpu():
        return None
    import cupy

    return cupy.cuda.get_current_stream()


def _routing(rng: np.random.Generator, rows: int, top_k: int, groups: int, masked: float) -> np.ndarray:
    """int64 ``[rows, k]``: distinct experts per row, a ``masked`` fraction of slots -1."""
    idx = np.argsort(rng.random((rows, groups)), axis=1)[:, :top_k].astype(np.int64)
    idx[rng.random(idx.shape) < masked] = -1
    return idx


@pytest.mark.parametrize("rows, hidden, top_k, groups, masked", [
    (97, 64, 8, 16, 0.0), (300, 200, 3, 7, 0.3), (5, 8, 1, 1, 0.5), (0, 16, 2, 4, 0.0), (40, 24, 6, 6, 1.0)])
def test_gather_pairs(rows, hidden, top_k, groups, masked):
    rng = np.random.default_rng(rows * 7 + top_k)
    x = rng.integers(0, 2 ** 16, (rows, hidden), dtype=np.uint16)
    idx = _routing(rng, rows, top_k, groups, masked)
    weights = rng.random((rows, top_k), dtype=np.float32)
    counts = np.bincount(idx[idx >= 0], minlength=groups).astype(np.int32)
    pairs = gather_pairs(to_device(x), to_device(idx), to_device(weights), to_device(counts), int(counts.sum()),
                         _stream())
    pair_rows, pair_weights, row_of, slot, offs = (to_host(a) for a in pairs)
    np.testing.assert_array_equal(offs, np.cumsum(counts))
    starts = offs - counts
    hit = idx >= 0
    assert (slot[~hit] == -1).all()
    taken = slot[hit]
    assert sorted(taken.tolist()) == list(range(int(counts.sum())))  # every place once
    expert = idx[hit]
    assert ((taken >= starts[expert]) & (taken < offs[expert])).all()
    row = np.nonzero(hit)[0]
    np.testing.assert_array_equal(row_of[taken], row)
    np.testing.assert_array_equal(pair_rows[taken], x[row])
    np.testing.assert_array_equal(pair_weights[taken], weights[hit])


@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("rows, hidden, top_k, masked", [(130, 72, 8, 0.2), (3, 8, 1, 0.0), (0, 16, 4, 0.0)])
def test_sum_pairs(rows, hidden, top_k, masked, with_extra):
    rng = np.random.default_rng(rows + top_k)
    num_pairs = rows * top_k + 3  # pairs no slot names are not read
    pair_out = rng.standard_normal((num_pairs, hidden)).astype(BFLOAT16).view(np.uint16)
    slot = rng.permutation(num_pairs)[:rows * top_k].reshape(rows, top_k).astype(np.int32)
    slot[rng.random(slot.shape) < masked] = -1
    extra = rng.standard_normal((rows, hidden)).astype(np.float32) if with_extra else None
    got = to_host(sum_pairs(to_device(pair_out), to_device(slot), None if extra is None else to_device(extra),
                            _stream()))
    np.testing.assert_array_equal(got, reference.sum_pairs(pair_out, slot, extra))


def test_reference_pairs_against_a_loop():
    rng = np.random.default_rng(11)
    x = rng.integers(0, 2 ** 16, (20, 8), dtype=np.uint16)
    idx = _routing(rng, 20, 3, 5, 0.25)
    weights = rng.random((20, 3), dtype=np.float32)
    pair_rows, pair_weights, row_of, slot, offs = reference.gather_pairs(x, idx, weights, 5)
    want = [(e, r, j) for e in range(5) for r in range(20) for j in range(3) if idx[r, j] == e]
    for p, (e, r, j) in enumerate(want):
        assert slot[r, j] == p and row_of[p] == r and pair_weights[p] == weights[r, j]
        assert (pair_rows[p] == x[r]).all() and p < offs[e]
    out = rng.standard_normal((len(want), 8)).astype(BFLOAT16).view(np.uint16)
    summed = reference.sum_pairs(out, slot)
    for r in range(20):
        total = sum((out[slot[r, j]].view(BFLOAT16).astype(np.float32) for j in range(3) if slot[r, j] >= 0),
                    np.zeros(8, np.float32))
        np.testing.assert_array_equal(summed[r], total.astype(BFLOAT16).view(np.uint16))
