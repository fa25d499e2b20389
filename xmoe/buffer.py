"""Buffer: the DeepEP-shaped public face of layout, dispatch and combine.

A Buffer checks every argument, owns one symmetric block of ``num_nvl_bytes`` on every
rank (with the call bookkeeping of ``ep/state.py``) and hands dispatch and combine to the
host side of their mode: ``ep/normal.py`` for the normal (high-throughput) mode; the
layout step, which involves no peer, launches its kernel from here. Every call is
collective: all ranks call the same sequence of dispatch/combine. Importing this module
loads no kernel code, so the static helpers and ``help(xmoe.Buffer)`` work before
``xmoe.init()``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from xmoe import runtime
from xmoe.arguments import (
    PAYLOAD_DTYPES,
    as_group,
    check_array,
    check_cached,
    check_handle,
    check_int,
    check_payload,
    check_routing,
    dispatch_payload,
    num_local_experts,
)
from xmoe.comm.status import ERR_EXPERT_ID, describe
from xmoe.config import Config
from xmoe.device_memory import kernel_view, on_gpu
from xmoe.ep.handle import DispatchHandle
from xmoe.event import EventOverlap, HostPlan, StreamPlan, check_previous_event
from xmoe.interop import BFLOAT16, as_array, dtype_name, new_output, to_host
from xmoe.layout.symmetric import FP8_GROUP, size_hint


class Buffer:
    """Communication buffer for expert-parallel dispatch and combine.

    Args:
        group: the :class:`xmoe.Group` that ``xmoe.init()`` returned, or (as in DeepEP) a
            ``torch.distributed`` process group of every rank (``xmoe.init()`` is then called
            for you, under torchrun or mpirun).
        num_nvl_bytes: bytes of symmetric memory per rank for intranode traffic; see
            :meth:`get_nvl_size_hint`.
        num_rdma_bytes: internode buffer bytes; must be 0 (intranode only for now).
        low_latency_mode: must be False (the low-latency path is not built yet).
    """

    #: The default grid of dispatch and combine (DeepEP's ``Buffer.num_sms``; None: the backend's).
    num_sms: int | None = None

    def __init__(self, group: Any, num_nvl_bytes: int, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False) -> None:
        group = as_group(group)
        num_nvl_bytes = check_int("num_nvl_bytes", num_nvl_bytes, 1)
        if num_rdma_bytes != 0:
            raise ValueError(f"num_rdma_bytes={num_rdma_bytes}: internode (RDMA) buffers are not supported yet; pass 0")
        if low_latency_mode:
            raise ValueError("low_latency_mode=True: the low-latency path is not supported yet")
        from xmoe.comm import get_heap
        from xmoe.ep.normal import NormalMode
        from xmoe.ep.state import BufferState

        self.group = group
        self.rank = group.rank
        self.num_ranks = group.world_size
        self.num_nvl_bytes = num_nvl_bytes
        self._state: BufferState | None = BufferState(self.rank, self.num_ranks, get_heap(group).alloc(num_nvl_bytes))
        self._normal = NormalMode(self._state)
        # what config=None means, resolved once per Buffer.num_sms: reading the environment
        # costs a few us a call
        self._default_config = (Buffer.num_sms, Config().resolved(group.backend, Buffer.num_sms))
        self._comm_stream = None

    # -------------------------------------------------------- DeepEP's names
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the default grid (blocks) of every Buffer's dispatch and combine (DeepEP's name)."""
        Buffer.num_sms = check_int("new_num_sms", new_num_sms, 1)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's recommended dispatch config for ``num_ranks``: ``Buffer.num_sms`` and DeepEP's
        intranode chunk sizes, which xmoe's kernels accept and do not read (see :class:`Config`)."""
        check_int("num_ranks", num_ranks, 1)
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's recommended combine config for ``num_ranks`` (see :meth:`get_dispatch_config`)."""
        check_int("num_ranks", num_ranks, 1)
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    def capture(self) -> EventOverlap:
        """An event on the caller's current stream, to pass as ``previous_event`` (DeepEP's name;
        the PyTorch stream under torch, CuPy's otherwise; nothing to wait for on the simulator)."""
        if not on_gpu():
            return EventOverlap()
        from xmoe.event import current_stream

        framework = "torch" if "torch" in sys.modules else "cupy"
        return EventOverlap(current_stream(framework).record(), framework)

    # ----------------------------------------------------------------- sizes
    @staticmethod
    def get_nvl_size_hint(num_max_tokens: int, hidden: int, num_ranks: int, num_experts: int, num_topk: int = 0,
                          dtype: Any = BFLOAT16) -> int:
        """Bytes of ``num_nvl_bytes`` that dispatch and combine need (no ``xmoe.init()`` needed).

        Args:
            num_max_tokens: most tokens any rank passes to one call.
            hidden: channels per token.
            num_ranks: ranks of the group.
            num_experts: experts in total (a multiple of ``num_ranks``).
            num_topk: top-k entries per token (0 without top-k).
            dtype: payload dtype of the widest call (float32, bfloat16, or float8_e4m3fn for FP8
                rows with their scales).
        """
        num_max_tokens = check_int("num_max_tokens", num_max_tokens, 0)
        hidden = check_int("hidden", hidden, 1)
        num_ranks = check_int("num_ranks", num_ranks, 1)
        num_experts = check_int("num_experts", num_experts, 1)
        num_topk = check_int("num_topk", num_topk, 0)
        if num_experts % num_ranks:
            raise ValueError(f"num_experts={num_experts} is not divisible by num_ranks={num_ranks}")
        name = dtype_name(dtype)
        if name not in PAYLOAD_DTYPES + ("float8_e4m3fn",):
            raise ValueError(f"dtype={name}: expected float32, bfloat16 or float8_e4m3fn")
        num_scales = -(-hidden // FP8_GROUP) if name == "float8_e4m3fn" else 0
        return size_hint(num_max_tokens, num_ranks, hidden * np.dtype(dtype).itemsize, num_topk, num_scales)

    # --------------------------------------------------------------- helpers
    def _usable_state(self) -> Any:
        runtime.get_group()
        if self._state is None:
            raise RuntimeError("this Buffer was destroyed")
        self._state.check_usable()
        return self._state

    def _config(self, config: Config | None) -> Config:
        if config is None:
            num_sms, default = self._default_config
            if num_sms != Buffer.num_sms:
                default = Config().resolved(self.group.backend, Buffer.num_sms)
                self._default_config = (Buffer.num_sms, default)
            return default
        if not isinstance(config, Config):
            raise ValueError(f"config: expected an xmoe.Config or None, got {type(config).__name__}")
        return config.resolved(self.group.backend, Buffer.num_sms)

    def _plan(self, framework: str, previous_event: EventOverlap | None, async_finish: bool) -> StreamPlan | HostPlan:
        check_previous_event(previous_event)
        if not on_gpu():
            return HostPlan()
        if async_finish and self._comm_stream is None:
            import cupy

            self._comm_stream = cupy.cuda.Stream(non_blocking=True)
        return StreamPlan(framework, self._comm_stream, previous_event, async_finish)

    # ---------------------------------------------------------------- layout
    def get_dispatch_layout(self, topk_idx: Any, num_experts: int, previous_event: EventOverlap | None = None,
                            async_finish: bool = False,
                            allocate_on_comm_stream: bool = False) -> tuple[Any, None, Any, Any, EventOverlap]:
        """Count the tokens each rank and each expert receives from this rank.

        Args:
            topk_idx: int64 ``[tokens, k]``, expert ids in ``[0, num_experts)``, -1 for a masked
                slot, no id twice in a row.
            num_experts: experts in total, a multiple of the rank count.
            allocate_on_comm_stream: accepted for DeepEP scripts; outputs always come from the
                caller's allocator.
            previous_event / async_finish: as in DeepEP (see :class:`EventOverlap`). Without
                ``async_finish`` the call waits for its kernel and a bad ``topk_idx`` raises
                ``ValueError`` here; with it nothing waits, and a bad ``topk_idx`` retires the
                Buffer with a ``RuntimeError`` from its next call.

        Returns:
            ``(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event)``:
            int32 ``[ranks]``, None (intranode), int32 ``[num_experts]``, bool ``[tokens, ranks]``.
        """
        state = self._usable_state()
        idx, origin = as_array(topk_idx, "topk_idx")
        check_array(idx, origin, "topk_idx", np.int64, (None, None))
        num_local_experts(num_experts, self.num_ranks)
        plan = self._plan(origin.framework, previous_event, async_finish)
        tokens_per_rank, per_rank_out = new_output(self.num_ranks, np.int32, origin)
        tokens_per_expert, per_expert_out = new_output(num_experts, np.int32, origin)
        is_token_in_rank, in_rank_out = new_output((idx.shape[0], self.num_ranks), np.bool_, origin)
        from xmoe.kernels.layout import launch_dispatch_layout

        launch_dispatch_layout(kernel_view(idx), num_experts, kernel_view(tokens_per_rank),
                               kernel_view(tokens_per_expert), kernel_view(is_token_in_rank),
                               state.status.layout_errors, self._config(None).num_threads, plan.pointer)
        if not async_finish:
            plan.synchronize()
            code, detail = state.status.layout_error(clear=True)  # this rank's argument: the Buffer stays usable
            if code == ERR_EXPERT_ID:
                t, j = divmod(detail, idx.shape[1])
                raise ValueError(f"topk_idx[{t}, {j}]={int(to_host(idx[t, j]))}: expert ids must be -1 or in "
                                 f"[0, {num_experts})")
            if code:
                raise ValueError(describe(code, detail, self.rank, "get_dispatch_layout", (), 0.0))
            state.raise_on_error()  # an earlier call's error that landed since this call began
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
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[Any, Any, Any, list[int], DispatchHandle, EventOverlap]:
        """Send each token to every rank that holds one of its experts.

        The layout arguments must come from :meth:`get_dispatch_layout` of this ``topk_idx``
        (or agree with it): the kernel checks that ``is_token_in_rank`` matches the ranks
        ``topk_idx`` names (a mismatch raises ``RuntimeError``). ``num_tokens_per_rank`` is
        checked for its shape only: the kernel counts ``is_token_in_rank``'s columns itself and
        the handle's counts come from that count. ``num_tokens_per_expert`` is taken as given
        (it only sizes the per-expert list), and ``topk_idx`` must not name an expert twice in
        a row (:meth:`get_dispatch_layout` checks that).

        Args:
            x: float32 or bfloat16 ``[tokens, hidden]``, or an FP8 pair ``(float8_e4m3fn [tokens, hidden],
                float32 scales [tokens, hidden / 128])`` (:func:`xmoe.quantize_fp8`); hidden and dtype
                are the same on every rank.
            handle: a previous dispatch's handle: repeat its routing (cached mode); the
                layout arguments and top-k are then not passed.
            num_tokens_per_rank: int32 ``[ranks]`` from :meth:`get_dispatch_layout`.
            is_token_in_rank: bool ``[tokens, ranks]`` from :meth:`get_dispatch_layout`.
            num_tokens_per_expert: int32 ``[experts]`` from :meth:`get_dispatch_layout`.
            topk_idx: int64 ``[tokens, k]`` or None; k is the same on every rank.
            topk_weights: float32 ``[tokens, k]`` or None (needs ``topk_idx``).
            expert_alignment: per-expert received counts are padded to a multiple of it.
            num_worst_tokens: 0, or the rows of worst-case-sized outputs (DeepEP's option): the
                host then never waits for the received count, so the whole dispatch is one
                launch, and it can be captured in a CUDA graph (with cached dispatches and
                combines: the kernels number calls on the device). Rows past the received count are
                padding: ``recv_topk_idx`` -1, ``recv_topk_weights`` 0, ``recv_x`` unspecified;
                the per-expert list is empty and the handle's ``rank_prefix_matrix`` and
                ``num_tokens_per_rank`` are None. More rows than this is an error, raised (and
                the Buffer retired) by this call if its kernel has finished by the call's end
                (always on the simulator), else by the Buffer's next call; nothing is received.
            config: launch configuration; None for the defaults (with the environment as it was
                when the Buffer was created: ``XMOE_TIMEOUT_S``, ``XMOE_FORCE_PUT``).
            previous_event / async_finish: as in DeepEP (see :class:`EventOverlap`).
            allocate_on_comm_stream: accepted for DeepEP scripts; outputs always come from the
                caller's allocator.

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``:
            ``recv_x`` ``[recv, hidden]`` ordered by source rank then source token (an FP8 pair
            of rows and scales for an FP8 ``x``; combine then takes bfloat16 rows);
            ``recv_topk_idx`` int64 ``[recv, k]`` local expert ids (-1: not on this rank);
            ``recv_topk_weights`` float32 ``[recv, k]`` (0 where the id is -1), both None
            without top-k or in cached mode; a list of ints per local expert. ``recv`` is
            ``num_worst_tokens`` when that is given.
        """
        self._usable_state()
        config = self._config(config)
        payload, scales, origin = dispatch_payload(x)
        plan = self._plan(origin.framework, previous_event, async_finish)
        num_tokens = payload.shape[0]
        if handle is not None:
            check_cached(handle, num_tokens, self.num_ranks, num_tokens_per_rank=num_tokens_per_rank,
                         is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                         topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=num_worst_tokens or None)
            recv_x = self._normal.cached_dispatch(payload, scales, origin, handle, config, plan)
            return recv_x, None, None, list(handle.num_recv_tokens_per_expert_list), handle, plan.finish()
        alignment = check_int("expert_alignment", expert_alignment, 1)
        num_worst_tokens = check_int("num_worst_tokens", num_worst_tokens, 0)
        routing, experts_per_rank = check_routing(num_tokens, self.num_ranks, num_tokens_per_rank, is_token_in_rank,
                                                  num_tokens_per_expert, topk_idx, topk_weights)
        from xmoe.kernels.dispatch import check_threads

        check_threads(config.num_threads)
        if not num_worst_tokens and plan.capturing():
            raise ValueError("num_worst_tokens: required to capture a dispatch in a CUDA graph (without it the "
                             "host waits for the receive counts, which a capture never produces)")
        recv_x, recv_idx, recv_weights, per_expert, handle = self._normal.dispatch(
            payload, scales, origin, routing, experts_per_rank, alignment, num_worst_tokens, config, plan)
        return (recv_x, recv_idx if topk_idx is not None else None,
                recv_weights if topk_weights is not None else None, per_expert, handle, plan.finish())

    # --------------------------------------------------------------- combine
    def combine(
        self,
        x: Any,
        handle: DispatchHandle,
        topk_weights: Any = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[Any, Any, EventOverlap]:
        """Send every received row back to its source token and sum the copies.

        Args:
            x: float32 or bfloat16 ``[recv, hidden]``, rows in the order dispatch returned;
                hidden and dtype are the same on every rank.
            handle: the dispatch's handle.
            topk_weights: float32 ``[recv, k]`` (k of the dispatch, when it had top-k) or None.
            config / previous_event / async_finish / allocate_on_comm_stream: as in :meth:`dispatch`.

        Returns:
            ``(combined_x, combined_topk_weights, event)``: ``[tokens, hidden]`` in x's dtype,
            each token the fp32 sum, in rank order, of the rows sent back for it (0 for a
            token routed nowhere); float32 ``[tokens, k]`` likewise, or None.
        """
        self._usable_state()
        config = self._config(config)
        check_handle(handle)
        num_recv = handle.num_recv
        payload, origin = as_array(x, "x", raw=True)
        check_payload(payload, origin, "x", num_recv, " (the rows dispatch returned)")
        weights = None
        if topk_weights is not None:
            weights, weights_origin = as_array(topk_weights, "topk_weights", raw=True)
            check_array(weights, weights_origin, "topk_weights", np.float32,
                         (num_recv, handle.num_topk or None), " (the dispatch's rows and top-k)")
        plan = self._plan(origin.framework, previous_event, async_finish)
        combined, combined_weights = self._normal.combine(payload, origin, weights, handle, config, plan)
        return combined, combined_weights, plan.finish()

    # ------------------------------------------------------------- lifetime
    def destroy(self) -> None:
        """Free the symmetric block (collective: every rank calls it)."""
        if self._state is not None:
            self._state.free()
            self._state = None

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.destroy()
