"""Device functions that kernels call to talk to peers: writes, signals, waits, clocks.

A kernel writes into peers through a :class:`Transport`, chosen when the kernel is
built: ``STORE`` stores through peer views (NVLink or the same GPU): this rank's view of
a field moved by the byte offset of the peer's block from this rank's (``shifted``: the
symmetric layout puts every field at the same offset in every block, so a kernel takes
one array of offsets, not a view per peer and field, whose kernel parameters outgrow
the 4 KB a launch takes at 8 ranks); ``put_transport()`` issues NVSHMEM puts to the
symmetric address of the same field (any peer NVSHMEM reaches; forced on one GPU to
test it). What differs between the GPU and Numba's CUDA simulator is the clock, the
back-off of a bounded spin and ``shifted``: under the simulator a device function is
Python in a simulated thread (whose peers' blocks are mapped into this process).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
from numba import cuda
from numba.cuda.core import config

SIMULATOR = bool(config.ENABLE_CUDASIM)

if SIMULATOR:
    import ctypes
    import time

    def shifted(array, offset):
        host = getattr(array, "_ary", array)  # a simulated device array holds its NumPy array
        span = sum((n - 1) * s for n, s in zip(host.shape, host.strides)) + host.itemsize if host.size else 0
        memory = (ctypes.c_byte * span).from_address(host.ctypes.data + int(offset))
        return np.ndarray(host.shape, host.dtype, buffer=memory, strides=host.strides)

    def now_ns() -> int:
        return time.monotonic_ns()

    def backoff() -> None:
        time.sleep(20e-6)  # let the other simulated threads and ranks run

    def load_fresh(array, index):
        # A plain load: the simulator's atomics are read-modify-writes that are atomic only
        # within one process, and would write a stale value over a peer's write.
        return array[index]

else:
    from llvmlite import ir
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _globaltimer(typingctx):
        """The GPU's nanosecond timer (PTX ``%globaltimer``)."""

        def codegen(context, builder, signature, args):
            timer = ir.InlineAsm(ir.FunctionType(ir.IntType(64), []), "mov.u64 $0, %globaltimer;", "=l",
                                 side_effect=True)
            return builder.call(timer, [])

        return types.uint64(), codegen

    @intrinsic
    def shifted(typingctx, array, offset):
        """``array`` with its data pointer moved by ``offset`` bytes (the same field in a peer's block)."""

        def codegen(context, builder, signature, args):
            view = context.make_array(signature.args[0])(context, builder, value=args[0])
            address = builder.add(builder.ptrtoint(view.data, ir.IntType(64)), args[1])
            view.data = builder.inttoptr(address, view.data.type)
            return view._getvalue()

        return array(array, types.int64), codegen

    @intrinsic
    def contiguous(typingctx, array):
        """``array`` typed C-contiguous: a row of a strided field, which NVSHMEM's Numba calls take
        only as a contiguous buffer (the array's struct is the same for every layout)."""

        def codegen(context, builder, signature, args):
            return args[0]

        return array.copy(layout="C")(array), codegen

    # Numba's disk cache keys a kernel by the pickled bytes of its closure, in which an
    # intrinsic carries a uuid1 made afresh in every process: with those, no kernel that
    # reaches one through a captured device function ever loaded from the cache, and every
    # process compiled the dispatch, combine and low-latency kernels again (~7.5 s before a
    # first round trip on the H200). A fixed name per intrinsic keeps the key the same.
    for _intrinsic in (_globaltimer, shifted, contiguous):
        _intrinsic._set_uuid(f"xmoe.comm.device.{_intrinsic._name}")

    @cuda.jit(device=True, inline=True)
    def now_ns():
        return np.int64(_globaltimer())

    @cuda.jit(device=True, inline=True)
    def backoff():
        cuda.nanosleep(64)

    @cuda.jit(device=True, inline=True)
    def load_fresh(array, index):
        # An atomic read goes to L2: a plain load may hit a line this SM cached before a
        # peer's write landed (meta rows of several peers share a line).
        return cuda.atomic.add(array, index, 0)


@cuda.jit(device=True)
def wait_signal(signals, peer, expected, timeout_ns):
    """Spin until ``signals[peer] == expected``; False after ``timeout_ns``."""
    start = now_ns()
    while load_fresh(signals, peer) != expected:
        if now_ns() - start > timeout_ns:
            return False
        backoff()
    return True


@cuda.jit(device=True)
def raise_signal(peer_signals, source, value):
    """Make this thread's earlier stores visible system-wide, then publish ``value``."""
    cuda.threadfence_system()
    cuda.atomic.exch(peer_signals, source, value)


class Transport(NamedTuple):
    """How a kernel writes into peer ``dst``: each function takes the byte offsets of the
    peers' blocks from this rank's (int64 ``[ranks]``) and this rank's view of the symmetric
    field.

    ``write_row(peers, local, dst, rank, slot, row)``: block-wide, ``field[rank, slot, :] = row``.
    ``write_value(peers, local, dst, rank, slot, j, value)``: one thread, ``field[rank, slot, j] = value``.
    ``write_meta(peers, local, dst, rank, i, value)``: one thread, ``meta[rank, i] = value``.
    ``signal(peers, local, dst, rank, value)``: one thread, after all of its writes, ``signals[rank] = value``.
    ``flush()``: every thread, before its block counts as done.
    """

    name: str
    write_row: Any
    write_value: Any
    write_meta: Any
    signal: Any
    flush: Any


@cuda.jit(device=True)
def copy_row(target, row):
    """Block-wide ``target[:n] = row`` for ``n = row.shape[0]`` words, up to four loads in flight
    per thread before its stores. The tail is predicated, not a loop of one load at a time: a
    row is often under four words a thread (7168 bfloat16 channels are 1792 8-byte words, 3.5
    for 512 threads). Rows of 1792 words copied by 264 blocks of 512 threads on an H100:
    2.73 TB/s, against 2.33 TB/s one load at a time and 2.95 TB/s for CuPy's copy."""
    step = cuda.blockDim.x
    n = row.shape[0]
    w = cuda.threadIdx.x
    while w < n:
        w1 = w + step
        w2 = w1 + step
        w3 = w2 + step
        a = row[w]
        b = row[w1] if w1 < n else a
        c = row[w2] if w2 < n else a
        d = row[w3] if w3 < n else a
        target[w] = a
        if w1 < n:
            target[w1] = b
        if w2 < n:
            target[w2] = c
        if w3 < n:
            target[w3] = d
        w += 4 * step


@cuda.jit(device=True)
def _store_row(peers, local, dst, rank, slot, row):
    copy_row(shifted(local, peers[dst])[rank, slot], row)


@cuda.jit(device=True)
def _store_value(peers, local, dst, rank, slot, j, value):
    shifted(local, peers[dst])[rank, slot, j] = value


@cuda.jit(device=True)
def _store_meta(peers, local, dst, rank, i, value):
    shifted(local, peers[dst])[rank, i] = value


@cuda.jit(device=True)
def _store_signal(peers, local, dst, rank, value):
    raise_signal(shifted(local, peers[dst]), rank, value)


@cuda.jit(device=True)
def _fence():
    cuda.threadfence_system()


STORE = Transport("store", _store_row, _store_value, _store_meta, _store_signal, _fence)


@lru_cache(maxsize=1)
def put_transport() -> Transport:
    """NVSHMEM puts (GPU only): compiled on first use, linked with NVSHMEM's device library."""
    if SIMULATOR:
        raise RuntimeError("the NVSHMEM put path needs the cuda backend")
    from nvshmem.bindings.device.numba import quiet
    from nvshmem.core.device.numba import atomic_set, p, put_nbi_block

    @cuda.jit(device=True)
    def put_row(peers, local, dst, rank, slot, row):
        put_nbi_block(contiguous(local[rank, slot]), row, dst)

    @cuda.jit(device=True)
    def put_value(peers, local, dst, rank, slot, j, value):
        p(contiguous(local[rank, slot, j : j + 1]), value, dst)

    @cuda.jit(device=True)
    def put_meta(peers, local, dst, rank, i, value):
        p(contiguous(local[rank, i : i + 1]), value, dst)

    @cuda.jit(device=True)
    def put_signal(peers, local, dst, rank, value):
        quiet()
        atomic_set(contiguous(local[rank : rank + 1]), value, dst)

    @cuda.jit(device=True)
    def quiet_all():
        quiet()
        cuda.threadfence_system()

    return Transport("put", put_row, put_value, put_meta, put_signal, quiet_all)


def transport(force_put: bool) -> Transport:
    """The transport for a call: puts when forced (``Config.force_put`` / ``XMOE_FORCE_PUT=1``), else stores."""
    return put_transport() if force_put else STORE
