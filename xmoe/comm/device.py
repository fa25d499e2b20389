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

# Error codes a kernel leaves in a kernel's error array: 0 = fine, otherwise
# ERR_TIMEOUT + peer (no signal from that peer), ERR_MISMATCH + peer (the peer's
# call did not match this rank's: other hidden size, top-k or expert count) or
# ERR_CAPACITY + rows (more rows arrived than a worst-case-sized output holds).
ERR_TIMEOUT = 1 << 20
ERR_MISMATCH = 2 << 20
ERR_CAPACITY = 3 << 20

# A Buffer's status words, host memory the kernels write (mapped pinned memory on the GPU),
# so the host learns of errors and of the dispatch counts without copying or synchronising:
# the error code, the host's number of the last call whose notify finished, then its counts.
STATUS_ERROR, STATUS_READY, STATUS_INFO = 0, 1, 2

if SIMULATOR:
    import ctypes
    import time

    def shifted(array, offset):
        host = getattr(array, "_ary", array)  # a simulated device array holds its NumPy array
        memory = (ctypes.c_byte * host.nbytes).from_address(host.ctypes.data + int(offset))
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


@cuda.jit(device=True)
def record_error(errors, code):
    """Keep the first error code a kernel reports in ``errors[0]``."""
    cuda.atomic.cas(errors, 0, 0, code)


@cuda.jit(device=True)
def report_error(status, code):
    """Leave ``code`` in ``status[STATUS_ERROR]`` for the host: a plain store (mapped host memory
    takes no atomics); any one of several concurrent codes is kept."""
    status[STATUS_ERROR] = code


# A kernel's work counters (int32[4], zero between launches). Blocks take items (tokens or
# rows, CLAIM at a time) as they come, so the blocks that are on the GPU do all the work
# whichever others are not (ranks sharing a GPU hold SMs while they wait): the next item of
# the first phase, the items finished, the next item of the second phase, the blocks exited.
WORK_NEXT, WORK_DONE, WORK_NEXT_SECOND, WORK_EXITED = 0, 1, 2, 3
#: Items a block takes at a time. Measured on one H100 under MPS, 4096 tokens, cached
#: dispatch: 390 us at 2 PEs with 4 against 525 us with a chunk computed from the grid
#: (3-5 items; 16 chunks a block), 1980 us against 1840 us (8 items) at 4 PEs.
CLAIM = 4


@cuda.jit(device=True)
def claim(work, index, slot):
    """Block-wide: the first of the next ``CLAIM`` items of counter ``work[index]``, the same
    in every thread (``slot``: a shared int32 array of one element)."""
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        slot[0] = cuda.atomic.add(work, index, CLAIM)
    cuda.syncthreads()
    return slot[0]


@cuda.jit(device=True)
def finished_last(work, count, total, slot):
    """Block-wide, once every thread has fenced its writes: count the block's ``count`` finished
    items of ``total``; True in every thread of the block that finishes the last one (block 0
    when ``total`` is 0)."""
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        done = cuda.atomic.add(work, WORK_DONE, count) + count
        slot[0] = 1 if (count > 0 and done == total) or (total == 0 and cuda.blockIdx.x == 0) else 0
    cuda.syncthreads()
    return slot[0] == 1


@cuda.jit(device=True)
def call_number(calls):
    """The sequence number of the call a kernel belongs to: one more than the calls finished
    (``calls[0]``, which the last kernel of each call advances), so that a launch captured in
    a CUDA graph numbers each replay by itself. Its parity picks the half of the symmetric
    buffer the call uses."""
    return calls[0] + 1


@cuda.jit(device=True)
def exit_block(work, calls, ends_call):
    """Every block, last: the block that exits last zeroes the counters for the next launch and,
    in the last kernel of a call (``ends_call``), counts the call as finished in ``calls[0]``
    (every block has read it by then)."""
    cuda.syncthreads()
    if cuda.threadIdx.x == 0 and cuda.atomic.add(work, WORK_EXITED, 1) == cuda.gridDim.x - 1:
        for i in range(4):
            work[i] = 0
        if ends_call:
            calls[0] += 1


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
        put_nbi_block(local[rank, slot], row, dst)

    @cuda.jit(device=True)
    def put_value(peers, local, dst, rank, slot, j, value):
        p(local[rank, slot, j : j + 1], value, dst)

    @cuda.jit(device=True)
    def put_meta(peers, local, dst, rank, i, value):
        p(local[rank, i : i + 1], value, dst)

    @cuda.jit(device=True)
    def put_signal(peers, local, dst, rank, value):
        quiet()
        atomic_set(local[rank : rank + 1], value, dst)

    @cuda.jit(device=True)
    def quiet_all():
        quiet()
        cuda.threadfence_system()

    return Transport("put", put_row, put_value, put_meta, put_signal, quiet_all)


def transport(force_put: bool) -> Transport:
    """The transport for a call: puts when forced (``Config.force_put`` / ``XMOE_FORCE_PUT=1``), else stores."""
    return put_transport() if force_put else STORE
