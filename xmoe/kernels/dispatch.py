"""The intranode dispatch kernel: count, send into the peers' symmetric regions, copy out.

One kernel, three phases (a bit mask, so that a launch runs any of them in order):

1. ``NOTIFY`` (a dispatch without a handle): blocks take the destination ranks one at a
   time and number this rank's tokens bound for each (:func:`scan_column`: their slots
   in that rank's region), checking the layout arguments as they go; the block that
   numbers the last rank publishes this rank's counts (meta row, notify signal) to every
   peer, waits, bounded, for every peer's, and leaves the count matrix and per-expert
   counts in the Buffer's status words (the host sizes the outputs from them) and the
   receive offsets on the device.
2. ``SEND``: every token row (payload words, FP8 scales, source index, local top-k ids and weights)
   goes straight into slot ``send_slot[t, dst]`` of this rank's region in each
   destination (stores or NVSHMEM puts); the block that finishes the last token raises
   the data signal in every destination. The payload of a row this rank keeps stays in
   ``x`` (only its small fields go into its own region); a cached dispatch, which knows
   the receive offsets at launch, copies such a row into ``recv_x`` here, while the peers
   are still sending.
3. ``RECEIVE``: waits, bounded, for every source's data signal and a matching call shape,
   then moves the received rows, ordered by source rank then by source token, into the
   outputs; the rows this rank kept come straight from ``x`` (one copy instead of two: on
   one GPU shared by 2 PEs half the rows are kept, and HBM traffic is the cost), unless the
   send phase copied them.

A dispatch without a handle launches 1+2, then 3 once the host has sized the outputs;
into worst-case-sized outputs (``num_worst_tokens``) it launches 1+2+3 at once, and a
cached dispatch (counts known) 2+3. Blocks take tokens and rows as they come, so a launch
finishes whichever of its blocks are on the GPU: blocks that wait do not keep the sends
of blocks not yet running from happening.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda

from xmoe.comm.device import Transport, copy_row
from xmoe.comm.protocol import (
    CLAIM,
    WORK_COUNTED,
    WORK_NEXT,
    WORK_NEXT_COLUMN,
    WORK_NEXT_SECOND,
    WORK_SCANNED,
    call_number,
    claim,
    exit_block,
    finished_last,
    gather_counts,
    make_finish_send,
    make_publish,
    report_error,
    source_of_row,
    wait_for_peers,
    wait_local,
)
from xmoe.comm.status import ERR_CAPACITY, ERR_LAYOUT, FIELD_SHIFT, LAYOUT_IN_RANK
from xmoe.kernels.launch import CAPPED_REGISTERS
from xmoe.layout.symmetric import META_LOCAL_EXPERTS

#: The phases of a dispatch kernel launch (a bit mask).
NOTIFY, SEND, RECEIVE = 1, 2, 4
#: Threads of a block that scans (a power of two, a multiple of the warp).
SCAN_THREADS_MAX = 1024


@cuda.jit(device=True)
def scan_column(is_token_in_rank, send_slot, tokens_per_rank, rank):
    """Block-wide exclusive scan of column ``rank``: each token's slot in rank ``rank``'s region,
    and the column's count in ``tokens_per_rank[rank]``.

    Thread ``i`` counts a contiguous chunk of tokens, thread 0 scans the chunk totals,
    then each thread numbers its chunk: two barriers, whatever the token count.
    """
    tid = cuda.threadIdx.x
    num_threads = cuda.blockDim.x
    num_tokens = is_token_in_rank.shape[0]
    chunk = (num_tokens + num_threads - 1) // num_threads
    first = tid * chunk
    last = min(first + chunk, num_tokens)
    totals = cuda.shared.array(SCAN_THREADS_MAX, np.int32)
    count = 0
    for t in range(first, last):
        if is_token_in_rank[t, rank]:
            count += 1
    totals[tid] = count
    cuda.syncthreads()
    if tid == 0:
        running = 0
        for i in range(num_threads):
            running += totals[i]
            totals[i] = running - totals[i]
        tokens_per_rank[rank] = running
    cuda.syncthreads()
    slot = totals[tid]
    for t in range(first, last):
        if is_token_in_rank[t, rank]:
            send_slot[t, rank] = slot
            slot += 1
        else:
            send_slot[t, rank] = -1


@cuda.jit(device=True)
def check_column(is_token_in_rank, topk_idx, num_local_experts, rank, errors):
    """Block-wide: report (``ERR_LAYOUT``) a token whose flag for ``rank`` disagrees with the
    experts ``topk_idx`` names there (with top-k)."""
    first = rank * num_local_experts
    if topk_idx.shape[1] > 0:
        for t in range(cuda.threadIdx.x, is_token_in_rank.shape[0], cuda.blockDim.x):
            routed = False
            for j in range(topk_idx.shape[1]):
                e = topk_idx[t, j]
                if e >= first and e < first + num_local_experts:
                    routed = True
            if routed != is_token_in_rank[t, rank]:
                report_error(errors, ERR_LAYOUT + (LAYOUT_IN_RANK << FIELD_SHIFT) + rank, t)


@cuda.jit(cache=True)
def send_slot_kernel(is_token_in_rank, send_slot, tokens_per_rank):
    """Block ``r``: :func:`scan_column` of column ``r`` (the notify phase's scan on its own, for its tests)."""
    scan_column(is_token_in_rank, send_slot, tokens_per_rank, cuda.blockIdx.x)


def check_threads(num_threads: int) -> None:
    """``ValueError`` unless ``num_threads`` suits the scans (a power of two in [32, 1024])."""
    if not (32 <= num_threads <= SCAN_THREADS_MAX and num_threads & (num_threads - 1) == 0):
        raise ValueError(f"num_threads={num_threads}: must be a power of two in [32, {SCAN_THREADS_MAX}]")


#: The symmetric fields the dispatch kernel takes per parity half, in its order (``x`` as the
#: payload's words).
DISPATCH_FIELDS = ("x", "src_idx", "topk_idx", "topk_weights", "scales", "meta", "signals", "notify_signals")


@lru_cache(maxsize=None)
def dispatch_kernel(transport: Transport) -> Any:
    """The dispatch kernel for ``transport`` (built, and compiled, on first use); see the module.

    ``halves``: for each parity half of the symmetric block, this rank's view of the
    :data:`DISPATCH_FIELDS` (x as words of ``x``'s type, which ``recv_x`` shares: kept rows
    are copied from ``x`` into ``recv_x``, and the receive launch reads ``x`` too); ``x_scales`` / ``recv_x_scales``: an FP8 payload's
    float32 scales ``[rows, hidden / 128]`` (``[rows, 0]`` otherwise), moved with their rows; the call's number (:func:`call_number`) picks the half
    (``peers``: the byte offsets of the peers' blocks). ``call_shape``: int32, this call's
    meta words (``layout/symmetric.py``); ``call_id``: the host's number of the call, left in
    ``ready`` when the counts are. Rows past the received count (``recv_offsets[-1]``) are
    padding: source index and top-k ids -1, weights 0, payload untouched; a count above
    ``recv_x``'s rows is an ``ERR_CAPACITY`` error and nothing is received. A launch with
    ``RECEIVE`` ends its call.
    """
    write_row, write_value = transport.write_row, transport.write_value
    publish = make_publish(transport)
    finish_send = make_finish_send(transport)

    @cuda.jit(cache=transport.name == "store", **CAPPED_REGISTERS)
    def dispatch(
        phases, x, x_scales, topk_idx, topk_weights, is_token_in_rank, expert_counts,
        sent_per_rank, send_slot, peers, halves, rank, calls, call_id, call_shape, work, timeout_ns, errors, ready,
        rank_counts, recv_expert_counts, recv_offsets, recv_x, recv_x_scales, recv_src_idx, recv_topk_idx,
        recv_topk_weights,
    ):
        seq = call_number(calls)
        (local_x, local_src_idx, local_topk_idx, local_topk_weights, local_scales, local_meta, local_signals,
         local_notify_signals) = halves[1] if seq & 1 else halves[0]
        tid = cuda.threadIdx.x
        num_threads = cuda.blockDim.x
        num_topk = topk_idx.shape[1]
        num_scales = x_scales.shape[1]
        num_ranks = send_slot.shape[1]
        num_local_experts = call_shape[META_LOCAL_EXPERTS]
        slot_of = cuda.shared.array(1, np.int32)
        flag = cuda.shared.array(2, np.int32)
        if phases & NOTIFY:
            column = claim(work, WORK_NEXT_COLUMN, 1, slot_of)
            while column < num_ranks:
                scan_column(is_token_in_rank, send_slot, sent_per_rank, column)
                check_column(is_token_in_rank, topk_idx, num_local_experts, column, errors)
                cuda.threadfence()
                if finished_last(work, WORK_SCANNED, 1, num_ranks, slot_of):
                    publish(peers, local_meta, local_notify_signals, rank, seq, call_shape, sent_per_rank,
                            expert_counts)
                    if wait_for_peers(local_notify_signals, local_meta, seq, call_shape, timeout_ns, errors, flag):
                        gather_counts(local_meta, rank, call_shape, rank_counts, recv_expert_counts, recv_offsets)
                    cuda.threadfence_system()
                    cuda.syncthreads()
                    if tid == 0:
                        ready[0] = call_id
                        cuda.atomic.exch(work, WORK_COUNTED, 1)
                column = claim(work, WORK_NEXT_COLUMN, 1, slot_of)
            wait_local(work, WORK_SCANNED, num_ranks)  # every send slot is numbered
        # a cached dispatch (send + receive in one launch, no notify) knows where its kept rows go
        keep_in_send = (phases & (NOTIFY | SEND | RECEIVE)) == SEND | RECEIVE
        if phases & SEND:
            num_tokens = x.shape[0]
            sent = 0
            first = claim(work, WORK_NEXT, CLAIM, slot_of)
            while first < num_tokens:
                for t in range(first, min(first + CLAIM, num_tokens)):
                    for dst in range(num_ranks):
                        slot = send_slot[t, dst]
                        if slot >= 0 and dst == rank and keep_in_send:  # kept: straight into recv_x
                            row = recv_offsets[rank] + slot
                            copy_row(recv_x[row], x[t])
                            for j in range(tid, num_scales, num_threads):
                                recv_x_scales[row, j] = x_scales[t, j]
                            if tid == 0:
                                recv_src_idx[row] = t
                        elif slot >= 0:
                            if dst != rank:  # else a row this rank keeps: the receive copies it from x
                                write_row(peers, local_x, dst, rank, slot, x[t])
                            for j in range(tid, num_topk, num_threads):
                                local = topk_idx[t, j] - dst * num_local_experts
                                if topk_idx[t, j] < 0 or local < 0 or local >= num_local_experts:
                                    local = -1
                                weight = topk_weights[t, j] if local >= 0 else 0.0
                                write_value(peers, local_topk_idx, dst, rank, slot, j, np.int32(local))
                                write_value(peers, local_topk_weights, dst, rank, slot, j, np.float32(weight))
                            for j in range(tid, num_scales, num_threads):
                                write_value(peers, local_scales, dst, rank, slot, j, x_scales[t, j])
                            if tid == 0:
                                write_value(peers, local_src_idx, dst, rank, slot, 0, np.int32(t))
                    sent += 1
                first = claim(work, WORK_NEXT, CLAIM, slot_of)
            finish_send(work, sent, num_tokens, slot_of, peers, local_meta, local_signals, rank, seq, call_shape,
                        sent_per_rank[:0])
        if phases & RECEIVE:
            if phases & NOTIFY:
                wait_local(work, WORK_COUNTED, 1)  # recv_offsets are gathered
            if wait_for_peers(local_signals, local_meta, seq, call_shape, timeout_ns, errors, flag):
                num_rows = recv_x.shape[0]
                num_words = recv_x.shape[1]
                received = recv_offsets[recv_offsets.shape[0] - 1]
                if received > num_rows:  # worst-case outputs too short: receive nothing
                    if tid == 0:
                        report_error(errors, ERR_CAPACITY, received)
                    received = 0
                first = claim(work, WORK_NEXT_SECOND, CLAIM, slot_of)
                while first < num_rows:
                    for row in range(first, min(first + CLAIM, num_rows)):
                        if row < received:
                            src = source_of_row(recv_offsets, row)
                            slot = row - recv_offsets[src]
                            if src == rank and keep_in_send:
                                continue  # copied by the send phase
                            if src == rank:
                                copy_row(recv_x[row], x[local_src_idx[src, slot, 0]])
                            else:
                                copy_row(recv_x[row], local_x[src, slot, :num_words])
                            for j in range(tid, num_topk, num_threads):
                                recv_topk_idx[row, j] = local_topk_idx[src, slot, j]
                                recv_topk_weights[row, j] = local_topk_weights[src, slot, j]
                            for j in range(tid, num_scales, num_threads):
                                recv_x_scales[row, j] = local_scales[src, slot, j]
                            if tid == 0:
                                recv_src_idx[row] = local_src_idx[src, slot, 0]
                        else:  # a padding row of worst-case outputs: routed nowhere
                            for j in range(tid, num_topk, num_threads):
                                recv_topk_idx[row, j] = -1
                                recv_topk_weights[row, j] = 0.0
                            if tid == 0:
                                recv_src_idx[row] = -1
                    first = claim(work, WORK_NEXT_SECOND, CLAIM, slot_of)
        exit_block(work, calls, phases & RECEIVE)

    return dispatch
