"""Intranode combine kernels: send rows back to their source ranks, reduce in rank order.

1. ``combine_send_kernel``: received row ``i`` (from source ``s``, slot ``i - recv_offsets[s]``)
   goes back into this rank's region of ``s``'s symmetric buffer at that same slot,
   with its top-k weights; the last block publishes meta and signals.
2. ``combine_reduce`` kernels (one per payload type and word size): every block waits,
   bounded, for every peer (errors go to the Buffer's status words), then each token sums
   in fp32, in rank order, the rows that came back for it (``send_slot[t, r]`` locates
   them), and rounds to the payload type.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda

from xmoe.comm.device import Transport, last_block_done
from xmoe.kernels.dispatch import make_publish, source_of_row, wait_for_peers
from xmoe.kernels.launch import launch
from xmoe.kernels.numerics import bf16_to_f32, f32_from_bits, f32_to_bf16, f32_to_bits


@lru_cache(maxsize=None)
def combine_send_kernel(transport: Transport) -> Any:
    """The send kernel for ``transport`` (built, and compiled, on first use)."""
    write_row, write_value, flush = transport.write_row, transport.write_value, transport.flush
    publish = make_publish(transport)

    @cuda.jit(cache=transport.name == "store")
    def combine_send(
        x, topk_weights, recv_offsets, peer_x, local_x, peer_topk_weights, local_topk_weights,
        peer_meta, local_meta, peer_signals, local_signals, rank, seq, row_bytes, num_local_experts, no_counts,
        done_counter,
    ):
        for row in range(cuda.blockIdx.x, x.shape[0], cuda.gridDim.x):
            src = source_of_row(recv_offsets, row)
            slot = row - recv_offsets[src]
            write_row(peer_x, local_x, src, rank, slot, x[row])
            for j in range(cuda.threadIdx.x, topk_weights.shape[1], cuda.blockDim.x):
                write_value(peer_topk_weights, local_topk_weights, src, rank, slot, j, topk_weights[row, j])
        flush()
        flag = cuda.shared.array(1, np.int32)
        if last_block_done(done_counter, flag):
            publish(peer_meta, local_meta, peer_signals, local_signals, rank, seq, row_bytes, topk_weights.shape[1],
                    num_local_experts, no_counts, no_counts)

    return combine_send


@lru_cache(maxsize=None)
def reduce_kernel(element: np.dtype, word: np.dtype) -> Any:
    """The reduce kernel for payload ``element`` (float32, or uint16 bfloat16 bits) read and
    written as ``word``-sized integers, each carrying ``word.itemsize // element.itemsize``
    elements: 8-byte words move 4 bfloat16 values per load instead of 1."""
    lanes = word.itemsize // element.itemsize
    lane_bits = 8 * element.itemsize
    lane_mask = (1 << lane_bits) - 1
    widen, narrow = (bf16_to_f32, f32_to_bf16) if element == np.uint16 else (f32_from_bits, f32_to_bits)

    @cuda.jit(cache=True)
    def combine_reduce(
        signals, meta, field_x, field_topk_weights, send_slot, seq, row_bytes, num_local_experts,
        timeout_ns, out, out_topk_weights, status,
    ):
        flag = cuda.shared.array(2, np.int32)
        num_topk = out_topk_weights.shape[1]
        if not wait_for_peers(signals, meta, seq, row_bytes, num_topk, num_local_experts, timeout_ns, status, flag):
            return
        tid = cuda.threadIdx.x
        num_threads = cuda.blockDim.x
        num_ranks = send_slot.shape[1]
        acc = cuda.local.array(lanes, np.float32)
        for t in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
            for w in range(tid, out.shape[1], num_threads):
                for i in range(lanes):
                    acc[i] = 0.0
                for r in range(num_ranks):
                    slot = send_slot[t, r]
                    if slot >= 0:
                        bits = np.uint64(field_x[r, slot, w])
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
                        total += field_topk_weights[r, slot, j]
                out_topk_weights[t, j] = total

    return combine_reduce


def launch_combine_send(transport: Transport, blocks: int, threads: int, stream: int, *args, keep=None) -> None:
    """See :func:`combine_send_kernel`; ``x`` is the payload as words ``[rows, words]``;
    ``keep``: see :func:`xmoe.kernels.launch.launch`."""
    launch(combine_send_kernel(transport), blocks, threads, *args, stream=stream, keep=keep)


def launch_combine_reduce(element: np.dtype, word: np.dtype, blocks: int, threads: int, stream: int, *args,
                          keep=None) -> None:
    """See :func:`reduce_kernel`; ``element`` is float32 or uint16 (bfloat16 bits), ``field_x``
    and ``out`` are the payload as ``word``-sized integers."""
    launch(reduce_kernel(np.dtype(element), np.dtype(word)), blocks, threads, *args, stream=stream, keep=keep)
