"""Buffer: the DeepEP-shaped entry point for layout, dispatch and combine.

One Buffer owns one symmetric block of ``num_nvl_bytes`` on every rank. Every call is
collective (all ranks call the same sequence of dispatch/combine) and numbered; the
call number picks the parity half of the block (see ``layout/symmetric.py``) and is
the value of the signals, so the block is reused call after call with no reset.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from xmoe import runtime
from xmoe.comm import get_heap
from xmoe.comm.device import ERR_MISMATCH, ERR_TIMEOUT, transport
from xmoe.config import Config
from xmoe.event import EventOverlap, HostPlan, StreamPlan, check_previous_event
from xmoe.interop import BFLOAT16, Origin, as_array, new_output, on_gpu, poisoned, to_host, xp
from xmoe.kernels.combine import launch_combine_reduce, launch_combine_send
from xmoe.kernels.launch import static_arg
from xmoe.kernels.dispatch import (
    launch_dispatch_copy_out,
    launch_dispatch_send,
    launch_dispatch_wait,
    wait_info_length,
)
from xmoe.layout.dispatch import launch_dispatch_layout, launch_send_slots
from xmoe.layout.symmetric import SymmetricLayout, capacity_for, size_hint, symmetric_layout

PAYLOAD_DTYPES = ("float32", "bfloat16")


def _empty(shape: tuple[int, ...] | int, dtype: Any) -> Any:
    """A working array of the backend (poisoned under ``XMOE_POISON=1``)."""
    return poisoned(xp().empty(shape, dtype))


class DispatchHandle(NamedTuple):
    """What combine and a cached dispatch need from a dispatch (``handle[0]`` as in DeepEP).

    ``rank_prefix_matrix`` is a host NumPy array; the other arrays live with the kernels
    (NumPy on the simulator, CuPy on the GPU).

    Attributes:
        rank_prefix_matrix: int32 ``[ranks, ranks]``, ``[i][j]`` = tokens sent to rank j by ranks 0..i.
        recv_src_idx: int32 ``[num_recv]``, the source token index of every received row.
        is_token_in_rank: bool ``[tokens, ranks]`` of this rank's tokens.
        send_slot: int32 ``[tokens, ranks]``, slot of each token in each destination's region, -1 if not sent.
        num_tokens_per_rank: int32 ``[ranks]``, tokens this rank sends to each rank.
        recv_offsets: int32 ``[ranks + 1]``, first received row of each source rank.
        num_recv_tokens_per_expert_list: tokens received per local expert, padded to the alignment.
        num_local_experts: experts per rank.
    """

    rank_prefix_matrix: np.ndarray
    recv_src_idx: Any
    is_token_in_rank: Any
    send_slot: Any
    num_tokens_per_rank: Any
    recv_offsets: Any
    num_recv_tokens_per_expert_list: list[int]
    num_local_experts: int


def _check_array(array: Any, origin: Origin, name: str, dtype: Any, shape: tuple[int | None, ...]) -> None:
    """``ValueError`` naming ``name`` unless ``array`` has ``dtype`` and ``shape`` (None: any size)."""
    if origin.dtype != np.dtype(dtype).name:
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype).name}, got {origin.dtype}")
    if array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        wanted = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {wanted}, got {list(array.shape)}")


def _check_payload(array: Any, origin: Origin, name: str, rows: int | None = None) -> None:
    if origin.dtype not in PAYLOAD_DTYPES:
        raise ValueError(f"{name}: expected dtype float32 or bfloat16, got {origin.dtype}")
    _check_array(array, origin, name, origin.dtype, (rows, None))


def _data_pointer(array: Any) -> int:
    return array.ctypes.data if isinstance(array, np.ndarray) else array.data.ptr


def _as_words(payload: Any) -> Any:
    """The rows of ``payload`` ``[rows, hidden]`` as the widest unsigned words that divide a row."""
    row_bytes = payload.shape[1] * payload.itemsize
    word = next(w for w in (8, 4, 2, 1) if row_bytes % w == 0 and _data_pointer(payload) % w == 0)
    return payload.view(np.uint8).reshape(payload.shape[0], row_bytes).view(np.dtype(f"u{word}"))


@lru_cache(maxsize=64)
def _layout_for(nbytes: int, num_ranks: int, row_bytes: int, num_topk: int, num_local_experts: int) -> SymmetricLayout | None:
    capacity = capacity_for(nbytes, num_ranks, row_bytes, num_topk, num_local_experts)
    return None if capacity < 0 else symmetric_layout(num_ranks, capacity, row_bytes, num_topk, num_local_experts)


class Buffer:
    """Communication buffer for expert-parallel dispatch and combine.

    Args:
        group: the :class:`xmoe.Group` that ``xmoe.init()`` returned.
        num_nvl_bytes: bytes of symmetric memory per rank for intranode traffic; see
            :meth:`get_nvl_size_hint`.
        num_rdma_bytes: internode buffer bytes; must be 0 (intranode only for now).
        low_latency_mode: must be False (the low-latency path is not built yet).
    """

    def __init__(self, group: runtime.Group, num_nvl_bytes: int, num_rdma_bytes: int = 0, low_latency_mode: bool = False) -> None:
        runtime.get_group()
        if not isinstance(group, runtime.Group):
            raise ValueError(f"group: expected the xmoe.Group that xmoe.init() returned, got {type(group).__name__}")
        if not isinstance(num_nvl_bytes, (int, np.integer)) or num_nvl_bytes <= 0:
            raise ValueError(f"num_nvl_bytes={num_nvl_bytes!r}: must be a positive int")
        if num_rdma_bytes != 0:
            raise ValueError(f"num_rdma_bytes={num_rdma_bytes}: internode (RDMA) buffers are not supported yet; pass 0")
        if low_latency_mode:
            raise ValueError("low_latency_mode=True: the low-latency path is not supported yet")
        self.group = group
        self.rank = group.rank
        self.num_ranks = group.world_size
        self.num_nvl_bytes = int(num_nvl_bytes)
        self._block = get_heap(group).alloc(self.num_nvl_bytes)
        self._seq = 0
        self._done_counter = xp().zeros(1, np.int32)
        self._failure: str | None = None
        self._views: dict[tuple[int, int, int, int], dict[str, Any]] = {}
        self._comm_stream = None

    # ----------------------------------------------------------------- sizes
    @staticmethod
    def get_nvl_size_hint(
        num_max_tokens: int, hidden: int, num_ranks: int, num_experts: int, num_topk: int = 0, dtype: Any = BFLOAT16
    ) -> int:
        """Bytes of ``num_nvl_bytes`` that dispatch and combine need.

        Args:
            num_max_tokens: most tokens any rank passes to one call.
            hidden: channels per token.
            num_ranks: ranks of the group.
            num_experts: experts in total (a multiple of ``num_ranks``).
            num_topk: top-k entries per token (0 without top-k).
            dtype: payload dtype of the widest call (float32 or bfloat16).
        """
        row_bytes = hidden * np.dtype(dtype).itemsize
        return size_hint(num_max_tokens, num_ranks, row_bytes, num_topk, num_experts // num_ranks)

    # --------------------------------------------------------------- helpers
    def _check_usable(self) -> None:
        runtime.get_group()
        if self._block is None:
            raise RuntimeError("this Buffer was destroyed")
        if self._failure is not None:
            raise RuntimeError(f"this Buffer is unusable after an earlier failure ({self._failure}); create a new Buffer")

    def _config(self, config: Config | None) -> Config:
        if config is not None and not isinstance(config, Config):
            raise ValueError(f"config: expected an xmoe.Config or None, got {type(config).__name__}")
        return (config or Config()).resolved(self.group.backend)

    def _layout(self, row_bytes: int, num_topk: int, num_local_experts: int, rows: int, what: str) -> SymmetricLayout:
        layout = _layout_for(self.num_nvl_bytes, self.num_ranks, row_bytes, num_topk, num_local_experts)
        if layout is None or rows > layout.capacity:
            need = size_hint(rows, self.num_ranks, row_bytes, num_topk, num_local_experts)
            raise ValueError(
                f"num_nvl_bytes={self.num_nvl_bytes} is too small for {what} of {rows} tokens per rank "
                f"({row_bytes} bytes each, top-{num_topk}): it needs {need} bytes (Buffer.get_nvl_size_hint)"
            )
        return layout

    def _fields(self, layout: SymmetricLayout, parity: int, word: np.dtype, element: np.dtype) -> dict[str, Any]:
        """Peer tuples and local views of half ``parity``; the payload as words and as elements,
        packed once for the kernels."""
        key = (id(layout), parity, np.dtype(word).itemsize, np.dtype(element).num)
        fields = self._views.get(key)
        if fields is None:
            peers = [layout.views(block, parity) for block in self._block.peers]
            fields = {name: static_arg(tuple(p[name] for p in peers)) for name in layout.fields}
            fields["x_words"] = static_arg(tuple(p["x"].view(word) for p in peers))
            local = dict(peers[self.rank], x_words=peers[self.rank]["x"].view(word),
                         x_elements=peers[self.rank]["x"].view(element))
            fields["local"] = {name: static_arg(view) for name, view in local.items()}
            self._views[key] = fields
        return fields

    def _plan(self, framework: str, previous_event: EventOverlap | None, async_finish: bool) -> StreamPlan | HostPlan:
        check_previous_event(previous_event)
        if not on_gpu():
            return HostPlan()
        if async_finish and self._comm_stream is None:
            import cupy

            self._comm_stream = cupy.cuda.Stream(non_blocking=True)
        return StreamPlan(framework, self._comm_stream, previous_event, async_finish)

    def _next_call(self) -> tuple[int, int]:
        self._seq += 1
        return self._seq, self._seq % 2

    def _check_errors(self, code: int, what: str, timeout_s: float) -> None:
        """Raise, and retire this Buffer, when a kernel's error ``code`` is not 0."""
        if code == 0:
            return
        if code >= ERR_MISMATCH:
            peer = code - ERR_MISMATCH
            message = (
                f"{what}: rank {peer} called {what} with a different hidden size, top-k or expert count "
                f"than rank {self.rank}"
            )
        else:
            peer = code - ERR_TIMEOUT
            message = f"{what}: rank {peer} never arrived within {timeout_s} s (did every rank call {what}?)"
        self._failure = message
        raise RuntimeError(message)

    def _num_local_experts(self, num_experts: Any) -> int:
        if not isinstance(num_experts, (int, np.integer)) or num_experts <= 0:
            raise ValueError(f"num_experts={num_experts!r}: must be a positive int")
        if num_experts % self.num_ranks:
            raise ValueError(f"num_experts={num_experts} is not divisible by the {self.num_ranks} ranks")
        return int(num_experts) // self.num_ranks

    # ---------------------------------------------------------------- layout
    def get_dispatch_layout(
        self, topk_idx: Any, num_experts: int, previous_event: EventOverlap | None = None, async_finish: bool = False
    ) -> tuple[Any, None, Any, Any, EventOverlap]:
        """Count the tokens each rank and each expert receives from this rank.

        Args:
            topk_idx: int64 ``[tokens, k]``, expert ids in ``[0, num_experts)``, -1 for a masked slot.
            num_experts: experts in total, a multiple of the rank count.
            previous_event / async_finish: as in DeepEP (see :class:`EventOverlap`).

        Returns:
            ``(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event)``:
            int32 ``[ranks]``, None (intranode), int32 ``[num_experts]``, bool ``[tokens, ranks]``.
        """
        self._check_usable()
        idx, origin = as_array(topk_idx, "topk_idx")
        _check_array(idx, origin, "topk_idx", np.int64, (None, None))
        self._num_local_experts(num_experts)
        config = self._config(None)
        plan = self._plan(origin.framework, previous_event, async_finish)
        arrays = xp()
        tokens_per_rank, per_rank_out = new_output(self.num_ranks, np.int32, origin)
        tokens_per_expert, per_expert_out = new_output(num_experts, np.int32, origin)
        is_token_in_rank, in_rank_out = new_output((idx.shape[0], self.num_ranks), np.bool_, origin)
        errors = arrays.zeros(1, np.int32)
        launch_dispatch_layout(idx, num_experts, tokens_per_rank, tokens_per_expert, is_token_in_rank, errors,
                               config.num_threads, plan.pointer)
        plan.synchronize()
        code = int(to_host(errors)[0])
        if code:
            t, j = divmod(code - 1, idx.shape[1])
            raise ValueError(f"topk_idx[{t}, {j}]={int(to_host(idx[t, j]))}: expert ids must be -1 or in "
                             f"[0, {num_experts})")
        return per_rank_out(), None, per_expert_out(), in_rank_out(), plan.finish()

    # -------------------------------------------------------------- dispatch
    def dispatch(
        self,
        x: Any,
        handle: DispatchHandle | None = None,
        num_tokens_per_rank: Any = None,
        is_token_in_rank: Any = None,
        num_tokens_per_expert: Any = None,
        topk_idx: Any = None,
        topk_weights: Any = None,
        expert_alignment: int = 1,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
    ) -> tuple[Any, Any, Any, list[int], DispatchHandle, EventOverlap]:
        """Send each token to every rank that holds one of its experts.

        Args:
            x: float32 or bfloat16 ``[tokens, hidden]``; hidden is the same on every rank.
            handle: a previous dispatch's handle: repeat its routing (cached mode); the
                layout arguments and top-k are then not passed.
            num_tokens_per_rank: int32 ``[ranks]`` from :meth:`get_dispatch_layout`.
            is_token_in_rank: bool ``[tokens, ranks]`` from :meth:`get_dispatch_layout`.
            num_tokens_per_expert: int32 ``[experts]`` from :meth:`get_dispatch_layout`.
            topk_idx: int64 ``[tokens, k]`` or None.
            topk_weights: float32 ``[tokens, k]`` or None (needs ``topk_idx``).
            expert_alignment: per-expert received counts are padded to a multiple of it.
            config: launch configuration; None for the defaults.
            previous_event / async_finish: as in DeepEP (see :class:`EventOverlap`).

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``:
            ``recv_x`` ``[recv, hidden]`` ordered by source rank then source token;
            ``recv_topk_idx`` int64 ``[recv, k]`` local expert ids (-1: not on this rank);
            ``recv_topk_weights`` float32 ``[recv, k]`` (0 where the id is -1), both None
            without top-k or in cached mode; a list of ints per local expert.
        """
        self._check_usable()
        config = self._config(config)
        payload, origin = as_array(x, "x")
        _check_payload(payload, origin, "x")
        num_tokens = payload.shape[0]
        plan = self._plan(origin.framework, previous_event, async_finish)
        if handle is not None:
            routing = self._cached_routing(handle, num_tokens, num_tokens_per_rank, is_token_in_rank,
                                           num_tokens_per_expert, topk_idx, topk_weights)
        else:
            routing = self._new_routing(num_tokens, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                                        topk_idx, topk_weights, expert_alignment, config, plan)
        in_rank, send_slot, send_counts, expert_counts, idx, weights = routing
        num_local_experts = expert_counts.shape[0] // self.num_ranks
        row_bytes = payload.shape[1] * payload.itemsize
        layout = self._layout(row_bytes, idx.shape[1], num_local_experts, num_tokens, "dispatch")
        words = _as_words(payload)
        seq, parity = self._next_call()
        fields = self._fields(layout, parity, words.dtype, payload.dtype)
        local = fields["local"]
        launch_dispatch_send(
            transport(config.force_put), config.num_sms, config.num_threads, plan.pointer, words, idx, weights,
            send_slot, send_counts, expert_counts, fields["x_words"], local["x_words"], fields["src_idx"],
            local["src_idx"], fields["topk_idx"], local["topk_idx"], fields["topk_weights"], local["topk_weights"],
            fields["meta"], local["meta"], fields["signals"], local["signals"], self.rank, seq, row_bytes,
            self._done_counter,
        )
        ranks = self.num_ranks
        info = _empty(wait_info_length(ranks, num_local_experts), np.int32)
        launch_dispatch_wait(
            config.num_threads, plan.pointer, local["signals"], local["meta"], self.rank, seq, row_bytes, idx.shape[1],
            int(config.timeout_s * 1e9), info,
        )
        plan.synchronize()
        host_info = to_host(info)
        self._check_errors(int(host_info[0]), "dispatch", config.timeout_s)
        counts = host_info[1 : 1 + ranks * ranks].reshape(ranks, ranks)
        recv_per_expert = host_info[1 + ranks * ranks : 1 + ranks * ranks + num_local_experts]
        recv_offsets = info[-(ranks + 1):]
        num_recv = int(host_info[-1])
        bf16 = origin.dtype == "bfloat16"
        recv_x, recv_x_out = new_output((num_recv, payload.shape[1]), payload.dtype, origin, bf16)
        recv_src_idx = _empty(num_recv, np.int32)
        recv_idx, recv_idx_out = new_output((num_recv, idx.shape[1]), np.int64, origin)
        recv_weights, recv_weights_out = new_output((num_recv, idx.shape[1]), np.float32, origin)
        launch_dispatch_copy_out(
            config.num_sms, config.num_threads, plan.pointer, local["x_words"], local["src_idx"], local["topk_idx"],
            local["topk_weights"], recv_offsets, _as_words(recv_x), recv_src_idx, recv_idx, recv_weights,
        )
        if handle is None:
            alignment = int(expert_alignment)
            per_expert = [int(-(-int(c) // alignment) * alignment) for c in recv_per_expert]
            handle = DispatchHandle(np.cumsum(counts, axis=0, dtype=np.int32), recv_src_idx, in_rank, send_slot,
                                    send_counts, recv_offsets, per_expert, num_local_experts)
        has_topk = topk_idx is not None
        return (
            recv_x_out(),
            recv_idx_out() if has_topk else None,
            recv_weights_out() if has_topk and topk_weights is not None else None,
            list(handle.num_recv_tokens_per_expert_list),
            handle,
            plan.finish(),
        )

    def _cached_routing(self, handle, num_tokens, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                        topk_idx, topk_weights):
        if not isinstance(handle, DispatchHandle):
            raise ValueError(f"handle: expected the DispatchHandle a dispatch returned, got {type(handle).__name__}")
        passed = [name for name, value in (("num_tokens_per_rank", num_tokens_per_rank),
                                           ("is_token_in_rank", is_token_in_rank),
                                           ("num_tokens_per_expert", num_tokens_per_expert),
                                           ("topk_idx", topk_idx), ("topk_weights", topk_weights)) if value is not None]
        if passed:
            raise ValueError(f"{', '.join(passed)}: not taken with handle= (cached dispatch repeats the handle's routing)")
        if handle.is_token_in_rank.shape != (num_tokens, self.num_ranks):
            raise ValueError(f"x: {num_tokens} tokens, but the handle routes {handle.is_token_in_rank.shape[0]} tokens "
                             f"over {handle.is_token_in_rank.shape[1]} ranks")
        arrays = xp()
        return (handle.is_token_in_rank, handle.send_slot, handle.num_tokens_per_rank,
                arrays.zeros(handle.num_local_experts * self.num_ranks, np.int32),
                _empty((num_tokens, 0), np.int64), _empty((num_tokens, 0), np.float32))

    def _new_routing(self, num_tokens, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                     topk_weights, expert_alignment, config, plan):
        missing = [name for name, value in (("num_tokens_per_rank", num_tokens_per_rank),
                                            ("is_token_in_rank", is_token_in_rank),
                                            ("num_tokens_per_expert", num_tokens_per_expert)) if value is None]
        if missing:
            raise ValueError(f"{', '.join(missing)}: required without handle= (from get_dispatch_layout)")
        if not isinstance(expert_alignment, (int, np.integer)) or expert_alignment < 1:
            raise ValueError(f"expert_alignment={expert_alignment!r}: must be an int >= 1")
        ranks = self.num_ranks
        arrays = xp()
        per_rank, origin = as_array(num_tokens_per_rank, "num_tokens_per_rank")
        _check_array(per_rank, origin, "num_tokens_per_rank", np.int32, (ranks,))
        in_rank, origin = as_array(is_token_in_rank, "is_token_in_rank")
        _check_array(in_rank, origin, "is_token_in_rank", np.bool_, (num_tokens, ranks))
        expert_counts, origin = as_array(num_tokens_per_expert, "num_tokens_per_expert")
        _check_array(expert_counts, origin, "num_tokens_per_expert", np.int32, (None,))
        self._num_local_experts(expert_counts.shape[0])
        if topk_idx is not None:
            idx, origin = as_array(topk_idx, "topk_idx")
            _check_array(idx, origin, "topk_idx", np.int64, (num_tokens, None))
        else:
            idx = _empty((num_tokens, 0), np.int64)
        if topk_weights is not None:
            if topk_idx is None:
                raise ValueError("topk_weights: passed without topk_idx")
            weights, origin = as_array(topk_weights, "topk_weights")
            _check_array(weights, origin, "topk_weights", np.float32, idx.shape)
        else:
            weights = arrays.zeros(idx.shape, np.float32)
        send_slot = _empty((num_tokens, ranks), np.int32)
        send_counts = _empty(ranks, np.int32)
        launch_send_slots(in_rank, send_slot, send_counts, config.num_threads, plan.pointer)
        return in_rank, send_slot, send_counts, expert_counts, idx, weights

    # --------------------------------------------------------------- combine
    def combine(
        self,
        x: Any,
        handle: DispatchHandle,
        topk_weights: Any = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
    ) -> tuple[Any, Any, EventOverlap]:
        """Send every received row back to its source token and sum the copies.

        Args:
            x: float32 or bfloat16 ``[recv, hidden]``, rows in the order dispatch returned.
            handle: the dispatch's handle.
            topk_weights: float32 ``[recv, k]`` or None.
            config / previous_event / async_finish: as in :meth:`dispatch`.

        Returns:
            ``(combined_x, combined_topk_weights, event)``: ``[tokens, hidden]`` in x's dtype,
            each token the fp32 sum, in rank order, of the rows sent back for it (0 for a
            token routed nowhere); float32 ``[tokens, k]`` likewise, or None.
        """
        self._check_usable()
        config = self._config(config)
        if not isinstance(handle, DispatchHandle):
            raise ValueError(f"handle: expected the DispatchHandle a dispatch returned, got {type(handle).__name__}")
        num_recv = int(handle.rank_prefix_matrix[-1, self.rank])
        payload, origin = as_array(x, "x")
        _check_payload(payload, origin, "x", num_recv)
        arrays = xp()
        if topk_weights is not None:
            weights, weights_origin = as_array(topk_weights, "topk_weights")
            _check_array(weights, weights_origin, "topk_weights", np.float32, (num_recv, None))
        else:
            weights = _empty((num_recv, 0), np.float32)
        plan = self._plan(origin.framework, previous_event, async_finish)
        num_tokens = handle.is_token_in_rank.shape[0]
        counts = np.diff(handle.rank_prefix_matrix, axis=0, prepend=0)
        row_bytes = payload.shape[1] * payload.itemsize
        layout = self._layout(row_bytes, weights.shape[1], handle.num_local_experts, int(counts.max(initial=0)),
                              "combine")
        words = _as_words(payload)
        seq, parity = self._next_call()
        fields = self._fields(layout, parity, words.dtype, payload.dtype)
        local = fields["local"]
        launch_combine_send(
            transport(config.force_put), config.num_sms, config.num_threads, plan.pointer, words, weights,
            handle.recv_offsets, fields["x_words"], local["x_words"], fields["topk_weights"], local["topk_weights"],
            fields["meta"], local["meta"], fields["signals"], local["signals"], self.rank, seq, row_bytes,
            handle.num_local_experts, arrays.zeros(0, np.int32), self._done_counter,
        )
        out, out_finish = new_output((num_tokens, payload.shape[1]), payload.dtype, origin, origin.dtype == "bfloat16")
        out_weights, out_weights_finish = new_output((num_tokens, weights.shape[1]), np.float32, origin)
        errors = arrays.zeros(1, np.int32)
        launch_combine_reduce(
            payload.dtype, config.num_sms, config.num_threads, plan.pointer, local["signals"], local["meta"],
            local["x_elements"], local["topk_weights"], handle.send_slot, seq, row_bytes, handle.num_local_experts,
            int(config.timeout_s * 1e9), out, out_weights, errors,
        )
        plan.synchronize()
        self._check_errors(int(to_host(errors)[0]), "combine", config.timeout_s)
        return out_finish(), out_weights_finish() if topk_weights is not None else None, plan.finish()

    # ------------------------------------------------------------- lifetime
    def destroy(self) -> None:
        """Free the symmetric block (collective: every rank calls it)."""
        if self._block is not None:
            self._views.clear()
            self._block.free()
            self._block = None

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.destroy()
