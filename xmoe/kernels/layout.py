"""The dispatch layout kernel: tokens per rank / per expert and token-in-rank flags.

Experts are split evenly and in order across ranks: expert ``e`` lives on rank
``e // (num_experts // num_ranks)``. One block per rank writes every output element
of its rank exactly once (no zero-initialised accumulators), so the outputs need no
clearing before a launch.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from xmoe.comm.protocol import report_error
from xmoe.comm.status import ERR_EXPERT_ID, ERR_LAYOUT, FIELD_SHIFT, LAYOUT_DUPLICATE
from xmoe.kernels.launch import launch
from xmoe.layout.symmetric import MAX_LOCAL_EXPERTS


@cuda.jit(device=True)
def has_duplicate(topk_idx, t):
    """Whether token ``t``'s row of ``topk_idx`` names one expert (not -1) twice."""
    num_topk = topk_idx.shape[1]
    for j in range(num_topk):
        e = topk_idx[t, j]
        if e >= 0:
            for j2 in range(j + 1, num_topk):
                if topk_idx[t, j2] == e:
                    return True
    return False


@cuda.jit(cache=True)
def dispatch_layout_kernel(topk_idx, num_experts, tokens_per_rank, tokens_per_expert, is_token_in_rank, errors):
    """Block ``r``: rank ``r``'s entries of the outputs; block 0 also reports bad ids
    (``ERR_EXPERT_ID``, detail ``t * k + j``) and repeated ids (``ERR_LAYOUT``) to ``errors``."""
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
                report_error(errors, ERR_EXPERT_ID, t * num_topk + j)
        if rank == 0 and has_duplicate(topk_idx, t):
            report_error(errors, ERR_LAYOUT + (LAYOUT_DUPLICATE << FIELD_SHIFT), t)
        is_token_in_rank[t, rank] = hit
        if hit:
            cuda.atomic.add(rank_count, 0, 1)
    cuda.syncthreads()
    for e in range(tid, per_rank, num_threads):
        tokens_per_expert[first + e] = counts[e]
    if tid == 0:
        tokens_per_rank[rank] = rank_count[0]


def launch_dispatch_layout(
    topk_idx, num_experts: int, tokens_per_rank, tokens_per_expert, is_token_in_rank, errors, num_threads: int,
    stream: int = 0,
) -> None:
    """Fill the layout of ``topk_idx`` (int64 ``[tokens, k]``) into the given outputs.

    Outputs: ``tokens_per_rank`` int32 ``[ranks]``, ``tokens_per_expert`` int32
    ``[experts]`` (at most MAX_LOCAL_EXPERTS a rank: ``Buffer`` checks), ``is_token_in_rank`` bool
    ``[tokens, ranks]``; ``errors`` int32 ``[2]``
    (zero before) receives the first bad entry as ``comm/status.py`` codes it.
    ``stream``: CUDA stream pointer (0: default).
    """
    launch(dispatch_layout_kernel, tokens_per_rank.shape[0], num_threads, stream, topk_idx=topk_idx, num_experts=np.int64(num_experts),
           tokens_per_rank=tokens_per_rank, tokens_per_expert=tokens_per_expert, is_token_in_rank=is_token_in_rank,
           errors=errors)
