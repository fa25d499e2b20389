"""Buffer: the DeepEP-shaped public face of layout, dispatch and combine.

A Buffer checks its arguments (``arguments.py``), owns the symmetric blocks on every rank
(``num_nvl_bytes`` for the normal mode, ``num_rdma_bytes`` for the low-latency mode, each
with the call bookkeeping of ``ep/state.py``) and hands each call to the host side of its
mode: ``ep/normal.py`` (high throughput) or ``ep/low_latency.py`` (decode); the layout
step, which involves no peer, launches its kernel from here. Every call is collective: all
ranks call the same sequence. Importing this module loads no kernel code, so the static
helpers and ``help(xmoe.Buffer)`` work before ``xmoe.init()``.
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
from xmoe.config import Config, check_config
from xmoe.device_memory import kernel_view, on_gpu
from xmoe.ep.handle import DispatchHandle, LowLatencyHandle
from xmoe.event import (
    EventOverlap,
    HostPlan,
    StreamPlan,
    check_previous_event,
    event_on_current_stream,
    stream_pointer,
)
from xmoe.interop import BFLOAT16, as_array, dtype_name, framework_of, new_output, to_host
from xmoe.layout.low_latency import low_latency_size_hint
from xmoe.layout.symmetric import FP8_GROUP, size_hint


class Buffer:
    """Communication buffer for expert-parallel dispatch and combine.

    Args:
        group: the :class:`xmoe.Group` that ``xmoe.init()`` returned, or (as in DeepEP) a
            ``torch.distributed`` process group of every rank (``xmoe.init()`` is then called
            for you, under torchrun or mpirun).
        num_nvl_bytes: bytes of symmetric memory per rank for the normal mode's dispatch and
            combine (see :meth:`get_nvl_size_hint`); 0: no normal mode.
        num_rdma_bytes: with ``low_latency_mode``, bytes of symmetric memory per rank for the
            low-latency mode (see :meth:`get_low_latency_rdma_size_hint`); else 0 (xmoe has no
            internode normal mode yet).
        low_latency_mode: allocate the low-latency block (:meth:`low_latency_dispatch`).
        num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric,
            explicitly_destroy: DeepEP's transport options, accepted for its scripts: xmoe's
            peers are the PEs of one NVSHMEM job (stores where the GPUs reach each other, puts
            elsewhere), and a Buffer is released by :meth:`destroy` or when it is collected.
        enable_shrink: must be False (DeepEP's masking of failed ranks is not supported).
    """

    #: The default grid of dispatch and combine (DeepEP's ``Buffer.num_sms``; None: the backend's).
    num_sms: int | None = None

    def __init__(self, group: Any, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False) -> None:
        group = as_group(group)
        num_nvl_bytes = check_int("num_nvl_bytes", num_nvl_bytes, 0)
        num_rdma_bytes = check_int("num_rdma_bytes", num_rdma_bytes, 0)
        if num_rdma_bytes and not low_latency_mode:
            raise ValueError(f"num_rdma_bytes={num_rdma_bytes}: internode (RDMA) normal-mode buffers are not supported "
                             f"yet; pass 0, or low_latency_mode=True to size the low-latency block")
        if enable_shrink:
            raise ValueError("enable_shrink=True: masking failed ranks out (DeepEP's shrink mode) is not supported")
        if low_latency_mode and not num_rdma_bytes:
            raise ValueError("low_latency_mode=True: pass num_rdma_bytes (Buffer.get_low_latency_rdma_size_hint)")
        if not (num_nvl_bytes or low_latency_mode):
            raise ValueError("num_nvl_bytes=0: a Buffer needs num_nvl_bytes (normal mode) or low_latency_mode=True")
        from xmoe.comm import get_heap
        from xmoe.ep.low_latency import LowLatencyMode
        from xmoe.ep.normal import NormalMode
        from xmoe.ep.state import BufferState

        self.group = group
        self.rank = group.rank
        self.num_ranks = group.world_size
        self.num_nvl_bytes = num_nvl_bytes
        heap = get_heap(group)
        self._destroyed = False
        self._state: BufferState | None = None
        self._low_latency: LowLatencyMode | None = None
        if num_nvl_bytes:
            self._state = BufferState(self.rank, self.num_ranks, heap.alloc(num_nvl_bytes))
            self._normal = NormalMode(self._state)
        if low_latency_mode:
            self._low_latency = LowLatencyMode(BufferState(self.rank, self.num_ranks, heap.alloc(num_rdma_bytes)))
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
    def is_sm90_compiled() -> bool:
        """True: FP8 payloads are supported on every backend (DeepEP's name)."""
        return True

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
        return event_on_current_stream("torch" if "torch" in sys.modules else "cupy")

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
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed")
        if self._state is None:
            raise ValueError("this Buffer has no normal-mode memory: create it with num_nvl_bytes > 0")
        self._state.check_usable()
        return self._state

    def _usable_low_latency(self) -> Any:
        runtime.get_group()
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed")
        if self._low_latency is None:
            raise ValueError("this Buffer has no low-latency memory: create it with low_latency_mode=True and "
                             "num_rdma_bytes (Buffer.get_low_latency_rdma_size_hint)")
        self._low_latency.state.check_usable()
        return self._low_latency

    def _config(self, config: Config | None) -> Config:
        if config is None:
            num_sms, default = self._default_config
            if num_sms != Buffer.num_sms:
                default = Config().resolved(self.group.backend, Buffer.num_sms)
                self._default_config = (Buffer.num_sms, default)
            return default
        check_config(config)
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
        tokens_per_rank, per_rank_out = new_output(self.num_ranks, np.int32, origin, stream=plan.pointer)
        tokens_per_expert, per_expert_out = new_output(num_experts, np.int32, origin, stream=plan.pointer)
        is_token_in_rank, in_rank_out = new_output((idx.shape[0], self.num_ranks), np.bool_, origin, stream=plan.pointer)
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

    # ----------------------------------------------------------- low latency
    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of ``num_rdma_bytes`` that low-latency calls of these sizes need (DeepEP's name;
        no ``xmoe.init()`` needed): see ``layout/low_latency.py``."""
        return low_latency_size_hint(check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1),
                                     check_int("hidden", hidden, 1), check_int("num_ranks", num_ranks, 1),
                                     check_int("num_experts", num_experts, 1))

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """DeepEP's name: checks that the block holds low-latency calls of these sizes. Nothing needs
        clearing: the low-latency signals carry the call's number, so the block is reused as it is."""
        self._usable_low_latency().layout(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_dispatch(self, x: Any, topk_idx: Any, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats: Any = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False) -> tuple[Any, Any, Any, EventOverlap, Any]:
        """Send each token to the owners of its top-k experts into per-expert slots (decode).

        Runs on the caller's current stream with no host synchronisation, so it can be captured
        in a CUDA graph. At most two calls' receives may be pending (two batches in flight).

        Args:
            x: bfloat16 ``[tokens, hidden]``, tokens <= ``num_max_dispatch_tokens_per_rank``, hidden a
                multiple of 128 (of 512 with ``use_ue8m0``); the same hidden on every rank.
            topk_idx: int64 ``[tokens, k]``, expert ids, -1 for none.
            num_max_dispatch_tokens_per_rank: the most tokens any rank passes (the same on every rank).
            num_experts: experts in total, a multiple of the ranks.
            cumulative_local_expert_recv_stats: int32 ``[local experts]`` to which the tokens each
                local expert received are added, or None.
            use_fp8: send FP8 rows (cast in the kernel, one float32 scale per 128 channels, amax / 448).
            round_scale: power-of-two scales. use_ue8m0: return them packed, four exponent bytes per int32.
            async_finish: return an event recorded after the call (the work is on the caller's stream).
            return_recv_hook: only send now; calling the returned hook receives.

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` ``[local experts, ranks * max tokens,
            hidden]`` bfloat16, or with FP8 a tuple of float8_e4m3fn rows and float32 scales
            ``[..., hidden / 128]`` (int32 ``[..., hidden / 512]`` with ``use_ue8m0``); expert ``e``'s rows are
            its first ``recv_count[e]`` (int32 ``[local experts]``), source after source; ``handle``: a
            :class:`xmoe.ep.handle.LowLatencyHandle` (``handle[0]``: each row's source token, ``handle[1]``:
            int64 ``[local experts, ranks]`` = first row << 32 | rows, as DeepEP's); ``hook``: receives
            (a no-op without ``return_recv_hook``).
        """
        mode = self._usable_low_latency()
        num_local_experts(num_experts, self.num_ranks)
        framework = framework_of(x)
        received, recv_count, handle, hook = mode.dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_local_expert_recv_stats,
            bool(use_fp8), bool(round_scale), bool(use_ue8m0), bool(return_recv_hook), self._config(None),
            stream_pointer(framework))
        return received, recv_count, handle, self._low_latency_event(framework, async_finish), hook

    def low_latency_combine(self, x: Any, topk_idx: Any, topk_weights: Any, handle: LowLatencyHandle,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Any = None) -> tuple[Any, EventOverlap, Any]:
        """Send the experts' outputs back to their tokens and sum them with the top-k weights.

        Args:
            x: bfloat16 ``[local experts, ranks * max tokens, hidden]``, rows as the dispatch returned them.
            topk_idx / topk_weights: int64 / float32 ``[tokens, k]``: the dispatch's routing and weights.
            handle: the dispatch's handle.
            use_logfmt: must be False (LogFMT is not supported).
            zero_copy: x was written into :meth:`get_next_low_latency_combine_buffer` already (x is not read).
            async_finish / return_recv_hook: as in :meth:`low_latency_dispatch`.
            out: bfloat16 ``[tokens, hidden]`` to write into, or None.

        Returns:
            ``(combined_x, event, hook)``: bfloat16 ``[tokens, hidden]``, each token the float32 sum of
            its experts' rows times their weights (masked ids skipped).
        """
        mode = self._usable_low_latency()
        if use_logfmt:
            raise ValueError("use_logfmt=True: LogFMT combine is not supported; pass use_logfmt=False")
        if not isinstance(handle, LowLatencyHandle):
            raise ValueError(f"handle: expected the handle low_latency_dispatch returned, got {type(handle).__name__}")
        framework = framework_of(x)
        combined, hook = mode.combine(x, topk_idx, topk_weights, handle, bool(zero_copy), out, bool(return_recv_hook),
                                      self._config(None), stream_pointer(framework))
        return combined, self._low_latency_event(framework, async_finish), hook

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> Any:
        """The bfloat16 ``[local experts, ranks * max tokens, hidden]`` symmetric buffer that a
        ``zero_copy=True`` combine reads its rows from (as the dispatch's framework)."""
        return self._usable_low_latency().next_combine_buffer(handle)

    @staticmethod
    def _low_latency_event(framework: str, async_finish: bool) -> EventOverlap:
        """An event after a low-latency call's work (on the caller's stream) with ``async_finish``."""
        return event_on_current_stream(framework) if async_finish and on_gpu() else EventOverlap()

    # ------------------------------------------------------------- lifetime
    def destroy(self) -> None:
        """Free the symmetric blocks (collective: every rank calls it)."""
        if self._state is not None:
            self._state.free()
        if self._low_latency is not None:
            self._low_latency.state.free()
        self._state, self._low_latency, self._destroyed = None, None, True

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.destroy()
