"""Intranode combine kernels: send rows back to their source ranks, reduce in rank order.

1. ``combine_send_kernel``: received row ``i`` (from source ``s``, slot ``i - recv_offsets[s]``)
   goes back into this rank's region of ``s``'s symmetric buffer at that same slot,
   with its top-k weights; the last block publishes meta and signals.
2. ``combine_reduce`` kernels (one per payload type): every block waits, bounded, for
   every peer, then each token sums in fp32, in rank order, the rows that came back
   for it (``send_slot[t, r]`` locates them), and rounds to the payload type.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda

from xmoe.comm.device import Transport, last_block_done
from xmoe.kernels.dispatch import make_publish, source_of_row, wait_for_peers
from xmoe.kernels.launch import launch
from xmoe.kernels.numerics import bf16_to_f32, f32_load, f32_store, f32_to_bf16


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


def _make_reduce_kernel(load: Any, store: Any) -> Any:
    @cuda.jit(cache=True)
    def combine_reduce_kernel(
        signals, meta, field_x, field_topk_weights, send_slot, seq, row_bytes, num_local_experts,
        timeout_ns, out, out_topk_weights, errors,
    ):
        flag = cuda.shared.array(1, np.int32)
        num_topk = out_topk_weights.shape[1]
        if not wait_for_peers(signals, meta, seq, row_bytes, num_topk, num_local_experts, timeout_ns, errors, flag):
            return
        tid = cuda.threadIdx.x
        num_threads = cuda.blockDim.x
        num_ranks = send_slot.shape[1]
        for t in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
            for h in range(tid, out.shape[1], num_threads):
                acc = np.float32(0.0)
                for r in range(num_ranks):
                    slot = send_slot[t, r]
                    if slot >= 0:
                        acc += load(field_x[r, slot, h])
                out[t, h] = store(acc)
            for j in range(tid, num_topk, num_threads):
                acc = np.float32(0.0)
                for r in range(num_ranks):
                    slot = send_slot[t, r]
                    if slot >= 0:
                        acc += field_topk_weights[r, slot, j]
                out_topk_weights[t, j] = acc

    return combine_reduce_kernel


#: Reduce kernel per payload element type as the kernel sees it (bfloat16 as uint16 bits).
REDUCE_KERNELS = {
    np.dtype(np.float32): _make_reduce_kernel(f32_load, f32_store),
    np.dtype(np.uint16): _make_reduce_kernel(bf16_to_f32, f32_to_bf16),
}


def launch_combine_send(transport: Transport, blocks: int, threads: int, stream: int, *args) -> None:
    """See :func:`combine_send_kernel`; ``x`` is the payload as words ``[rows, words]``."""
    launch(combine_send_kernel(transport), blocks, threads, *args, stream=stream)


def launch_combine_reduce(element: np.dtype, blocks: int, threads: int, stream: int, *args) -> None:
    """See ``combine_reduce_kernel``; ``element`` is float32 or uint16 (bfloat16 bits)."""
    launch(REDUCE_KERNELS[np.dtype(element)], blocks, threads, *args, stream=stream)
