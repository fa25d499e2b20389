"""Dispatch layout kernels: tokens per rank / per expert, token-in-rank flags, send slots.

Experts are split evenly and in order across ranks: expert ``e`` lives on rank
``e // (num_experts // num_ranks)``. One block per rank writes every output element
of its rank exactly once (no zero-initialised accumulators), so the outputs need no
clearing before a launch.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from xmoe.comm.device import record_error
from xmoe.kernels.launch import launch

#: Largest experts-per-rank the layout kernel counts in shared memory.
MAX_LOCAL_EXPERTS = 1024
#: Threads of the scan kernels (a power of two, a multiple of the warp).
SCAN_THREADS_MAX = 1024


@cuda.jit(cache=True)
def dispatch_layout_kernel(topk_idx, num_experts, tokens_per_rank, tokens_per_expert, is_token_in_rank, errors):
    rank = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    num_threads = cuda.blockDim.x
    num_tokens = topk_idx.shape[0]
    num_topk = topk_idx.shape[1]
    per_rank = tokens_per_expert.shape[0] // tokens_per_rank.shape[0]
    first = rank * per_rank
    counts = cuda.shared.array(MAX_LOCAL_EXPERTS, np.int32)
    rank_count = cuda.shared.array(1, np.int32)
    for e in range(tid, per_rank, num_threads):
        counts[e] = 0
    if tid == 0:
        rank_count[0] = 0
    cuda.syncthreads()
    for t in range(tid, num_tokens, num_threads):
        hit = False
        for j in range(num_topk):
            e = topk_idx[t, j]
            if e >= first and e < first + per_rank:
                cuda.atomic.add(counts, e - first, 1)
                hit = True
            elif rank == 0 and (e < -1 or e >= num_experts):
                record_error(errors, t * num_topk + j + 1)
        is_token_in_rank[t, rank] = hit
        if hit:
            cuda.atomic.add(rank_count, 0, 1)
    cuda.syncthreads()
    for e in range(tid, per_rank, num_threads):
        tokens_per_expert[first + e] = counts[e]
    if tid == 0:
        tokens_per_rank[rank] = rank_count[0]


@cuda.jit(device=True)
def scan_column(is_token_in_rank, send_slot, tokens_per_rank, rank):
    """Block-wide exclusive scan of column ``rank``: each token's slot in rank ``rank``'s region.

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


@cuda.jit(cache=True)
def send_slot_kernel(is_token_in_rank, send_slot, tokens_per_rank):
    """Block ``r``: :func:`scan_column` of column ``r``."""
    scan_column(is_token_in_rank, send_slot, tokens_per_rank, cuda.blockIdx.x)


def check_threads(num_threads: int) -> None:
    """``ValueError`` unless ``num_threads`` suits the scans (a power of two in [32, 1024])."""
    if not (32 <= num_threads <= SCAN_THREADS_MAX and num_threads & (num_threads - 1) == 0):
        raise ValueError(f"num_threads={num_threads}: must be a power of two in [32, {SCAN_THREADS_MAX}]")


def launch_dispatch_layout(
    topk_idx, num_experts: int, tokens_per_rank, tokens_per_expert, is_token_in_rank, errors, num_threads: int,
    stream: int = 0,
) -> None:
    """Fill the layout of ``topk_idx`` (int64 ``[tokens, k]``) into the given outputs.

    Outputs: ``tokens_per_rank`` int32 ``[ranks]``, ``tokens_per_expert`` int32
    ``[experts]``, ``is_token_in_rank`` bool ``[tokens, ranks]``; ``errors`` int32 ``[1]``
    (zeroed by the caller) receives ``1 + t * k + j`` for an out-of-range ``topk_idx[t, j]``.
    ``stream``: CUDA stream pointer (0: default).
    """
    check_threads(num_threads)
    num_ranks = tokens_per_rank.shape[0]
    if num_experts // num_ranks > MAX_LOCAL_EXPERTS:
        raise ValueError(f"num_experts={num_experts}: at most {MAX_LOCAL_EXPERTS} experts per rank")
    launch(dispatch_layout_kernel, num_ranks, num_threads, topk_idx, np.int64(num_experts),
           tokens_per_rank, tokens_per_expert, is_token_in_rank, errors, stream=stream)


def launch_send_slots(is_token_in_rank, send_slot, tokens_per_rank, num_threads: int, stream: int = 0) -> None:
    """``send_slot`` int32 ``[tokens, ranks]``: slot of each token in each rank's region, -1 if not sent;
    ``tokens_per_rank`` int32 ``[ranks]``: the column counts. The scan of dispatch's notify
    kernel (:func:`scan_column`) on its own, as its tests run it."""
    check_threads(num_threads)
    launch(send_slot_kernel, is_token_in_rank.shape[1], num_threads, is_token_in_rank, send_slot, tokens_per_rank,
           stream=stream)
