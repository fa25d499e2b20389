"""The normal (high-throughput) mode's host side: dispatch, cached dispatch, combine, handles.

Arguments reach this module checked, as kernel arrays (``buffer.py`` checks them). Each
call picks the layout of its shape (``layout/symmetric.py``), launches the kernels of
``kernels/dispatch.py`` and ``kernels/combine.py`` through launches prepared once per
shape and kept here (a call repacks only its own arrays, the handle's included), and
builds the handle. Only a dispatch without a handle and without ``num_worst_tokens``
waits for the GPU: for the counts that size its outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xmoe.comm.device import transport
from xmoe.config import Config
from xmoe.ep.handle import DispatchHandle, Routing
from xmoe.ep.state import BufferState
from xmoe.event import HostPlan, StreamPlan
from xmoe.device_memory import DeviceArray, data_pointer, empty, kernel_view, part, xp
from xmoe.interop import Origin, bits_of, new_output
from xmoe.kernels.combine import COMBINE_FIELDS, combine_kernel
from xmoe.kernels.dispatch import DISPATCH_FIELDS, NOTIFY, RECEIVE, SEND, dispatch_kernel
from xmoe.kernels.launch import Prepared
from xmoe.layout.symmetric import CALL_CODES, DTYPE_CODES, SymmetricLayout, size_hint


_WORDS = {w: np.dtype(f"u{w}") for w in (8, 4, 2, 1)}


def as_words(payload: Any, word: np.dtype | None = None) -> Any:
    """The rows of ``payload`` ``[rows, hidden]`` as unsigned ``word``s; by default the widest (at
    most 8 bytes) that divide a row and the address."""
    row_bytes = payload.shape[1] * payload.itemsize
    if word is None:
        span = row_bytes | data_pointer(payload) | 8
        word = _WORDS[span & -span]  # its lowest set bit: the widest power of two dividing both, at most 8
    if type(payload) is DeviceArray:
        return DeviceArray(payload.ptr, (payload.shape[0], row_bytes // word.itemsize), word, payload.owner)
    return payload.view(np.uint8).reshape(payload.shape[0], row_bytes).view(word)


def _unused_by_cached_dispatch() -> dict[str, Any]:
    """The dispatch kernel's arguments that a cached dispatch (send + receive, no top-k) does not read."""
    return dict(topk_idx=empty((0, 0), np.int64), topk_weights=empty((0, 0), np.float32),
                is_token_in_rank=empty((0, 0), np.bool_), expert_counts=empty((0,), np.int32), call_id=0, recv_topk_idx=empty((0, 0), np.int64),
                recv_topk_weights=empty((0, 0), np.float32))




class NormalMode:
    """The normal mode of one Buffer (see the module); ``state`` is the Buffer's."""

    def __init__(self, state: BufferState) -> None:
        self.state = state
        ranks = state.num_ranks
        self._sent_per_rank = kernel_view(xp().empty(ranks, np.int32))
        self._launches: dict[tuple, Prepared] = {}

    # ------------------------------------------------------------- helpers
    def layout(self, row_bytes: int, num_topk: int, rows: int, what: str, num_scales: int = 0) -> SymmetricLayout:
        """The layout for ``rows`` per source of ``row_bytes``, ``num_topk`` and ``num_scales``;
        ``ValueError`` with the size needed when the block is too small."""
        state = self.state
        layout = state.layout(row_bytes, num_topk, num_scales)
        if layout is None or rows > layout.capacity:
            need = size_hint(rows, state.num_ranks, row_bytes, num_topk, num_scales)
            raise ValueError(
                f"num_nvl_bytes={state.nbytes} is too small for {what} of {rows} tokens per rank "
                f"({row_bytes} bytes each, top-{num_topk}): it needs {need} bytes (Buffer.get_nvl_size_hint)")
        return layout

    def _prepared(self, key: tuple, build: Any) -> Prepared:
        prepared = self._launches.get(key)
        if prepared is None:
            prepared = self._launches[key] = build()
        return prepared

    def _dispatch_launch(self, phases: int, layout: SymmetricLayout, word: np.dtype,
                         call_shape: tuple[int, ...], config: Config, args: dict[str, Any],
                         unused: Any = dict) -> Prepared:
        """The dispatch launch of ``phases`` for ``layout``, payload words ``word`` (``x``'s and
        ``recv_x``'s) and this call shape,
        prepared once with ``args`` (the per-call arrays) and ``unused()`` (what these phases
        do not read)."""
        state = self.state
        status = state.status

        def build() -> Prepared:
            fixed = dict(phases=phases, peers=state.peer_offsets, rank=state.rank, calls=state.calls, work=state.work,
                         timeout_ns=config.timeout_ns, errors=status.errors, ready=status.ready,
                         rank_counts=status.rank_counts, recv_expert_counts=status.expert_counts,
                         sent_per_rank=self._sent_per_rank, call_shape=state.call_shape(call_shape),
                         halves=state.halves(layout, DISPATCH_FIELDS, word))
            return Prepared(dispatch_kernel(transport(config.force_put)), config.num_sms, config.num_threads,
                            fixed | unused() | args, tuple(args), spins=bool(phases & (RECEIVE | NOTIFY)))

        return self._prepared(("dispatch", phases, id(layout), word, call_shape, config), build)

    def _begin(self, call: str, origin: Origin, row_bytes: int, num_topk: int, num_local_experts: int,
               timeout_s: float) -> tuple[tuple[int, ...], int]:
        """The call's meta words (``layout/symmetric.py``'s META_FIELDS) and the host's number of the call."""
        meta = (CALL_CODES[call], DTYPE_CODES[origin.dtype], row_bytes, num_topk, num_local_experts, 0)
        return meta, self.state.begin(call, meta, timeout_s)

    # ------------------------------------------------------------ dispatch
    def dispatch(self, payload: Any, scales: Any, origin: Origin, routing: Routing, num_local_experts: int,
                 alignment: int, num_worst_tokens: int, config: Config, plan: StreamPlan | HostPlan) -> tuple:
        """A dispatch without a handle (see ``Buffer.dispatch``): notify and send in one launch,
        then the receive, or all three at once into ``num_worst_tokens`` rows. ``scales``: an
        FP8 payload's float32 scales ``[tokens, hidden / 128]`` (``[tokens, 0]`` otherwise); the
        received ones come back with ``recv_x`` as a tuple."""
        state = self.state
        ranks = state.num_ranks
        num_tokens = payload.shape[0]
        idx, weights = routing.topk_idx, routing.topk_weights
        row_bytes = payload.shape[1] * payload.itemsize
        layout = self.layout(row_bytes, idx.shape[1], num_tokens, "dispatch", scales.shape[1])
        words = as_words(payload)
        meta, seq = self._begin("dispatch", origin, row_bytes, idx.shape[1], num_local_experts, config.timeout_s)
        # the handle's arrays in one allocation: send slots, receive offsets, room for the
        # source index of every row this rank can receive
        src_idx_first = num_tokens * ranks + ranks + 1
        handle_block = new_output(src_idx_first + max(ranks * layout.capacity, num_worst_tokens), np.int32, origin,
                                  raw=True, stream=plan.pointer)[0]
        send_slot = part(handle_block, 0, (num_tokens, ranks))
        recv_offsets = part(handle_block, num_tokens * ranks, (ranks + 1,))
        sends = dict(x=words, x_scales=scales, topk_idx=idx, topk_weights=weights, is_token_in_rank=routing.is_token_in_rank,
                     expert_counts=routing.num_tokens_per_expert,
                     send_slot=send_slot, recv_offsets=recv_offsets, call_id=seq)
        if num_worst_tokens:  # the outputs are sized already: everything in one launch, no waiting
            counts, per_expert, num_recv, phases = None, None, int(num_worst_tokens), NOTIFY | SEND | RECEIVE
        else:  # notify + send now; the receive once the host has sized the outputs from the counts
            no_rows = dict(recv_x=empty((0, 0), words.dtype), recv_x_scales=empty((0, 0), np.float32),
                           recv_src_idx=empty((0,), np.int32),
                           recv_topk_idx=empty((0, 0), np.int64), recv_topk_weights=empty((0, 0), np.float32))
            self._dispatch_launch(NOTIFY | SEND, layout, words.dtype, meta, config,
                                  sends | no_rows)(plan.pointer, **sends, **no_rows)
            StreamPlan.waited_s += state.wait_for_counts(seq, config.timeout_s)
            counts, per_expert = state.status.counts(num_local_experts)
            num_recv, phases = int(counts[:, state.rank].sum()), RECEIVE  # counts: row = source
        recv_src_idx = part(handle_block, src_idx_first, (num_recv,))
        recv_x, recv_x_out = new_output((num_recv, payload.shape[1]), payload.dtype, origin, bits_of(origin),
                                        raw=True, stream=plan.pointer)
        k = idx.shape[1]
        recv_idx, recv_idx_out = new_output((num_recv, k), np.int64, origin, raw=True, stream=plan.pointer)
        recv_weights, recv_weights_out = new_output((num_recv, k), np.float32, origin, raw=True, stream=plan.pointer)
        recv_scales, recv_x_out = self._with_scales(recv_x_out, num_recv, scales.shape[1], origin, plan)
        recv_words = as_words(recv_x, words.dtype)  # a new tensor: aligned for any word
        receives = dict(recv_x=recv_words, recv_x_scales=recv_scales, recv_src_idx=recv_src_idx,
                        recv_topk_idx=recv_idx, recv_topk_weights=recv_weights)
        self._dispatch_launch(phases, layout, words.dtype, meta, config,
                              sends | receives)(plan.pointer, **sends, **receives)
        handle = self._handle(counts, per_expert, num_recv, routing.is_token_in_rank, send_slot, recv_offsets,
                              recv_src_idx, alignment, num_local_experts, k, layout.capacity)
        state.raise_on_error()
        return recv_x_out(), recv_idx_out(), recv_weights_out(), list(handle.num_recv_tokens_per_expert_list), handle

    def cached_dispatch(self, payload: Any, scales: Any, origin: Origin, handle: DispatchHandle, config: Config,
                        plan: StreamPlan | HostPlan) -> Any:
        """A dispatch that repeats ``handle``'s routing with a new payload (``scales`` as in
        :meth:`dispatch`): one launch; ``recv_x``."""
        recv_x, recv_x_out = new_output((handle.num_recv, payload.shape[1]), payload.dtype, origin, bits_of(origin),
                                        raw=True, stream=plan.pointer)
        recv_scales, recv_x_out = self._with_scales(recv_x_out, handle.num_recv, scales.shape[1], origin, plan)
        words = as_words(payload)
        recv_words = as_words(recv_x, words.dtype)
        row_bytes = payload.shape[1] * payload.itemsize
        layout = self.layout(row_bytes, 0, payload.shape[0], "dispatch", scales.shape[1])
        meta, _ = self._begin("dispatch", origin, row_bytes, 0, handle.num_local_experts, config.timeout_s)
        args = dict(x=words, x_scales=scales, send_slot=handle.send_slot, recv_offsets=handle.recv_offsets,
                    recv_x=recv_words, recv_x_scales=recv_scales, recv_src_idx=handle.recv_src_idx)
        launch = self._dispatch_launch(SEND | RECEIVE, layout, words.dtype, meta, config, args,
                                       _unused_by_cached_dispatch)
        launch(plan.pointer, **args)
        self.state.raise_on_error()
        return recv_x_out()

    @staticmethod
    def _with_scales(recv_x_out: Any, rows: int, num_scales: int, origin: Origin,
                     plan: StreamPlan | HostPlan) -> tuple[Any, Any]:
        """The received scales' output (``[rows, 0]`` without FP8) and the function returning
        ``recv_x`` as the caller sees it: with FP8, the tuple of rows and scales."""
        if not num_scales:
            return empty((rows, 0), np.float32), recv_x_out
        recv_scales, recv_scales_out = new_output((rows, num_scales), np.float32, origin, raw=True,
                                                  stream=plan.pointer)
        return recv_scales, lambda: (recv_x_out(), recv_scales_out())

    def _handle(self, counts: np.ndarray | None, per_expert: np.ndarray | None, num_recv: int, in_rank: Any,
                send_slot: Any, recv_offsets: Any, recv_src_idx: Any, alignment: int, num_local_experts: int,
                num_topk: int, capacity: int) -> DispatchHandle:
        """The handle of a dispatch from its count matrix ``counts`` (row = source) and received
        tokens per expert; with ``counts`` None (worst-case outputs of ``num_recv`` rows) the
        host knows no counts, and a source sent at most the ``capacity`` rows of its region."""
        if counts is None:
            return DispatchHandle(None, recv_src_idx, in_rank, send_slot, None, recv_offsets, [], num_local_experts,
                                  num_topk, min(num_recv, capacity), num_recv)
        if alignment > 1:
            per_expert = -(-per_expert // alignment) * alignment
        return DispatchHandle(counts.cumsum(axis=0, dtype=np.int32), recv_src_idx, in_rank, send_slot,
                              counts[self.state.rank], recv_offsets, per_expert.tolist(), num_local_experts, num_topk,
                              int(counts[:, self.state.rank].max()), num_recv)

    # ------------------------------------------------------------- combine
    def combine(self, payload: Any, origin: Origin, weights: Any, handle: DispatchHandle, config: Config,
                plan: StreamPlan | HostPlan) -> tuple[Any, Any]:
        """Every received row back to its source, summed there (see ``Buffer.combine``):
        ``(combined_x, combined_topk_weights)`` as the caller's type (weights: None without)."""
        state = self.state
        num_tokens = handle.is_token_in_rank.shape[0]
        out, out_finish = new_output((num_tokens, payload.shape[1]), payload.dtype, origin, bits_of(origin),
                                     raw=True, stream=plan.pointer)
        has_weights = weights is not None
        if has_weights:
            out_weights, out_weights_finish = new_output((num_tokens, weights.shape[1]), np.float32, origin, raw=True,
                                                         stream=plan.pointer)
        else:
            weights, out_weights = empty((handle.num_recv, 0), np.float32), empty((num_tokens, 0), np.float32)
        words = as_words(payload)
        out_words = as_words(out, words.dtype)  # a new tensor: aligned for any word
        row_bytes = payload.shape[1] * payload.itemsize
        layout = self.layout(row_bytes, weights.shape[1], handle.max_recv_per_source, "combine")
        meta, _ = self._begin("combine", origin, row_bytes, weights.shape[1], handle.num_local_experts,
                              config.timeout_s)
        args = dict(x=words, topk_weights=weights, recv_offsets=handle.recv_offsets, send_slot=handle.send_slot,
                    out=out_words, out_topk_weights=out_weights)
        element = np.dtype(np.uint16 if origin.dtype == "bfloat16" else np.float32)

        def build() -> Prepared:
            fixed = dict(peers=state.peer_offsets, rank=state.rank, calls=state.calls, work=state.work,
                         timeout_ns=config.timeout_ns, errors=state.status.errors, call_shape=state.call_shape(meta),
                         halves=state.halves(layout, COMBINE_FIELDS, words.dtype))
            return Prepared(combine_kernel(transport(config.force_put), element, words.dtype), config.num_sms,
                            config.num_threads, fixed | args, tuple(args), spins=True)

        key = ("combine", id(layout), element, words.dtype, meta, config)
        self._prepared(key, build)(plan.pointer, **args)
        state.raise_on_error()
        return out_finish(), out_weights_finish() if has_weights else None
