"""The fused MoE layer's protocol in one kernel: pack tiles into the experts' owners, run each
tile as soon as its flag is up, bring the result tiles home and sum them (``layout/fused.py``).

This Numba kernel is the protocol's twin, the reference for the tile math: it runs on the CPU
simulator in CI and on the GPU, where its experts' products are scalar float32 loops (the
tensor-core kernel, CUDA C with ``wgmma``, is to follow it). One launch per forward, three
phases whose work every block takes from counters as it comes (``comm/protocol.claim``), so
that the launch finishes with any number of its blocks resident:

1. *pack*: a block takes a token; for each of its experts a thread claims the token's row in
   the cell (local expert, this rank) of the expert's owner (``fill``, an atomic per expert:
   the first ``capacity`` arrivals get a row, the rest are dropped), the block stores the row
   there, and the block that completes a tile (``tile_done``) raises its flag in the owner,
   with the tile's rows and whether it is the cell's last (``counts``, the router's rows per
   expert, say how many rows each tile gets). One more item flags the cells this rank sends
   nothing to: tile 0, 0 rows, last.
2. *experts*: a block takes a cell (local expert, source) and runs its tiles in order as their
   flags come: for each row ``h = silu(gate) * up`` (float32, rounded to bfloat16) and
   ``y = h @ W_down^T`` rounded to bfloat16, stored into the source's result cell of the
   expert in the same row, then the result tile's flag in the source.
3. *combine*: a block takes a token and, once its rows' result tiles are flagged, sums them
   with the top-k weights in float32 into ``out`` (bfloat16). A dropped row adds nothing.

Flags carry the call's number (``layout/fused.flag_word``); waits are bounded (``timeout_ns``)
and a timeout is an ``ERR_TIMEOUT`` naming the peer.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import ml_dtypes
import numpy as np
from numba import cuda

from xmoe.comm.device import SIMULATOR, Transport, backoff, load_fresh, now_ns
from xmoe.comm.protocol import (
    WORK_DONE,
    WORK_NEXT,
    WORK_NEXT_COLUMN,
    WORK_NEXT_SECOND,
    call_number,
    claim,
    exit_block,
    report_error,
    wait_local,
)
from xmoe.comm.status import ERR_TIMEOUT
from xmoe.kernels.numerics import bf16_to_f32, f32_to_bf16
from xmoe.layout.fused import CALL_SHIFT, LAST_BIT, flag_word

#: Most experts a token may have (``topk_idx`` columns): the pack phase keeps each one's row in
#: shared memory.
MAX_TOPK = 32


@cuda.jit(device=True)
def wait_flag(flags, index, seq, timeout_ns, errors):
    """One thread: the flag word ``flags[index]`` once it belongs to call ``seq``; -1 after
    ``timeout_ns``, or at once when an error is in the status words (one timeout is enough).
    The status words are read only when the flag is not there yet: they are mapped host
    memory, and a read by every waiting block cost ~280 us a launch (``benchmarks/NOTES.md``)."""
    word = load_fresh(flags, index)
    if (word >> CALL_SHIFT) != seq and errors[0] != 0:
        return np.int64(-1)
    start = now_ns()
    while (word >> CALL_SHIFT) != seq:
        if now_ns() - start > timeout_ns:
            return np.int64(-1)
        backoff()
        word = load_fresh(flags, index)
    cuda.threadfence()  # the rows written before the flag are seen after it
    return word


#: ``layout/fused.flag_word`` (the format's one owner) compiled for the device.
device_flag_word = cuda.jit(device=True)(flag_word)


@cuda.jit(device=True)
def _expert_row_loops(row, w_up, w_down, expert, gate_up, hidden_act, out_words):
    """Block-wide: ``out_words`` (uint32 pairs of bfloat16) = ``down(silu(gate) * up)`` of ``row``
    (uint16 bfloat16 bits ``[H]``) through local expert ``expert``; ``gate_up`` float32 ``[2 F]`` and
    ``hidden_act`` float32 ``[F]`` are the block's scratch."""
    tid, threads = cuda.threadIdx.x, cuda.blockDim.x
    ffn, hidden = w_down.shape[2], w_down.shape[1]
    for c in range(tid, 2 * ffn, threads):
        acc = np.float32(0.0)
        for h in range(hidden):
            acc += bf16_to_f32(row[h]) * bf16_to_f32(w_up[expert, c, h])
        gate_up[c] = acc
    cuda.syncthreads()
    for f in range(tid, ffn, threads):
        gate = gate_up[f]
        act = gate / (np.float32(1.0) + np.float32(math.exp(-gate))) * gate_up[ffn + f]
        hidden_act[f] = bf16_to_f32(f32_to_bf16(act))  # rounded as the up GEMM stores it
    cuda.syncthreads()
    for w in range(tid, hidden // 2, threads):
        low = np.float32(0.0)
        high = np.float32(0.0)
        for f in range(ffn):
            act = hidden_act[f]
            low += act * bf16_to_f32(w_down[expert, 2 * w, f])
            high += act * bf16_to_f32(w_down[expert, 2 * w + 1, f])
        out_words[w] = np.uint32(f32_to_bf16(low)) | (np.uint32(f32_to_bf16(high)) << np.uint32(16))
    cuda.syncthreads()


@cuda.jit(device=True)
def _expert_row_numpy(row, w_up, w_down, expert, gate_up, hidden_act, out_words):
    """The simulator's lowering of :func:`expert_row`: one thread, the same float32 products and
    roundings through NumPy (the scalar loops in simulated threads take about a second a row)."""
    cuda.syncthreads()  # the block has copied the previous row out of ``out_words``
    if cuda.threadIdx.x == 0:
        def values(bits: np.ndarray) -> np.ndarray:
            return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)

        def host(array: Any) -> np.ndarray:
            return getattr(array, "_ary", array)  # a simulated device array holds its NumPy array

        gate, up = np.split(values(host(w_up)[expert]) @ values(host(row)), 2)
        act = (gate / (np.float32(1.0) + np.exp(-gate)) * up).astype(ml_dtypes.bfloat16).astype(np.float32)
        result = (values(host(w_down)[expert]) @ act).astype(ml_dtypes.bfloat16).view(np.uint16)
        host(out_words)[:] = result[0::2].astype(np.uint32) | (result[1::2].astype(np.uint32) << np.uint32(16))
    cuda.syncthreads()


#: One row through one expert, block-wide (see :func:`_expert_row_loops`).
expert_row = _expert_row_numpy if SIMULATOR else _expert_row_loops


@lru_cache(maxsize=None)
def fused_kernel(transport: Transport) -> Any:
    """The fused forward's kernel for ``transport`` (see the module).

    ``x`` uint32 ``[tokens, H / 2]`` (bfloat16 pairs); ``topk_idx`` int64 / ``topk_weights`` float32
    ``[tokens, k]``; ``counts`` int32 ``[E]`` (this rank's rows to each expert); ``w_up`` uint16
    ``[L, 2 F, H]``, ``w_down`` uint16 ``[L, H, F]`` (this rank's experts); ``out`` uint32
    ``[tokens, H / 2]``; scratch, zero at launch: ``fill`` int32 ``[E]``, ``tile_done`` int32
    ``[E, T]``; scratch: ``position`` int32 ``[tokens, k]``, ``gate_up`` float32 ``[L * R, 2 F]``,
    ``hidden_act`` float32 ``[L * R, F]``, ``result_row`` uint32 ``[L * R, H / 2]``; this rank's
    views of the layout: ``tile_flags`` int64 ``[L * R * T]``, ``result_flags`` int64 ``[E * T]``,
    ``dispatch_words`` uint32 ``[L * R, C, H / 2]``, ``dispatch_bits`` uint16 ``[L * R, C, H]``,
    ``combine_words`` uint32 ``[E, C, H / 2]``, ``combine_bits`` uint16 ``[E, C, H]``;
    ``block_m``: rows a tile.
    """
    write_row, signal, flush = transport.write_row, transport.signal, transport.flush

    @cuda.jit(cache=transport.name == "store")
    def fused(x, topk_idx, topk_weights, counts, w_up, w_down, out, fill, tile_done, position, gate_up, hidden_act,
              result_row, tile_flags, result_flags, dispatch_words, dispatch_bits, combine_words, combine_bits,
              block_m, peers, rank, calls, work, timeout_ns, errors):
        tid, threads = cuda.threadIdx.x, cuda.blockDim.x
        seq = call_number(calls)
        num_tokens, num_topk = topk_idx.shape[0], topk_idx.shape[1]
        num_experts = counts.shape[0]
        num_local = w_up.shape[0]
        num_ranks = num_experts // num_local
        capacity, tiles = dispatch_words.shape[1], tile_done.shape[1]
        slot = cuda.shared.array(1, np.int32)
        places = cuda.shared.array(MAX_TOPK, np.int32)
        word = cuda.shared.array(1, np.int64)

        # 1. pack: tokens, then one item for the cells this rank sends nothing to
        item = claim(work, WORK_NEXT, 1, slot)
        while item <= num_tokens:
            if item == num_tokens:
                for e in range(tid, num_experts, threads):
                    if counts[e] == 0:
                        dst = e // num_local
                        signal(peers, tile_flags, dst, ((e - dst * num_local) * num_ranks + rank) * tiles,
                               device_flag_word(np.int64(seq), np.int64(0), True))
            else:
                t = item
                if tid < num_topk:
                    e = topk_idx[t, tid]
                    place = -1
                    if e >= 0:
                        place = cuda.atomic.add(fill, e, 1)
                        if place >= capacity:
                            place = -1  # past the cell's capacity: dropped
                    places[tid] = place
                    position[t, tid] = place
                cuda.syncthreads()
                for j in range(num_topk):
                    if places[j] >= 0:
                        e = topk_idx[t, j]
                        dst = e // num_local
                        write_row(peers, dispatch_words, dst, (e - dst * num_local) * num_ranks + rank, places[j],
                                  x[t])
                flush()
                cuda.syncthreads()
                if tid < num_topk and places[tid] >= 0:
                    e = topk_idx[t, tid]
                    tile = places[tid] // block_m
                    kept = min(counts[e], capacity)
                    rows = min(block_m, kept - tile * block_m)
                    if cuda.atomic.add(tile_done, (e, tile), 1) + 1 == rows:
                        dst = e // num_local
                        signal(peers, tile_flags, dst, ((e - dst * num_local) * num_ranks + rank) * tiles + tile,
                               device_flag_word(np.int64(seq), np.int64(rows), (tile + 1) * block_m >= kept))
            cuda.threadfence()
            cuda.syncthreads()
            if tid == 0:
                cuda.atomic.add(work, WORK_DONE, 1)  # the combine reads this token's positions
            item = claim(work, WORK_NEXT, 1, slot)

        # 2. experts: cells (local expert, source), their tiles in order
        cell = claim(work, WORK_NEXT_SECOND, 1, slot)
        while cell < num_local * num_ranks:
            local, src = cell // num_ranks, cell % num_ranks
            expert = rank * num_local + local
            tile = 0
            while tile < tiles:
                if tid == 0:
                    word[0] = wait_flag(tile_flags, cell * tiles + tile, seq, timeout_ns, errors)
                    if word[0] < 0:
                        report_error(errors, ERR_TIMEOUT + src, 0)
                cuda.syncthreads()
                flag = word[0]
                if flag < 0:
                    break
                rows = flag & np.int64(LAST_BIT - 1)
                for r in range(rows):
                    row = tile * block_m + r
                    expert_row(dispatch_bits[cell, row], w_up, w_down, local, gate_up[cell], hidden_act[cell],
                               result_row[cell])
                    write_row(peers, combine_words, src, expert, row, result_row[cell])
                flush()
                cuda.syncthreads()
                if tid == 0 and rows > 0:
                    signal(peers, result_flags, src, expert * tiles + tile,
                           device_flag_word(np.int64(seq), rows, (flag & LAST_BIT) != 0))
                if flag & LAST_BIT:
                    break
                tile += 1
            cell = claim(work, WORK_NEXT_SECOND, 1, slot)

        # 3. combine: tokens, once their result tiles are in (and every token packed: a block
        # gets here once the experts' cells are all taken, maybe before the last token is packed)
        wait_local(work, WORK_DONE, num_tokens + 1)
        t = claim(work, WORK_NEXT_COLUMN, 1, slot)
        while t < num_tokens:
            if tid == 0:
                word[0] = 0
                for j in range(num_topk):
                    place = position[t, j]
                    if place >= 0 and word[0] == 0:
                        e = topk_idx[t, j]
                        if wait_flag(result_flags, e * tiles + place // block_m, seq, timeout_ns, errors) < 0:
                            report_error(errors, ERR_TIMEOUT + e // num_local, 0)
                            word[0] = 1
            cuda.syncthreads()
            for w in range(tid, out.shape[1], threads):
                low = np.float32(0.0)
                high = np.float32(0.0)
                for j in range(num_topk):
                    place = position[t, j]
                    if place >= 0:
                        e = topk_idx[t, j]
                        weight = topk_weights[t, j]
                        low += weight * bf16_to_f32(combine_bits[e, place, 2 * w])
                        high += weight * bf16_to_f32(combine_bits[e, place, 2 * w + 1])
                out[t, w] = np.uint32(f32_to_bf16(low)) | (np.uint32(f32_to_bf16(high)) << np.uint32(16))
            t = claim(work, WORK_NEXT_COLUMN, 1, slot)
        exit_block(work, calls, True)

    return fused
