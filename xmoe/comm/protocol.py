"""The device side of a call's protocol, shared by the dispatch and combine kernels.

- Calls are numbered on the device (:func:`call_number`), so launches captured in a CUDA
  graph number each replay by themselves; the number's parity picks the half of the
  symmetric block (``layout/symmetric.py``) and is the value of the signals.
- Blocks take work from counters as they come (:func:`claim`), so a kernel finishes with
  any number of its blocks on the GPU (ranks sharing a GPU hold SMs while they wait);
  the block that finishes the last item (:func:`finished_last`) publishes, and the block
  that exits last (:func:`exit_block`) resets the counters.
- A sender publishes its meta row (its call shape, then its counts) and raises its
  signal in every peer (:func:`make_publish`); a receiver waits, bounded, for every peer's
  signal and compares the peer's call shape with its own before it reads anything
  (:func:`wait_for_peers`). Errors go to the status words (``comm/status.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from xmoe.comm.device import Transport, backoff, load_fresh, wait_signal
from xmoe.comm.status import ERR_MISMATCH, ERR_TIMEOUT, FIELD_SHIFT
from xmoe.layout.symmetric import META_HEADER, META_LOCAL_EXPERTS

# A kernel's work counters (int32[WORK_WORDS], zero between launches): the next item of
# the first phase, the items finished, the next item of the second phase, the blocks
# exited, the next column to scan and the columns scanned (a dispatch's notify phase),
# and whether the counts were gathered (a dispatch's notify phase: 1 once they are).
WORK_NEXT, WORK_DONE, WORK_NEXT_SECOND, WORK_EXITED, WORK_NEXT_COLUMN, WORK_SCANNED, WORK_COUNTED = range(7)
WORK_WORDS = 7
#: Items a block takes at a time. Measured on one H100 under MPS, 4096 tokens, cached
#: dispatch: 390 us at 2 PEs with 4 against 525 us with a chunk computed from the grid
#: (3-5 items; 16 chunks a block), 1980 us against 1840 us (8 items) at 4 PEs.
CLAIM = 4


@cuda.jit(device=True)
def report_error(errors, code, detail):
    """Leave ``code`` and its ``detail`` in the status words (``errors``: int32 ``[2]``) unless an
    error is there already: plain stores (mapped host memory takes no atomics), so of several
    concurrent reports any one's code is kept, and its detail may be another's."""
    if errors[0] == 0:
        errors[1] = detail
        errors[0] = code


@cuda.jit(device=True)
def claim(work, index, count, slot):
    """Block-wide: the first of the next ``count`` items of counter ``work[index]``, the same
    in every thread (``slot``: a shared int32 array of one element)."""
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        slot[0] = cuda.atomic.add(work, index, count)
    cuda.syncthreads()
    return slot[0]


@cuda.jit(device=True)
def finished_last(work, index, count, total, slot):
    """Block-wide, once every thread has fenced its writes: add the block's ``count`` finished
    items of ``total`` to ``work[index]``; True in every thread of the block that finishes the
    last one (block 0 when ``total`` is 0)."""
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        done = cuda.atomic.add(work, index, count) + count
        slot[0] = 1 if (count > 0 and done == total) or (total == 0 and cuda.blockIdx.x == 0) else 0
        cuda.threadfence()  # the last block sees what the others wrote before they counted
    cuda.syncthreads()
    return slot[0] == 1


@cuda.jit(device=True)
def wait_local(work, index, value):
    """Block-wide: wait until ``work[index] >= value``, which another block of this kernel sets
    after a bounded wait of its own (every block of a waiting kernel is resident: see
    :meth:`xmoe.kernels.launch._Compiled.spinning_blocks`). One thread a block polls: every
    thread's atomic read of one word would slow the blocks that advance it."""
    if cuda.threadIdx.x == 0:
        while load_fresh(work, index) < value:
            backoff()
        cuda.threadfence()  # what the other block wrote before it advanced the counter is seen after
    cuda.syncthreads()


@cuda.jit(device=True)
def call_number(calls):
    """The sequence number of the call a kernel belongs to: one more than the calls finished
    (``calls[0]``, which the last kernel of each call advances)."""
    return calls[0] + 1


@cuda.jit(device=True)
def exit_block(work, calls, ends_call):
    """Every block, last: the block that exits last zeroes the counters for the next launch and,
    in the last kernel of a call (``ends_call``), counts the call as finished in ``calls[0]``
    (every block has read it by then). True in every thread of that block (which may then
    zero scratch of its own kernel: every other block has exited)."""
    last = cuda.shared.array(1, np.int32)
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        last[0] = 0
        # Atomics to different words are not ordered without a fence: a block's last claim (which
        # overshoots the work) could otherwise land after the reset, and the next launch's
        # first claim would skip items (the threadFenceReduction pattern: fence, then count).
        cuda.threadfence()
        if cuda.atomic.add(work, WORK_EXITED, 1) == cuda.gridDim.x - 1:
            last[0] = 1
            cuda.threadfence()
            for i in range(WORK_WORDS):
                work[i] = 0
            if ends_call:
                calls[0] += 1
    cuda.syncthreads()
    return last[0] == 1


def make_publish(transport: Transport) -> Any:
    """Device function, block-wide: write this rank's meta row (``call_shape``, int32
    ``[META_HEADER]``, then ``rank_counts`` and, for each peer, the counts of its experts in
    ``expert_counts``; no counts when those are empty) into every peer, then raise each
    peer's ``local_signals`` entry to ``seq`` (one thread per peer), through ``transport``."""
    write_meta, signal = transport.write_meta, transport.signal

    @cuda.jit(device=True)
    def publish(peers, local_meta, local_signals, rank, seq, call_shape, rank_counts, expert_counts):
        num_ranks = local_signals.shape[0]
        experts_per_rank = expert_counts.shape[0] // num_ranks
        for dst in range(cuda.threadIdx.x, num_ranks, cuda.blockDim.x):
            for i in range(META_HEADER):
                write_meta(peers, local_meta, dst, rank, i, call_shape[i])
            for r in range(rank_counts.shape[0]):
                write_meta(peers, local_meta, dst, rank, META_HEADER + r, np.int32(rank_counts[r]))
            for e in range(experts_per_rank):
                write_meta(peers, local_meta, dst, rank, META_HEADER + num_ranks + e,
                           np.int32(expert_counts[dst * experts_per_rank + e]))
            signal(peers, local_signals, dst, rank, np.int64(seq))

    return publish


def make_finish_send(transport: Transport) -> Any:
    """Device function, block-wide, after a block's sends: fence its writes and count its
    ``sent`` items of ``total``; the block that finishes the last one publishes the call
    shape (no counts) and raises the signal ``seq`` in every peer through ``transport``."""
    flush = transport.flush
    publish = make_publish(transport)

    @cuda.jit(device=True)
    def finish_send(work, sent, total, slot, peers, local_meta, local_signals, rank, seq, call_shape, no_counts):
        flush()
        if finished_last(work, WORK_DONE, sent, total, slot):
            publish(peers, local_meta, local_signals, rank, seq, call_shape, no_counts, no_counts)

    return finish_send


@cuda.jit(device=True)
def wait_for_peers(signals, meta, seq, call_shape, timeout_ns, errors, flag):
    """Every thread of the block: True once every peer's signal of ``seq`` arrived with a meta
    row whose call shape equals ``call_shape``.

    Errors go to ``errors`` (:func:`report_error`): ``ERR_TIMEOUT`` or ``ERR_MISMATCH`` naming
    the peer (and the field, with the peer's value as detail). The status words are not read
    first (to skip the wait after an earlier error): they are mapped host memory, and a read
    of them by every block of a launch cost ~280 us a call (1x H200, 128 blocks, measured in
    the low-latency kernels); the waits are bounded. ``flag``: a shared int32 array of two elements.
    """
    num_ranks = signals.shape[0]
    if cuda.threadIdx.x == 0:
        flag[1] = 0
    cuda.syncthreads()
    for src in range(cuda.threadIdx.x, num_ranks, cuda.blockDim.x):
        if not wait_signal(signals, src, seq, timeout_ns):
            flag[1] = 1
            report_error(errors, ERR_TIMEOUT + src, 0)
        else:
            for i in range(META_HEADER):
                theirs = load_fresh(meta, (src, i))
                if theirs != call_shape[i]:
                    flag[1] = 1
                    report_error(errors, ERR_MISMATCH + (i << FIELD_SHIFT) + src, theirs)
                    break
    cuda.threadfence()  # the peers' rows, written before their signals, are seen after
    cuda.syncthreads()
    return flag[1] == 0


@cuda.jit(device=True)
def gather_counts(meta, rank, call_shape, rank_counts, expert_counts, recv_offsets):
    """Block-wide, after :func:`wait_for_peers`: the count matrix (row = source) into
    ``rank_counts`` ``[ranks, ranks]``, the received tokens per local expert into
    ``expert_counts`` (its first ``num_local_experts``), the first received row of each
    source into ``recv_offsets`` ``[ranks + 1]``, all from the peers' meta rows."""
    num_ranks = meta.shape[0]
    num_local_experts = call_shape[META_LOCAL_EXPERTS]
    for src in range(cuda.threadIdx.x, num_ranks, cuda.blockDim.x):
        for r in range(num_ranks):
            rank_counts[src, r] = load_fresh(meta, (src, META_HEADER + r))
    for e in range(cuda.threadIdx.x, num_local_experts, cuda.blockDim.x):
        total = 0
        for src in range(num_ranks):
            total += load_fresh(meta, (src, META_HEADER + num_ranks + e))
        expert_counts[e] = total
    if cuda.threadIdx.x == 0:
        running = 0
        for src in range(num_ranks):
            recv_offsets[src] = running
            running += load_fresh(meta, (src, META_HEADER + rank))
        recv_offsets[num_ranks] = running


@cuda.jit(device=True)
def source_of_row(recv_offsets, row):
    """The source rank whose block of received rows holds ``row``."""
    src = 0
    while recv_offsets[src + 1] <= row:
        src += 1
    return src
