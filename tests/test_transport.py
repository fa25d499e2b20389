"""Each lowering of the ``Transport`` seam (``comm/device.py``) on its own, with no protocol around
it: a kernel on every rank writes a row, a value, a meta word and a signal into every rank (itself
included) through the transport, and after a barrier every rank finds each source's writes in
its own block, every element. Stores run on the simulator and the GPU; NVSHMEM puts on the GPU
(where they are also the low-latency mode's forced path), preceded by a check that the kernel's
NVSHMEM device state knows this PE."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from xmoe.interop import to_host

SLOTS, WORDS, META = 3, 40, 4
TRANSPORTS = ["store", pytest.param("put", marks=pytest.mark.gpu)]


def _fields(block, num_ranks: int):
    """Views of a symmetric byte block: rows uint32 ``[ranks, slots, words]``, values int32 ``[ranks,
    slots, 1]``, meta int32 ``[ranks, META]``, signals int64 ``[ranks]`` (each 8-byte aligned)."""
    sizes = [(np.uint32, (num_ranks, SLOTS, WORDS)), (np.int32, (num_ranks, SLOTS, 1)), (np.int32, (num_ranks, META)),
             (np.int64, (num_ranks,))]
    views, offset = [], 0
    for dtype, shape in sizes:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        views.append(block[offset:offset + nbytes].view(dtype).reshape(shape))
        offset += -(-nbytes // 8) * 8
    return views, offset


def _expected_row(src: int) -> np.ndarray:
    return (np.arange(WORDS, dtype=np.uint32) * 7 + 1000 * (src + 1)).astype(np.uint32)


def _write_everywhere(transport):
    """Kernel, one block: this rank's row into slot 1, a value into slot 2, a meta word into
    column 3 and its signal, of its own row in every rank's fields, through ``transport``."""
    write_row, write_value, write_meta = transport.write_row, transport.write_value, transport.write_meta
    signal, flush = transport.signal, transport.flush

    @cuda.jit
    def write_everywhere(peers, rows, values, meta, signals, source, rank):
        for dst in range(signals.shape[0]):
            write_row(peers, rows, dst, rank, 1, source)  # block-wide
            if cuda.threadIdx.x == 0:
                write_value(peers, values, dst, rank, 2, 0, np.int32(100 + rank))
                write_meta(peers, meta, dst, rank, 3, np.int32(200 + rank))
            flush()
            cuda.syncthreads()
            if cuda.threadIdx.x == 0:
                signal(peers, signals, dst, rank, np.int64(300 + rank))

    return write_everywhere


@pytest.mark.parametrize("name", TRANSPORTS)
@pytest.mark.mpi(ranks=2)
def test_transport_writes_land_in_every_rank(group, name):
    from xmoe.comm import get_heap
    from xmoe.comm.device import STORE, put_transport
    from xmoe.device_memory import data_pointer, xp
    from xmoe.kernels.launch import kernel_arg  # arrays by reference (the simulator copies NumPy arrays)

    write_everywhere = _write_everywhere(STORE if name == "store" else put_transport())
    rank, ranks = group.rank, group.world_size
    heap = get_heap(group)
    probe = heap.alloc(_fields(np.zeros(1 << 16, np.uint8), ranks)[1])
    (rows, values, meta, signals), _ = _fields(probe.local, ranks)
    rows[...] = 0
    values[...] = 0
    meta[...] = 0
    signals[...] = 0
    peers = xp().asarray(np.array([data_pointer(probe.peer(r)) - data_pointer(probe.local) for r in range(ranks)],
                                  np.int64))
    source = xp().asarray(_expected_row(rank))
    heap.barrier()

    if name == "put":
        _check_nvshmem_device_state(rank, ranks)
    write_everywhere[1, 64](*(kernel_arg(a) for a in (peers, rows, values, meta, signals, source)), rank)
    heap.barrier()
    got_rows, got_values, got_meta, got_signals = (to_host(a) for a in (rows, values, meta, signals))
    for src in range(ranks):
        want_rows = np.zeros((SLOTS, WORDS), np.uint32)
        want_rows[1] = _expected_row(src)
        np.testing.assert_array_equal(got_rows[src], want_rows, err_msg=f"{name}: rows from rank {src}")
        np.testing.assert_array_equal(got_values[src, :, 0], [0, 0, 100 + src], err_msg=f"{name}: values from {src}")
        np.testing.assert_array_equal(got_meta[src], [0, 0, 0, 200 + src], err_msg=f"{name}: meta from rank {src}")
    np.testing.assert_array_equal(got_signals, 300 + np.arange(ranks), err_msg=f"{name}: signals")
    probe.free()


def _check_nvshmem_device_state(rank: int, ranks: int) -> None:
    """A kernel linked with NVSHMEM's device library sees this PE and the PE count (zeros, or an
    error, where the module's device state was never initialised: then no put can land)."""
    from nvshmem.bindings.device.numba import my_pe, n_pes

    import cupy

    @cuda.jit
    def who(out):
        out[0] = my_pe()
        out[1] = n_pes()

    out = cupy.full(2, -1, np.int32)
    who[1, 1](out)
    cupy.cuda.Device().synchronize()
    assert out.get().tolist() == [rank, ranks], "NVSHMEM's device state in a Numba kernel: [my_pe, n_pes]"
