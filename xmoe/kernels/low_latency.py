"""Low-latency dispatch and combine kernels (decode), one launch per call or two with a hook.

Each kernel has two phases (a bit mask): ``SEND`` and ``RECEIVE``. A call without a receive
hook runs both in one launch; with a hook the first launch sends and the hook's launch
receives. The symmetric fields are those of ``layout/low_latency.py``, each ``[2, ...]``:
the call's number picks the half. The send launch numbers the call (``call_number``,
advanced when it ends) and leaves the number in ``pending[pending_slot]``, where the
receive launch of the same call finds it: nothing is numbered on the host, so the
launches replay from a CUDA graph.

Blocks take work items from counters as they come (``comm/protocol.py``'s ``claim``: a kernel
finishes with any number of its blocks resident). Dispatch, ``SEND``: blocks take tokens; a token routed to expert ``e`` goes into
slot ``(e's local index, this rank, i)`` of ``e``'s owner, ``i`` counting this rank's
entries of ``topk_idx`` naming ``e`` before it (so the rows of one source arrive in token
order and a duplicated id sends the token twice). With FP8 the block first casts the row
(``kernels/quant.py``, one scale per 128 channels) into the local ``send_x`` and sends that.
The block that finishes the last token counts this rank's tokens per expert and publishes
them with its call shape into every peer's meta row, then raises the dispatch signal
there (``comm/protocol.py``). ``RECEIVE``: once every peer's signal and call shape are in, a
block per local expert packs its rows source after source into ``recv_x[e]`` (source
``s``'s at ``layout_range[e, s] >> 32``, ``layout_range[e, s] & 0xFFFFFFFF`` of them) with
their scales (as float32, or four UE8M0 exponents per int32) and source tokens.

Combine, ``SEND``: a block per (local expert, source) sends each of its rows back into slot
``(global expert, source token)`` of the source; the last block raises the combine signal.
``RECEIVE``: each token's rows are summed in float32 with its top-k weights (masked ids
skipped) and rounded to bfloat16.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda

from xmoe.comm.device import Transport, copy_row, load_fresh
from xmoe.comm.protocol import (
    WORK_DONE,
    WORK_NEXT,
    WORK_NEXT_SECOND,
    call_number,
    claim,
    exit_block,
    finished_last,
    make_publish,
    report_error,
    wait_for_peers,
)
from xmoe.comm.status import ERR_EXPERT_ID
from xmoe.kernels.launch import CAPPED_REGISTERS
from xmoe.kernels.numerics import bf16_to_f32, f32_to_bf16, f32_to_bits, quantize_row
from xmoe.layout.symmetric import META_HEADER

SEND, RECEIVE = 1, 2
#: The most threads a block may have (the FP8 cast keeps a float32 a thread in shared memory).
MAX_THREADS = 1024


@cuda.jit(device=True)
def entries_before(topk_idx, t, k, expert, counter):
    """Block-wide: how many entries of ``topk_idx`` before ``[t, k]`` (row-major) name ``expert``
    (``counter``: a shared int32 array of one element)."""
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        counter[0] = 0
    cuda.syncthreads()
    num_topk = topk_idx.shape[1]
    found = 0
    for i in range(cuda.threadIdx.x, t * num_topk + k, cuda.blockDim.x):
        if topk_idx[i // num_topk, i % num_topk] == expert:
            found += 1
    if found > 0:
        cuda.atomic.add(counter, 0, found)
    cuda.syncthreads()
    return counter[0]


@cuda.jit(device=True)
def launch_call(phases, calls, pending, pending_slot):
    """The number of the call this launch belongs to: a send launch numbers it
    (:func:`call_number`) and leaves it in ``pending[pending_slot]``, where the receive-only
    launch of the same call (a hook's) reads it."""
    if phases & SEND:
        seq = call_number(calls)
        if cuda.blockIdx.x == 0 and cuda.threadIdx.x == 0:
            pending[pending_slot] = seq
        return seq
    return pending[pending_slot]


@cuda.jit(device=True)
def source_block(meta, num_ranks, local_expert, source):
    """``(first row, rows)`` of ``source``'s tokens in a local expert's packed rows, from the
    senders' meta rows (counts per expert after the call shape and the rank counts)."""
    first = 0
    for src in range(source):
        first += load_fresh(meta, (src, META_HEADER + num_ranks + local_expert))
    return first, load_fresh(meta, (source, META_HEADER + num_ranks + local_expert))


#: The views of the symmetric fields (``layout/low_latency.py``) the dispatch kernel takes, by name
#: (``dispatch_x`` as uint32 words, ``send_x`` as bytes and as ``send_words``).
LL_DISPATCH_FIELDS = ("send_x", "send_words", "send_scales", "dispatch_signals", "dispatch_meta", "dispatch_x",
                      "dispatch_scales", "dispatch_src_idx")
#: Those the combine kernel takes (``combine_x`` as uint32 ``combine_words``).
LL_COMBINE_FIELDS = ("combine_signals", "combine_meta", "combine_words")


@lru_cache(maxsize=None)
def ll_dispatch_kernel(transport: Transport) -> Any:
    """The low-latency dispatch kernel for ``transport`` (see the module).

    ``x`` uint32 ``[tokens, hidden / 2]`` and ``x_bits`` uint16 ``[tokens, hidden]``: the bfloat16
    rows; ``topk_idx`` int64 ``[tokens, k]``; ``fp8``, ``round_scale``: 1 or 0; ``send_x`` uint8 /
    ``send_words`` uint32 / ``send_scales`` float32: the staging fields; the fields of
    :data:`LL_DISPATCH_FIELDS` (``dispatch_x`` as uint32 words); ``expert_counts`` int32
    ``[experts]``: scratch; outputs ``recv_x`` uint32 ``[local experts, ranks * max tokens, words]``,
    ``recv_scales`` float32 ``[..., hidden / 128]`` or ``recv_packed_scales`` int32 ``[..., hidden / 512]``
    (the other ``[..., 0]``), ``recv_count`` int32 ``[local experts]``, ``recv_src_info`` int32
    ``[local experts, ranks * max tokens]``, ``recv_layout_range`` int64 ``[local experts, ranks]``,
    ``recv_stats`` int32 ``[local experts]`` (added to) or ``[0]``.
    """
    write_row, write_value, flush = transport.write_row, transport.write_value, transport.flush
    publish = make_publish(transport)

    @cuda.jit(device=True)
    def send_token(row, t, topk_idx, fp8, send_scales, peers, rank, num_local_experts, num_experts, field_x,
                   field_scales, field_src_idx, errors, counter):
        num_topk = topk_idx.shape[1]
        tid = cuda.threadIdx.x
        for k in range(num_topk):
            expert = topk_idx[t, k]
            if expert >= num_experts:
                if tid == 0:
                    report_error(errors, ERR_EXPERT_ID, t * num_topk + k)
            elif expert >= 0:
                slot = entries_before(topk_idx, t, k, expert, counter)
                dst = expert // num_local_experts
                local = expert - dst * num_local_experts
                write_row(peers, field_x[local], dst, rank, slot, row)
                if fp8:
                    for j in range(tid, send_scales.shape[1], cuda.blockDim.x):
                        write_value(peers, field_scales[local], dst, rank, slot, j, send_scales[t, j])
                if tid == 0:
                    write_value(peers, field_src_idx[local], dst, rank, slot, 0, np.int32(t))

    # named as DeepEP's kernel is: profilers' tables (DeepEP's tests read them) find "::dispatch"
    @cuda.jit(cache=transport.name == "store", **CAPPED_REGISTERS)
    def dispatch(
        phases, pending_slot, x, x_bits, topk_idx, fp8, round_scale, send_x, send_words, send_scales, peers,
        dispatch_signals, dispatch_meta, dispatch_x, dispatch_scales, dispatch_src_idx, rank, calls, pending,
        call_shape, work, timeout_ns, errors, expert_counts, recv_x, recv_scales, recv_packed_scales, recv_count,
        recv_src_info, recv_layout_range, recv_stats,
    ):
        tid = cuda.threadIdx.x
        seq = launch_call(phases, calls, pending, pending_slot)
        parity = seq & 1
        signals, meta = dispatch_signals[parity], dispatch_meta[parity]
        field_x, field_scales, field_src_idx = dispatch_x[parity], dispatch_scales[parity], dispatch_src_idx[parity]
        num_ranks = dispatch_signals.shape[1]
        num_experts = expert_counts.shape[0]
        num_local_experts = num_experts // num_ranks
        counter = cuda.shared.array(1, np.int32)
        slot_of = cuda.shared.array(1, np.int32)
        partial = cuda.shared.array(MAX_THREADS, np.float32)
        flag = cuda.shared.array(2, np.int32)
        if phases & SEND:
            num_tokens, num_topk = topk_idx.shape[0], topk_idx.shape[1]
            sent = 0
            t = claim(work, WORK_NEXT, 1, slot_of)
            while t < num_tokens:
                if fp8:
                    quantize_row(x_bits[t], round_scale, send_x[t], send_scales[t], partial)
                    send_token(send_words[t], t, topk_idx, fp8, send_scales, peers, rank, num_local_experts,
                               num_experts, field_x, field_scales, field_src_idx, errors, counter)
                else:
                    send_token(x[t], t, topk_idx, fp8, send_scales, peers, rank, num_local_experts, num_experts,
                               field_x, field_scales, field_src_idx, errors, counter)
                sent += 1
                t = claim(work, WORK_NEXT, 1, slot_of)
            flush()
            if finished_last(work, WORK_DONE, sent, num_tokens, slot_of):
                for e in range(tid, num_experts, cuda.blockDim.x):
                    expert_counts[e] = 0
                cuda.syncthreads()
                for i in range(tid, num_tokens * num_topk, cuda.blockDim.x):
                    expert = topk_idx[i // num_topk, i % num_topk]
                    if 0 <= expert < num_experts:
                        cuda.atomic.add(expert_counts, expert, 1)
                cuda.threadfence()
                cuda.syncthreads()
                publish(peers, meta, signals, rank, seq, call_shape, expert_counts[:0], expert_counts)
        if phases & RECEIVE:
            if wait_for_peers(signals, meta, seq, call_shape, timeout_ns, errors, flag):
                num_words, num_scales, num_packed = recv_x.shape[2], recv_scales.shape[2], recv_packed_scales.shape[2]
                local = claim(work, WORK_NEXT_SECOND, 1, slot_of)
                while local < num_local_experts:
                    if tid < num_ranks:
                        first, count = source_block(meta, num_ranks, local, tid)
                        recv_layout_range[local, tid] = (np.int64(first) << np.int64(32)) | np.int64(count)
                    if tid == 0:
                        first_of_last, count_of_last = source_block(meta, num_ranks, local, num_ranks - 1)
                        total = first_of_last + count_of_last
                        recv_count[local] = total
                        if recv_stats.shape[0] > 0:
                            recv_stats[local] += total
                    for src in range(num_ranks):
                        first, count = source_block(meta, num_ranks, local, src)
                        for i in range(count):
                            row = first + i
                            copy_row(recv_x[local, row], field_x[local, src, i, :num_words])
                            for j in range(tid, num_scales, cuda.blockDim.x):
                                recv_scales[local, row, j] = field_scales[local, src, i, j]
                            for j in range(tid, num_packed, cuda.blockDim.x):
                                packed = np.int32(0)
                                for b in range(4):  # UE8M0: a power-of-two scale's biased exponent byte
                                    exponent = (f32_to_bits(field_scales[local, src, i, 4 * j + b]) >> np.uint32(23)) & np.uint32(0xFF)
                                    packed |= np.int32(exponent) << np.int32(8 * b)
                                recv_packed_scales[local, row, j] = packed
                            if tid == 0:
                                recv_src_info[local, row] = field_src_idx[local, src, i, 0]
                    local = claim(work, WORK_NEXT_SECOND, 1, slot_of)
        exit_block(work, calls, phases & SEND)

    return dispatch


@lru_cache(maxsize=None)
def ll_combine_kernel(transport: Transport) -> Any:
    """The low-latency combine kernel for ``transport`` (see the module).

    ``x`` uint32 ``[local experts, ranks * max tokens, hidden / 2]``: the experts' bfloat16
    outputs in a dispatch's ``recv_x`` layout; ``src_info`` / ``layout_range``: that dispatch's
    handle; ``topk_idx`` int64 / ``topk_weights`` float32 ``[tokens, k]``: this rank's routing;
    ``out`` uint32 ``[tokens, hidden / 2]`` (bfloat16 pairs); the fields of :data:`LL_COMBINE_FIELDS`.
    """
    write_row, flush = transport.write_row, transport.flush
    publish = make_publish(transport)

    @cuda.jit(cache=transport.name == "store", **CAPPED_REGISTERS)
    def combine(
        phases, pending_slot, x, src_info, layout_range, topk_idx, topk_weights, out, peers, combine_signals,
        combine_meta, combine_words, rank, calls, pending, call_shape, work, timeout_ns, errors,
    ):
        tid = cuda.threadIdx.x
        seq = launch_call(phases, calls, pending, pending_slot)
        parity = seq & 1
        signals, meta = combine_signals[parity], combine_meta[parity]
        num_ranks = combine_signals.shape[1]
        num_local_experts = layout_range.shape[0]
        num_experts = num_local_experts * num_ranks
        slot = cuda.shared.array(1, np.int32)
        flag = cuda.shared.array(2, np.int32)
        if phases & SEND:
            field = combine_words[parity]
            items = num_local_experts * num_ranks
            sent = 0
            item = claim(work, WORK_NEXT, 1, slot)
            while item < items:
                local, src = item // num_ranks, item % num_ranks
                first = layout_range[local, src] >> np.int64(32)
                count = layout_range[local, src] & np.int64(0xFFFFFFFF)
                for i in range(count):
                    row = first + i
                    write_row(peers, field, src, rank * num_local_experts + local, src_info[local, row], x[local, row])
                sent += 1
                item = claim(work, WORK_NEXT, 1, slot)
            flush()
            if finished_last(work, WORK_DONE, sent, items, slot):
                publish(peers, meta, signals, rank, seq, call_shape, layout_range[0, :0], layout_range[0, :0])
        if phases & RECEIVE:
            if wait_for_peers(signals, meta, seq, call_shape, timeout_ns, errors, flag):
                rows = combine_words[parity]
                num_topk = topk_idx.shape[1]
                t = claim(work, WORK_NEXT_SECOND, 1, slot)
                while t < out.shape[0]:
                    for w in range(tid, out.shape[1], cuda.blockDim.x):  # a word: two bfloat16 channels
                        low = np.float32(0.0)
                        high = np.float32(0.0)
                        for k in range(num_topk):
                            expert = topk_idx[t, k]
                            if 0 <= expert < num_experts:
                                word = rows[expert, t, w]
                                weight = topk_weights[t, k]
                                low += weight * bf16_to_f32(word & np.uint32(0xFFFF))
                                high += weight * bf16_to_f32(word >> np.uint32(16))
                        out[t, w] = np.uint32(f32_to_bf16(low)) | (np.uint32(f32_to_bf16(high)) << np.uint32(16))
                    t = claim(work, WORK_NEXT_SECOND, 1, slot)
        exit_block(work, calls, phases & SEND)

    return combine
