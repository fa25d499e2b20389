"""Low-latency dispatch and combine kernels (decode), one launch per call or two with a hook:
the Numba twin of ``kernels/low_latency_cuda.py`` (same protocol), which the simulator and
the NVSHMEM put path run.

Each kernel has two phases (a bit mask): ``SEND`` and ``RECEIVE``. A call without a receive
hook runs both in one launch; with a hook the first launch sends and the hook's launch
receives. The symmetric fields are those of ``layout/low_latency.py``, each ``[2, ...]``:
the call's number picks the half. The send launch numbers the call (``call_number``,
advanced when it ends) and leaves the number in ``pending[pending_slot]``, where the
receive launch of the same call finds it: nothing is numbered on the host, so the
launches replay from a CUDA graph.

Both kernels' send phase starts with block 0 writing this rank's call shape into every
peer's meta row and raising its per-rank signal there; a receive compares every peer's
shape with its own before it reads anything (``comm/protocol.py``'s ``wait_for_peers``).

Dispatch, ``SEND``: each block counts this rank's entries per expert (shared memory);
experts that get none have their count word raised at once. Blocks take tokens; a token
routed to expert ``e`` goes into slot ``(e's local index, this rank, i)`` of ``e``'s owner,
``i`` counting this rank's entries of ``topk_idx`` naming ``e`` before it (so the rows of
one source arrive in token order and a duplicated id sends the token twice). With FP8
the block first casts the row (``kernels/quant.py``, one scale per 128 channels) into the
local ``send_x`` and sends that. Each entry sent is counted for its expert; the entry
that completes an expert raises the expert's count word in the owner,
``dispatch_counts[local expert, this rank] = (call << 32) | entries``. ``RECEIVE``: a block per
local expert waits for each source's count word and packs its rows source after source
into ``recv_x[e]`` (source ``s``'s at ``layout_range[e, s] >> 32``, ``layout_range[e, s] &
0xFFFFFFFF`` of them) with their scales (as float32, or four UE8M0 exponents per int32) and
source tokens.

Combine, ``SEND``: a block per local expert sends each of its rows back into slot
``(global expert, source token)`` of the source, then raises the expert's flag (the call's
number) in every source. ``RECEIVE``: a block a token waits for the flags of its experts;
the token's rows are summed in float32 with its top-k weights (masked ids skipped) and
rounded to bfloat16.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda

from xmoe.comm.device import Transport, backoff, copy_row, load_fresh, now_ns, wait_signal
from xmoe.comm.protocol import (
    WORK_NEXT,
    WORK_NEXT_SECOND,
    call_number,
    claim,
    exit_block,
    make_publish,
    report_error,
    wait_for_peers,
)
from xmoe.comm.status import ERR_EXPERT_ID, ERR_TIMEOUT
from xmoe.kernels.launch import CAPPED_REGISTERS
from xmoe.kernels.numerics import bf16_to_f32, f32_to_bf16, f32_to_bits, quantize_row
from xmoe.layout.symmetric import META_HEADER

SEND, RECEIVE = 1, 2
#: The most threads a block may have (the FP8 cast keeps a float32 a thread in shared memory).
MAX_THREADS = 1024
#: The most experts a dispatch counts in shared memory, and ranks a receive keeps counts of there.
MAX_EXPERTS = 1024
MAX_RANKS = 64
#: Words of a receive's running row offsets, one a source and one past the last (a global:
#: Numba types ``MAX_RANKS + 1`` written inside a kernel as an int64, which ``shared.array`` refuses).
RANK_BOUNDS = MAX_RANKS + 1


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
def wait_count(counts, local_expert, source, seq, timeout_ns):
    """One thread: the rows ``source`` sent this rank's ``local_expert`` in call ``seq``, once its
    count word (``(seq << 32) | rows``) is in; -1 after ``timeout_ns``."""
    start = now_ns()
    value = load_fresh(counts, (local_expert, source))
    while (value >> np.int64(32)) != seq:
        if now_ns() - start > timeout_ns:
            return -1
        backoff()
        value = load_fresh(counts, (local_expert, source))
    return np.int32(value & np.int64(0xFFFFFFFF))


#: The views of the symmetric fields (``layout/low_latency.py``) the dispatch kernel takes, by name
#: (``dispatch_x`` as uint32 words, ``send_x`` as bytes and as ``send_words``).
LL_DISPATCH_FIELDS = ("send_x", "send_words", "send_scales", "dispatch_signals", "dispatch_meta", "dispatch_x",
                      "dispatch_scales", "dispatch_src_idx", "dispatch_counts")
#: Those the combine kernel takes (``combine_x`` as uint32 ``combine_words``).
LL_COMBINE_FIELDS = ("combine_signals", "combine_meta", "combine_words", "combine_flags")


@lru_cache(maxsize=None)
def ll_dispatch_kernel(transport: Transport) -> Any:
    """The low-latency dispatch kernel for ``transport`` (see the module).

    ``x`` uint32 ``[tokens, hidden / 2]`` and ``x_bits`` uint16 ``[tokens, hidden]``: the bfloat16
    rows; ``topk_idx`` int64 ``[tokens, k]``; ``fp8``, ``round_scale``: 1 or 0; ``send_x`` uint8 /
    ``send_words`` uint32 / ``send_scales`` float32: the staging fields; the fields of
    :data:`LL_DISPATCH_FIELDS` (``dispatch_x`` as uint32 words); ``expert_sent`` int32
    ``[experts]``: scratch, zero between launches; outputs ``recv_x`` uint32 ``[local experts,
    ranks * max tokens, words]``, ``recv_scales`` float32 ``[..., hidden / 128]`` or
    ``recv_packed_scales`` int32 ``[..., hidden / 512]`` (the other ``[..., 0]``), ``recv_count``
    int32 ``[local experts]``, ``recv_src_info`` int32 ``[local experts, ranks * max tokens]``,
    ``recv_layout_range`` int64 ``[local experts, ranks]``, ``recv_stats`` int32 ``[local experts]``
    (added to) or ``[0]``.
    """
    write_row, write_value, signal, flush = transport.write_row, transport.write_value, transport.signal, transport.flush
    publish = make_publish(transport)

    # named as DeepEP's kernel is: profilers' tables (DeepEP's tests read them) find "::dispatch"
    @cuda.jit(cache=transport.name == "store", **CAPPED_REGISTERS)
    def dispatch(
        phases, pending_slot, x, x_bits, topk_idx, fp8, round_scale, send_x, send_words, send_scales, peers,
        dispatch_signals, dispatch_meta, dispatch_x, dispatch_scales, dispatch_src_idx, dispatch_counts, rank, calls,
        pending, call_shape, work, timeout_ns, errors, expert_sent, recv_x, recv_scales, recv_packed_scales,
        recv_count, recv_src_info, recv_layout_range, recv_stats,
    ):
        tid = cuda.threadIdx.x
        seq = launch_call(phases, calls, pending, pending_slot)
        parity = seq & 1
        signals, meta, counts = dispatch_signals[parity], dispatch_meta[parity], dispatch_counts[parity]
        field_x, field_scales, field_src_idx = dispatch_x[parity], dispatch_scales[parity], dispatch_src_idx[parity]
        num_ranks = dispatch_signals.shape[1]
        num_experts = expert_sent.shape[0]
        num_local_experts = num_experts // num_ranks
        sent_to = cuda.shared.array(MAX_EXPERTS, np.int32)  # this rank's entries per expert
        first = cuda.shared.array(RANK_BOUNDS, np.int32)
        counter = cuda.shared.array(1, np.int32)
        slot_of = cuda.shared.array(1, np.int32)
        partial = cuda.shared.array(MAX_THREADS, np.float32)
        flag = cuda.shared.array(2, np.int32)
        if phases & SEND:
            num_tokens, num_topk = topk_idx.shape[0], topk_idx.shape[1]
            if cuda.blockIdx.x == 0:
                publish(peers, meta, signals, rank, seq, call_shape, expert_sent[:0], expert_sent[:0])
            for e in range(tid, num_experts, cuda.blockDim.x):
                sent_to[e] = 0
            cuda.syncthreads()
            for i in range(tid, num_tokens * num_topk, cuda.blockDim.x):
                expert = topk_idx[i // num_topk, i % num_topk]
                if expert >= num_experts:
                    if cuda.blockIdx.x == 0:
                        report_error(errors, ERR_EXPERT_ID, i)
                elif expert >= 0:
                    cuda.atomic.add(sent_to, expert, 1)
            cuda.syncthreads()
            # block 0 (which every launch runs, first on the simulator): the experts this rank sends nothing
            for e in range(tid, num_experts if cuda.blockIdx.x == 0 else 0, cuda.blockDim.x):
                if sent_to[e] == 0:
                    signal(peers, counts[e % num_local_experts], e // num_local_experts, rank,
                           np.int64(seq) << np.int64(32))
            t = claim(work, WORK_NEXT, 1, slot_of)
            while t < num_tokens:
                if fp8:
                    quantize_row(x_bits[t], round_scale, send_x[t], send_scales[t], partial)
                for k in range(num_topk):
                    expert = topk_idx[t, k]
                    if 0 <= expert < num_experts:
                        slot = entries_before(topk_idx, t, k, expert, counter)
                        dst = expert // num_local_experts
                        local = expert - dst * num_local_experts
                        write_row(peers, field_x[local], dst, rank, slot, send_words[t] if fp8 else x[t])
                        if fp8:
                            for j in range(tid, send_scales.shape[1], cuda.blockDim.x):
                                write_value(peers, field_scales[local], dst, rank, slot, j, send_scales[t, j])
                        if tid == 0:
                            write_value(peers, field_src_idx[local], dst, rank, slot, 0, np.int32(t))
                        flush()
                        cuda.syncthreads()
                        if tid == 0:
                            cuda.threadfence()  # the other entries of this expert counted before are seen
                            done = cuda.atomic.add(expert_sent, expert, 1) + 1
                            if done == sent_to[expert]:  # the expert's last entry: its count word
                                signal(peers, counts[local], dst, rank, (np.int64(seq) << np.int64(32)) | np.int64(done))
                t = claim(work, WORK_NEXT, 1, slot_of)
        if phases & RECEIVE:
            if wait_for_peers(signals, meta, seq, call_shape, timeout_ns, errors, flag):
                num_words, num_scales, num_packed = recv_x.shape[2], recv_scales.shape[2], recv_packed_scales.shape[2]
                local = claim(work, WORK_NEXT_SECOND, 1, slot_of)
                while local < num_local_experts:
                    if tid < num_ranks:
                        rows = wait_count(counts, local, tid, seq, timeout_ns)
                        if rows < 0:
                            report_error(errors, ERR_TIMEOUT + tid, 0)
                            rows = 0
                        first[tid + 1] = rows
                    cuda.syncthreads()
                    if tid == 0:
                        first[0] = 0
                        for src in range(num_ranks):
                            first[src + 1] += first[src]
                        recv_count[local] = first[num_ranks]
                        if recv_stats.shape[0] > 0:
                            recv_stats[local] += first[num_ranks]
                    cuda.syncthreads()
                    if tid < num_ranks:
                        recv_layout_range[local, tid] = ((np.int64(first[tid]) << np.int64(32))
                                                         | np.int64(first[tid + 1] - first[tid]))
                    for src in range(num_ranks):
                        for i in range(first[src + 1] - first[src]):
                            row = first[src] + i
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
        if exit_block(work, calls, phases & SEND) and phases & SEND:
            for e in range(tid, num_experts, cuda.blockDim.x):
                expert_sent[e] = 0

    return dispatch


@lru_cache(maxsize=None)
def ll_combine_kernel(transport: Transport) -> Any:
    """The low-latency combine kernel for ``transport`` (see the module).

    ``x`` uint32 ``[local experts, ranks * max tokens, hidden / 2]``: the experts' bfloat16
    outputs in a dispatch's ``recv_x`` layout; ``src_info`` / ``layout_range``: that dispatch's
    handle; ``topk_idx`` int64 / ``topk_weights`` float32 ``[tokens, k]``: this rank's routing;
    ``out`` uint32 ``[tokens, hidden / 2]`` (bfloat16 pairs); the fields of :data:`LL_COMBINE_FIELDS`.
    """
    write_row, signal, flush = transport.write_row, transport.signal, transport.flush
    publish = make_publish(transport)

    @cuda.jit(cache=transport.name == "store", **CAPPED_REGISTERS)
    def combine(
        phases, pending_slot, x, src_info, layout_range, topk_idx, topk_weights, out, peers, combine_signals,
        combine_meta, combine_words, combine_flags, rank, calls, pending, call_shape, work, timeout_ns, errors,
    ):
        tid = cuda.threadIdx.x
        seq = launch_call(phases, calls, pending, pending_slot)
        parity = seq & 1
        signals, meta, flags = combine_signals[parity], combine_meta[parity], combine_flags[parity]
        num_ranks = combine_signals.shape[1]
        num_local_experts = layout_range.shape[0]
        num_experts = num_local_experts * num_ranks
        slot = cuda.shared.array(1, np.int32)
        flag = cuda.shared.array(2, np.int32)
        if phases & SEND:
            if cuda.blockIdx.x == 0:
                publish(peers, meta, signals, rank, seq, call_shape, layout_range[0, :0], layout_range[0, :0])
            field = combine_words[parity]
            local = claim(work, WORK_NEXT, 1, slot)
            while local < num_local_experts:
                expert = rank * num_local_experts + local
                for src in range(num_ranks):
                    first = layout_range[local, src] >> np.int64(32)
                    count = layout_range[local, src] & np.int64(0xFFFFFFFF)
                    for i in range(count):
                        row = first + i
                        write_row(peers, field, src, expert, src_info[local, row], x[local, row])
                flush()
                cuda.syncthreads()
                for src in range(tid, num_ranks, cuda.blockDim.x):  # the expert's rows are all in
                    signal(peers, flags, src, expert, np.int64(seq))
                local = claim(work, WORK_NEXT, 1, slot)
        if phases & RECEIVE:
            if wait_for_peers(signals, meta, seq, call_shape, timeout_ns, errors, flag):
                rows = combine_words[parity]
                num_topk = topk_idx.shape[1]
                t = claim(work, WORK_NEXT_SECOND, 1, slot)
                while t < out.shape[0]:
                    for k in range(tid, num_topk, cuda.blockDim.x):
                        expert = topk_idx[t, k]
                        if 0 <= expert < num_experts and not wait_signal(flags, expert, seq, timeout_ns):
                            report_error(errors, ERR_TIMEOUT + expert // num_local_experts, 0)
                    cuda.threadfence()
                    cuda.syncthreads()
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
