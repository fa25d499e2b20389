"""A dispatch's handle and its checked routing arguments (no kernel code: ``xmoe.Buffer``'s
signatures name them before any backend is loaded)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class DispatchHandle(NamedTuple):
    """What combine and a cached dispatch need from a dispatch (``handle[0]`` as in DeepEP).

    ``rank_prefix_matrix`` and ``num_tokens_per_rank`` are host NumPy arrays (None after a
    dispatch with ``num_worst_tokens``: the host never learns the counts); the other
    arrays are the kernels' (NumPy on the simulator; on the GPU CuPy arrays, or
    :class:`xmoe.device_memory.DeviceArray` views of memory from PyTorch's allocator for
    PyTorch callers).

    Attributes:
        rank_prefix_matrix: int32 ``[ranks, ranks]``, ``[i][j]`` = tokens sent to rank j by ranks 0..i.
        recv_src_idx: int32 ``[num_recv]``, the source token index of every received row (-1: padding).
        is_token_in_rank: bool ``[tokens, ranks]`` of this rank's tokens.
        send_slot: int32 ``[tokens, ranks]``, slot of each token in each destination's region, -1 if not sent.
        num_tokens_per_rank: int32 ``[ranks]``, tokens this rank sends to each rank.
        recv_offsets: int32 ``[ranks + 1]``, first received row of each source rank.
        num_recv_tokens_per_expert_list: tokens received per local expert, padded to the alignment.
        num_local_experts: experts per rank.
        num_topk: top-k columns of the dispatch (0 without top-k): what combine's weights have.
        max_recv_per_source: the most tokens one source rank sent here (what combine sends back;
            a bound with ``num_worst_tokens``).
        num_recv: ``recv_x``'s length: the rows this rank received, or ``num_worst_tokens``.
    """

    rank_prefix_matrix: np.ndarray | None
    recv_src_idx: Any
    is_token_in_rank: Any
    send_slot: Any
    num_tokens_per_rank: np.ndarray | None
    recv_offsets: Any
    num_recv_tokens_per_expert_list: list[int]
    num_local_experts: int
    num_topk: int
    max_recv_per_source: int
    num_recv: int


class Routing(NamedTuple):
    """A dispatch's checked routing arguments as kernel arrays (see ``Buffer.dispatch``)."""

    is_token_in_rank: Any
    num_tokens_per_expert: Any
    topk_idx: Any
    topk_weights: Any


class LowLatencyHandle(NamedTuple):
    """What a low-latency combine needs from its dispatch (the first five entries as in DeepEP).

    Attributes:
        src_info: int32 ``[local experts, ranks * max tokens]`` (the caller's type): the source
            token of every received row (rows past ``recv_count`` are not written).
        layout_range: int64 ``[local experts, ranks]`` (the caller's type): source ``s``'s rows of
            expert ``e`` are ``layout_range[e, s] >> 32`` onwards, ``layout_range[e, s] & 0xFFFFFFFF`` of them.
        num_max_dispatch_tokens_per_rank, hidden, num_experts: the dispatch's sizes.
        kernel_src_info, kernel_layout_range: the same two arrays as the kernels take them.
        origin: the dispatch's payload origin (whose framework a zero-copy buffer is returned in).
    """

    src_info: Any
    layout_range: Any
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    kernel_src_info: Any
    kernel_layout_range: Any
    origin: Any
