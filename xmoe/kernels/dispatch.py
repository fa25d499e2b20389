"""Intranode dispatch kernels: publish counts, send into the peers' symmetric buffers, copy out.

1. ``notify`` (non-cached dispatch): block ``r`` numbers this rank's tokens bound for rank
   ``r`` (their slots in ``r``'s region); the block that finishes last publishes this
   rank's counts (meta row + notify signal) to every peer, waits, bounded, for every
   peer's, and leaves the count matrix and per-expert counts in the Buffer's host-visible
   status words (the host sizes the outputs from them) and the receive offsets on the device.
2. ``dispatch`` with phase ``SEND``: every token row (payload words, source index, local
   top-k ids and weights) goes straight into slot ``send_slot[t, dst]`` of this rank's
   region in each destination's symmetric buffer (stores or NVSHMEM puts); the block that
   finishes last raises the data signal (the call's sequence number) in every destination.
3. ``dispatch`` with phase ``RECEIVE``: waits, bounded, for every source's data signal, then
   moves the received rows, ordered by source rank then by source token, into the outputs.

Nothing here makes the host wait: 2 is queued behind 1 at once, and 3 as soon as the host
has read the counts. A cached dispatch (counts known), and a dispatch into worst-case-sized
outputs (``num_worst_tokens``: the count stays on the device), run 2 and 3 in one launch.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda

from xmoe.comm.device import (
    CLAIM,
    ERR_CAPACITY,
    ERR_MISMATCH,
    ERR_TIMEOUT,
    STATUS_ERROR,
    STATUS_INFO,
    SIMULATOR,
    STATUS_READY,
    WORK_NEXT,
    WORK_NEXT_SECOND,
    Transport,
    claim,
    copy_row,
    call_number,
    exit_block,
    finished_last,
    load_fresh,
    report_error,
    wait_signal,
)
from xmoe.config import Config
from xmoe.kernels.launch import Prepared
from xmoe.layout.dispatch import scan_column
from xmoe.layout.symmetric import META_HEADER, META_LOCAL_EXPERTS, META_ROW_BYTES, META_TOPK


def make_publish(transport: Transport) -> Any:
    """Device function: write this rank's meta row into every peer, then raise each peer's
    signal (one thread per peer), through ``transport``."""
    write_meta, signal = transport.write_meta, transport.signal

    @cuda.jit(device=True)
    def publish(peers, local_meta, local_signals, rank, seq, row_bytes, num_topk, num_local_experts, rank_counts,
                expert_counts):
        num_ranks = local_signals.shape[0]
        experts_per_rank = expert_counts.shape[0] // num_ranks
        for dst in range(cuda.threadIdx.x, num_ranks, cuda.blockDim.x):
            write_meta(peers, local_meta, dst, rank, META_ROW_BYTES, np.int32(row_bytes))
            write_meta(peers, local_meta, dst, rank, META_TOPK, np.int32(num_topk))
            write_meta(peers, local_meta, dst, rank, META_LOCAL_EXPERTS, np.int32(num_local_experts))
            for r in range(rank_counts.shape[0]):
                write_meta(peers, local_meta, dst, rank, META_HEADER + r, np.int32(rank_counts[r]))
            for e in range(experts_per_rank):
                write_meta(peers, local_meta, dst, rank, META_HEADER + num_ranks + e,
                           np.int32(expert_counts[dst * experts_per_rank + e]))
            signal(peers, local_signals, dst, rank, np.int64(seq))

    return publish


def make_finish_send(transport: Transport) -> Any:
    """Device function, block-wide, after a block's sends: fence its writes and count its
    ``sent`` items of ``total``; the block that finishes the last one publishes the header
    (meta row without counts, signal ``seq``) in every peer through ``transport``."""
    flush = transport.flush
    publish = make_publish(transport)

    @cuda.jit(device=True)
    def finish_send(work, sent, total, slot, peers, local_meta, local_signals, rank, seq, row_bytes, num_topk,
                    num_local_experts, no_counts):
        flush()
        if finished_last(work, sent, total, slot):
            publish(peers, local_meta, local_signals, rank, seq, row_bytes, num_topk, num_local_experts, no_counts,
                    no_counts)

    return finish_send


#: For the dispatch and combine kernels: 64 registers a thread give two blocks of 512
#: threads per SM, not one (1x H100 under MPS, 4096 tokens: at 4 PEs cached dispatch 1344 us
#: against 1869 us without the cap; at 2 PEs combine 758 us uncapped, ~500 us capped).
#: The simulator's jit takes no such option.
CAPPED_REGISTERS: dict = {} if SIMULATOR else {"max_registers": 64}


@cuda.jit(device=True)
def wait_for_peers(signals, meta, seq, row_bytes, num_topk, num_local_experts, timeout_ns, status, flag):
    """Every thread of the block: True once every peer's signal of ``seq`` arrived with a matching meta row.

    Errors go to ``status`` (see :func:`report_error`); a block that finds one already
    there does not wait. ``flag`` is a shared int32 array of two elements.
    """
    num_ranks = signals.shape[0]
    if cuda.threadIdx.x == 0:
        flag[0] = status[STATUS_ERROR]
        flag[1] = 0
    cuda.syncthreads()
    if flag[0] == 0:
        for src in range(cuda.threadIdx.x, num_ranks, cuda.blockDim.x):
            code = 0
            if not wait_signal(signals, src, seq, timeout_ns):
                code = ERR_TIMEOUT + src
            elif (
                load_fresh(meta, (src, META_ROW_BYTES)) != row_bytes
                or load_fresh(meta, (src, META_TOPK)) != num_topk
                or load_fresh(meta, (src, META_LOCAL_EXPERTS)) != num_local_experts
            ):
                code = ERR_MISMATCH + src
            if code != 0:
                flag[1] = code
                report_error(status, code)
    cuda.syncthreads()
    return flag[0] == 0 and flag[1] == 0


@cuda.jit(device=True)
def gather_counts(meta, rank, status, recv_offsets):
    """Block-wide: the count matrix ``[ranks, ranks]`` (row = source) and the received tokens
    per local expert from the meta rows into ``status[STATUS_INFO:]``; the first received
    row of each source ``[ranks + 1]`` into ``recv_offsets``."""
    num_ranks = meta.shape[0]
    num_local_experts = meta.shape[1] - META_HEADER - num_ranks
    per_expert = STATUS_INFO + num_ranks * num_ranks
    for src in range(cuda.threadIdx.x, num_ranks, cuda.blockDim.x):
        for r in range(num_ranks):
            status[STATUS_INFO + src * num_ranks + r] = load_fresh(meta, (src, META_HEADER + r))
    for e in range(cuda.threadIdx.x, num_local_experts, cuda.blockDim.x):
        total = 0
        for src in range(num_ranks):
            total += load_fresh(meta, (src, META_HEADER + num_ranks + e))
        status[per_expert + e] = total
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


@lru_cache(maxsize=None)
def notify_kernel(transport: Transport) -> Any:
    """The notify kernel for ``transport`` (one block per rank; built, and compiled, on first use).
    ``halves``: per parity half, this rank's meta and notify signals (``peers``: the byte
    offsets of the peers' blocks);
    ``call_id``: the host's number of the call, left in ``status[STATUS_READY]`` at the end."""
    publish = make_publish(transport)

    @cuda.jit(cache=transport.name == "store")
    def notify(
        is_token_in_rank, expert_counts, send_slot, rank_counts, peers, halves, rank, calls, call_id, row_bytes,
        num_topk, timeout_ns, work, recv_offsets, status,
    ):
        seq = call_number(calls)
        local_meta, local_signals = halves[1] if seq & 1 else halves[0]
        num_local_experts = expert_counts.shape[0] // send_slot.shape[1]
        scan_column(is_token_in_rank, send_slot, rank_counts, cuda.blockIdx.x)
        cuda.threadfence()
        last = cuda.shared.array(1, np.int32)
        if finished_last(work, 1, cuda.gridDim.x, last):
            publish(peers, local_meta, local_signals, rank, seq, row_bytes, num_topk, num_local_experts, rank_counts,
                    expert_counts)
            flag = cuda.shared.array(2, np.int32)
            if wait_for_peers(local_signals, local_meta, seq, row_bytes, num_topk, num_local_experts, timeout_ns,
                              status, flag):
                gather_counts(local_meta, rank, status, recv_offsets)
            cuda.threadfence_system()
            cuda.syncthreads()
            if cuda.threadIdx.x == 0:
                status[STATUS_READY] = call_id
        exit_block(work, calls, False)

    return notify


#: The phases of a dispatch kernel launch (a bit mask): send this rank's rows, receive the peers'.
SEND, RECEIVE = 1, 2


@lru_cache(maxsize=None)
def dispatch_kernel(transport: Transport) -> Any:
    """The dispatch kernel for ``transport`` (built, and compiled, on first use).

    ``phases & SEND``: every token row (payload words, source index, local top-k ids and
    weights) goes into slot ``send_slot[t, dst]`` of this rank's region in each destination;
    the block that finishes the last token publishes the header (meta, signal) in every
    destination.
    ``phases & RECEIVE``: every block waits, bounded, for every source's header of ``seq``,
    then the received rows, ordered by source rank then source token, are copied from
    ``field_x`` (this rank's view, as ``recv_x``'s words) into the outputs. Rows past the
    received count (``recv_offsets[-1]``) are padding: source index and top-k ids -1,
    weights 0, payload untouched; a count above ``recv_x``'s rows is an ``ERR_CAPACITY``
    error and nothing is received.
    Blocks take tokens and rows as they come (``claim``), so the kernel finishes whichever
    of its blocks are on the GPU: with both phases, blocks that wait do not keep the sends
    of blocks not yet running from happening.
    ``halves``: for each parity half of the symmetric buffer, this rank's view of x (as
    ``x``'s words), src_idx, topk_idx, topk_weights, meta and signals, then ``field_x``; the
    call's number (:func:`call_number`) picks the half (``peers``: the byte offsets of the
    peers' blocks). A launch with ``RECEIVE`` ends its call.
    """
    write_row, write_value = transport.write_row, transport.write_value
    finish_send = make_finish_send(transport)

    @cuda.jit(cache=transport.name == "store", **CAPPED_REGISTERS)
    def dispatch(
        phases, x, topk_idx, topk_weights, send_slot, num_local_experts, no_counts, peers, halves, rank, calls,
        row_bytes, work, timeout_ns, status, recv_offsets, recv_x, recv_src_idx, recv_topk_idx, recv_topk_weights,
    ):
        seq = call_number(calls)
        local_x, local_src_idx, local_topk_idx, local_topk_weights, local_meta, local_signals, field_x = (
            halves[1] if seq & 1 else halves[0])
        tid = cuda.threadIdx.x
        num_threads = cuda.blockDim.x
        num_topk = topk_idx.shape[1]
        slot_of = cuda.shared.array(1, np.int32)
        if phases & SEND:
            num_ranks = send_slot.shape[1]
            num_tokens = x.shape[0]
            sent = 0
            first = claim(work, WORK_NEXT, slot_of)
            while first < num_tokens:
                for t in range(first, min(first + CLAIM, num_tokens)):
                    for dst in range(num_ranks):
                        slot = send_slot[t, dst]
                        if slot >= 0:
                            write_row(peers, local_x, dst, rank, slot, x[t])
                            for j in range(tid, num_topk, num_threads):
                                local = topk_idx[t, j] - dst * num_local_experts
                                if topk_idx[t, j] < 0 or local < 0 or local >= num_local_experts:
                                    local = -1
                                weight = topk_weights[t, j] if local >= 0 else 0.0
                                write_value(peers, local_topk_idx, dst, rank, slot, j, np.int32(local))
                                write_value(peers, local_topk_weights, dst, rank, slot, j, np.float32(weight))
                            if tid == 0:
                                write_value(peers, local_src_idx, dst, rank, slot, 0, np.int32(t))
                    sent += 1
                first = claim(work, WORK_NEXT, slot_of)
            finish_send(work, sent, num_tokens, slot_of, peers, local_meta, local_signals, rank, seq, row_bytes,
                        num_topk, num_local_experts, no_counts)
        flag = cuda.shared.array(2, np.int32)
        if phases & RECEIVE and wait_for_peers(local_signals, local_meta, seq, row_bytes, num_topk, num_local_experts,
                                               timeout_ns, status, flag):
            num_rows = recv_x.shape[0]
            num_words = recv_x.shape[1]
            received = recv_offsets[recv_offsets.shape[0] - 1]
            if received > num_rows:  # a worst-case recv_x too short: receive nothing
                if tid == 0:
                    report_error(status, ERR_CAPACITY + min(received, ERR_TIMEOUT - 1))  # below the next code
                received = 0
            first = claim(work, WORK_NEXT_SECOND, slot_of)
            while first < num_rows:
                for row in range(first, min(first + CLAIM, num_rows)):
                    if row < received:
                        src = source_of_row(recv_offsets, row)
                        slot = row - recv_offsets[src]
                        copy_row(recv_x[row], field_x[src, slot, :num_words])
                        for j in range(tid, num_topk, num_threads):
                            recv_topk_idx[row, j] = local_topk_idx[src, slot, j]
                            recv_topk_weights[row, j] = local_topk_weights[src, slot, j]
                        if tid == 0:
                            recv_src_idx[row] = local_src_idx[src, slot, 0]
                    else:  # a padding row of a worst-case recv_x: routed nowhere
                        for j in range(tid, num_topk, num_threads):
                            recv_topk_idx[row, j] = -1
                            recv_topk_weights[row, j] = 0.0
                        if tid == 0:
                            recv_src_idx[row] = -1
                first = claim(work, WORK_NEXT_SECOND, slot_of)
        exit_block(work, calls, phases & RECEIVE)

    return dispatch


def prepare_notify(transport: Transport, threads: int, args: tuple, changing: tuple[int, ...]) -> Prepared:
    """:func:`notify_kernel` (one block per rank) prepared with ``args`` (see
    :class:`xmoe.kernels.launch.Prepared`; ``changing``: positions in ``args``)."""
    return Prepared(notify_kernel(transport), args[0].shape[1], threads, args, changing)


def prepare_dispatch(transport: Transport, phases: int, config: Config, args: tuple,
                     changing: tuple[int, ...]) -> Prepared:
    """:func:`dispatch_kernel` for ``phases`` (``SEND``, ``RECEIVE`` or both) prepared with
    ``args`` (after ``phases``; ``x``, ``recv_x`` and the payload fields are words);
    ``changing``: positions in ``args``. A receive is launched even for no rows (its wait
    orders the calls)."""
    return Prepared(dispatch_kernel(transport), config.num_sms, config.num_threads, (phases, *args),
                    tuple(position + 1 for position in changing), spins=bool(phases & RECEIVE))
