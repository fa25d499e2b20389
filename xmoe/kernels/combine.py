"""Intranode combine: one kernel sends rows back to their source ranks, then reduces in rank order."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda

from xmoe.comm.device import Transport
from xmoe.comm.protocol import (
    CLAIM,
    WORK_NEXT,
    WORK_NEXT_SECOND,
    call_number,
    claim,
    exit_block,
    make_finish_send,
    source_of_row,
    wait_for_peers,
)
from xmoe.kernels.launch import CAPPED_REGISTERS
from xmoe.kernels.numerics import bf16_to_f32, f32_from_bits, f32_to_bf16, f32_to_bits


#: The symmetric fields the combine kernel takes per parity half, in its order (``x`` as the
#: payload's words).
COMBINE_FIELDS = ("x", "topk_weights", "meta", "signals")


@lru_cache(maxsize=None)
def combine_kernel(transport: Transport, element: np.dtype, word: np.dtype) -> Any:
    """The combine kernel for ``transport`` and payload ``element`` (float32, or uint16
    bfloat16 bits), moved and reduced as ``word``-sized integers (``x``'s and ``out``'s words
    alike), each carrying ``word.itemsize // element.itemsize`` elements: 8-byte words move 4
    bfloat16 values per load instead of 1 (built, and compiled, on first use).

    Send: received row ``i < recv_offsets[-1]`` (from source ``s``, slot ``i - recv_offsets[s]``)
    goes back into this rank's region of ``s``'s symmetric buffer at that same slot, with its
    top-k weights, unless ``s`` is this rank (those rows stay in ``x``); the block that
    finishes the last row publishes meta and signals.
    Reduce: every block waits, bounded, for every peer and a matching call shape
    (``call_shape``; errors go to ``errors``), then each token sums in fp32, in rank order,
    the rows that came back for it (``send_slot[t, r]`` locates them in the ``x`` field, or,
    for this rank's own, in ``x`` from row ``recv_offsets[rank]``), and rounds to the payload
    type. Blocks take rows and tokens as they come (see :func:`dispatch_kernel`).
    ``halves``: per parity half, this rank's view of the :data:`COMBINE_FIELDS` (x as
    ``word``s; ``peers``: the byte offsets of the peers' blocks). The launch ends its call.
    """
    write_row, write_value = transport.write_row, transport.write_value
    finish_send = make_finish_send(transport)
    lanes = word.itemsize // element.itemsize
    lane_bits = 8 * element.itemsize
    lane_mask = (1 << lane_bits) - 1
    widen, narrow = (bf16_to_f32, f32_to_bf16) if element == np.uint16 else (f32_from_bits, f32_to_bits)

    @cuda.jit(cache=transport.name == "store", **CAPPED_REGISTERS)
    def combine(x, topk_weights, recv_offsets, send_slot, peers, halves, rank, calls, call_shape, work, timeout_ns,
                errors, out, out_topk_weights):
        seq = call_number(calls)
        local_x, local_topk_weights, local_meta, local_signals = halves[1] if seq & 1 else halves[0]
        tid = cuda.threadIdx.x
        num_threads = cuda.blockDim.x
        num_topk = topk_weights.shape[1]
        slot_of = cuda.shared.array(1, np.int32)
        # the rows received: x's, or fewer (the rest is padding of worst-case outputs)
        num_rows = min(recv_offsets[recv_offsets.shape[0] - 1], x.shape[0])
        sent = 0
        first = claim(work, WORK_NEXT, CLAIM, slot_of)
        while first < num_rows:
            for row in range(first, min(first + CLAIM, num_rows)):
                src = source_of_row(recv_offsets, row)
                slot = row - recv_offsets[src]
                if src != rank:  # this rank's own rows are reduced from x
                    write_row(peers, local_x, src, rank, slot, x[row])
                    for j in range(tid, num_topk, num_threads):
                        write_value(peers, local_topk_weights, src, rank, slot, j, topk_weights[row, j])
                sent += 1
            first = claim(work, WORK_NEXT, CLAIM, slot_of)
        finish_send(work, sent, num_rows, slot_of, peers, local_meta, local_signals, rank, seq, call_shape,
                    recv_offsets[:0])
        flag = cuda.shared.array(2, np.int32)
        if wait_for_peers(local_signals, local_meta, seq, call_shape, timeout_ns, errors, flag):
            num_ranks = send_slot.shape[1]
            num_tokens = out.shape[0]
            own_first = recv_offsets[rank]
            acc = cuda.local.array(lanes, np.float32)
            first = claim(work, WORK_NEXT_SECOND, CLAIM, slot_of)
            while first < num_tokens:
                for t in range(first, min(first + CLAIM, num_tokens)):
                    for w in range(tid, out.shape[1], num_threads):
                        for i in range(lanes):
                            acc[i] = 0.0
                        for r in range(num_ranks):
                            slot = send_slot[t, r]
                            if slot >= 0:
                                bits = np.uint64(x[own_first + slot, w] if r == rank else local_x[r, slot, w])
                                for i in range(lanes):
                                    acc[i] += widen((bits >> np.uint64(lane_bits * i)) & np.uint64(lane_mask))
                        packed = np.uint64(0)
                        for i in range(lanes):
                            packed |= np.uint64(narrow(acc[i])) << np.uint64(lane_bits * i)
                        out[t, w] = packed
                    for j in range(tid, num_topk, num_threads):
                        total = np.float32(0.0)
                        for r in range(num_ranks):
                            slot = send_slot[t, r]
                            if slot >= 0:
                                total += topk_weights[own_first + slot, j] if r == rank else local_topk_weights[r, slot, j]
                        out_topk_weights[t, j] = total
                first = claim(work, WORK_NEXT_SECOND, CLAIM, slot_of)
        exit_block(work, calls, True)

    return combine
