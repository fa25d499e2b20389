"""Intranode dispatch kernels: send into the peers' symmetric buffers, wait, copy out.

1. ``dispatch_send_kernel``: every token row (payload words, source index, local
   top-k ids and weights) is written straight into slot ``send_slot[t, dst]`` of this
   rank's region in each destination's symmetric buffer (stores or NVSHMEM puts). The block that finishes
   last writes this rank's meta row into every destination and raises its signal
   (the call's sequence number).
2. ``dispatch_wait_kernel``: waits, bounded, for every source's signal, checks that
   its call matches this rank's, and gathers the count matrix and per-expert counts.
3. ``dispatch_copy_out_kernel``: moves the received rows, ordered by source rank then
   by source token, from the symmetric buffer into the output arrays.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda

from xmoe.comm.device import (
    ERR_MISMATCH,
    ERR_TIMEOUT,
    Transport,
    copy_row,
    last_block_done,
    load_fresh,
    record_error,
    wait_signal,
)
from xmoe.kernels.launch import launch
from xmoe.layout.symmetric import META_HEADER, META_LOCAL_EXPERTS, META_ROW_BYTES, META_TOPK


def make_publish(transport: Transport) -> Any:
    """Device function: write this rank's meta row into every peer, then raise each peer's
    signal (one thread per peer), through ``transport``."""
    write_meta, signal = transport.write_meta, transport.signal

    @cuda.jit(device=True)
    def publish(peer_meta, local_meta, peer_signals, local_signals, rank, seq, row_bytes, num_topk,
                num_local_experts, rank_counts, expert_counts):
        num_ranks = len(peer_signals)
        experts_per_rank = expert_counts.shape[0] // num_ranks
        for dst in range(cuda.threadIdx.x, num_ranks, cuda.blockDim.x):
            write_meta(peer_meta, local_meta, dst, rank, META_ROW_BYTES, np.int32(row_bytes))
            write_meta(peer_meta, local_meta, dst, rank, META_TOPK, np.int32(num_topk))
            write_meta(peer_meta, local_meta, dst, rank, META_LOCAL_EXPERTS, np.int32(num_local_experts))
            for r in range(rank_counts.shape[0]):
                write_meta(peer_meta, local_meta, dst, rank, META_HEADER + r, np.int32(rank_counts[r]))
            for e in range(experts_per_rank):
                write_meta(peer_meta, local_meta, dst, rank, META_HEADER + num_ranks + e,
                           np.int32(expert_counts[dst * experts_per_rank + e]))
            signal(peer_signals, local_signals, dst, rank, np.int64(seq))

    return publish


@cuda.jit(device=True)
def wait_for_peers(signals, meta, seq, row_bytes, num_topk, num_local_experts, timeout_ns, errors, flag):
    """Every thread of the block: True once every peer's signal of ``seq`` arrived with a matching meta row.

    A block that finds an error already recorded (by an earlier block) does not wait.
    ``flag`` is a shared int32 array of one element.
    """
    num_ranks = signals.shape[0]
    if cuda.threadIdx.x == 0:
        flag[0] = errors[0]
    cuda.syncthreads()
    if flag[0] == 0:
        for src in range(cuda.threadIdx.x, num_ranks, cuda.blockDim.x):
            if not wait_signal(signals, src, seq, timeout_ns):
                record_error(errors, ERR_TIMEOUT + src)
            elif (
                load_fresh(meta, (src, META_ROW_BYTES)) != row_bytes
                or load_fresh(meta, (src, META_TOPK)) != num_topk
                or load_fresh(meta, (src, META_LOCAL_EXPERTS)) != num_local_experts
            ):
                record_error(errors, ERR_MISMATCH + src)
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        flag[0] = errors[0]
    cuda.syncthreads()
    return flag[0] == 0


@cuda.jit(device=True)
def source_of_row(recv_offsets, row):
    """The source rank whose block of received rows holds ``row``."""
    src = 0
    while recv_offsets[src + 1] <= row:
        src += 1
    return src


@lru_cache(maxsize=None)
def dispatch_send_kernel(transport: Transport) -> Any:
    """The send kernel for ``transport`` (built, and compiled, on first use)."""
    write_row, write_value, flush = transport.write_row, transport.write_value, transport.flush
    publish = make_publish(transport)

    @cuda.jit(cache=transport.name == "store")
    def dispatch_send(
        x, topk_idx, topk_weights, send_slot, rank_counts, expert_counts,
        peer_x, local_x, peer_src_idx, local_src_idx, peer_topk_idx, local_topk_idx,
        peer_topk_weights, local_topk_weights, peer_meta, local_meta, peer_signals, local_signals,
        rank, seq, row_bytes, done_counter,
    ):
        num_ranks = send_slot.shape[1]
        num_topk = topk_idx.shape[1]
        num_local_experts = expert_counts.shape[0] // num_ranks
        for t in range(cuda.blockIdx.x, x.shape[0], cuda.gridDim.x):
            for dst in range(num_ranks):
                slot = send_slot[t, dst]
                if slot >= 0:
                    write_row(peer_x, local_x, dst, rank, slot, x[t])
                    for j in range(cuda.threadIdx.x, num_topk, cuda.blockDim.x):
                        local = topk_idx[t, j] - dst * num_local_experts
                        if topk_idx[t, j] < 0 or local < 0 or local >= num_local_experts:
                            local = -1
                        weight = topk_weights[t, j] if local >= 0 else 0.0
                        write_value(peer_topk_idx, local_topk_idx, dst, rank, slot, j, np.int32(local))
                        write_value(peer_topk_weights, local_topk_weights, dst, rank, slot, j, np.float32(weight))
                    if cuda.threadIdx.x == 0:
                        write_value(peer_src_idx, local_src_idx, dst, rank, slot, 0, np.int32(t))
        flush()
        flag = cuda.shared.array(1, np.int32)
        if last_block_done(done_counter, flag):
            publish(peer_meta, local_meta, peer_signals, local_signals, rank, seq, row_bytes, num_topk,
                    num_local_experts, rank_counts, expert_counts)

    return dispatch_send


@cuda.jit(cache=True)
def dispatch_wait_kernel(signals, meta, rank, seq, row_bytes, num_topk, timeout_ns, info):
    """One block. ``info`` (int32, read back by the host in one copy) receives, in order: the
    error code, the count matrix ``[ranks, ranks]`` (row = source), the received tokens per
    local expert, and the first received row of each source ``[ranks + 1]``."""
    num_ranks = signals.shape[0]
    num_local_experts = info.shape[0] - 2 - num_ranks * num_ranks - num_ranks
    errors = info[0:1]
    if cuda.threadIdx.x == 0:
        errors[0] = 0
    cuda.syncthreads()
    flag = cuda.shared.array(1, np.int32)
    if not wait_for_peers(signals, meta, seq, row_bytes, num_topk, num_local_experts, timeout_ns, errors, flag):
        return
    counts = 1
    per_expert = counts + num_ranks * num_ranks
    offsets = per_expert + num_local_experts
    for src in range(cuda.threadIdx.x, num_ranks, cuda.blockDim.x):
        for r in range(num_ranks):
            info[counts + src * num_ranks + r] = load_fresh(meta, (src, META_HEADER + r))
    for e in range(cuda.threadIdx.x, num_local_experts, cuda.blockDim.x):
        total = 0
        for src in range(num_ranks):
            total += load_fresh(meta, (src, META_HEADER + num_ranks + e))
        info[per_expert + e] = total
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        running = 0
        for src in range(num_ranks):
            info[offsets + src] = running
            running += info[counts + src * num_ranks + rank]
        info[offsets + num_ranks] = running


def wait_info_length(num_ranks: int, num_local_experts: int) -> int:
    """Length of the ``info`` array of :func:`dispatch_wait_kernel`."""
    return 1 + num_ranks * num_ranks + num_local_experts + num_ranks + 1


@cuda.jit(cache=True)
def dispatch_copy_out_kernel(
    field_x, field_src_idx, field_topk_idx, field_topk_weights, recv_offsets,
    recv_x, recv_src_idx, recv_topk_idx, recv_topk_weights,
):
    tid = cuda.threadIdx.x
    num_threads = cuda.blockDim.x
    num_words = recv_x.shape[1]
    for row in range(cuda.blockIdx.x, recv_x.shape[0], cuda.gridDim.x):
        src = source_of_row(recv_offsets, row)
        slot = row - recv_offsets[src]
        copy_row(recv_x[row], field_x[src, slot, :num_words])
        for j in range(tid, recv_topk_idx.shape[1], num_threads):
            recv_topk_idx[row, j] = field_topk_idx[src, slot, j]
            recv_topk_weights[row, j] = field_topk_weights[src, slot, j]
        if tid == 0:
            recv_src_idx[row] = field_src_idx[src, slot, 0]


def launch_dispatch_send(transport: Transport, blocks: int, threads: int, stream: int, *args) -> None:
    """See :func:`dispatch_send_kernel`; ``x`` is the payload as words ``[tokens, words]``."""
    launch(dispatch_send_kernel(transport), blocks, threads, *args, stream=stream)


def launch_dispatch_wait(threads: int, stream: int, *args) -> None:
    """One block waits for every source; see :func:`dispatch_wait_kernel`."""
    launch(dispatch_wait_kernel, 1, threads, *args, stream=stream)


def launch_dispatch_copy_out(blocks: int, threads: int, stream: int, field_x, field_src_idx, field_topk_idx,
                             field_topk_weights, recv_offsets, recv_x, recv_src_idx, recv_topk_idx,
                             recv_topk_weights) -> None:
    """Copy the received rows out of the symmetric fields; nothing to launch for zero rows."""
    if recv_x.shape[0] > 0:
        launch(dispatch_copy_out_kernel, blocks, threads, field_x, field_src_idx, field_topk_idx, field_topk_weights,
               recv_offsets, recv_x, recv_src_idx, recv_topk_idx, recv_topk_weights, stream=stream)
