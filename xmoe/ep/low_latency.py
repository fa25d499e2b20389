"""The low-latency mode's host side (decode): checks, outputs, launches, hooks and handles.

Every call shape (the tensors' shapes and dtypes, the sizes and flags) is checked once and
planned (:class:`CallPlan`: the layout, where the outputs lie, the prepared launches); a call
then allocates its outputs in one piece and launches the kernels of ``kernels/low_latency.py``
(or their CUDA C twin) on the caller's current stream, and never waits for the GPU: the
outputs are sized from ``num_max_dispatch_tokens_per_rank`` (``[local experts, ranks * max
tokens, hidden]``, DeepEP's layout), so dispatch + combine can be captured in a CUDA graph.
With ``return_recv_hook`` a call only sends; its hook launches the receive. The call's
number lives on the device; the host only alternates the ``pending`` slot in which a send
launch leaves it for its hook (so at most two calls may have a receive pending).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from xmoe.arguments import check_array, check_int
from xmoe.comm.device import transport
from xmoe.config import Config
from xmoe.device_memory import DeviceArray, data_pointer, empty, kernel_view, on_gpu, strided_view, xp
from xmoe.ep.handle import LowLatencyHandle
from xmoe.ep.state import BufferState
from xmoe.event import stream_pointer
from xmoe.interop import BFLOAT16, OutputPlan, as_array, new_output, new_outputs, to_origin
from xmoe.kernels import low_latency_cuda
from xmoe.kernels.launch import Prepared, spinning_blocks
from xmoe.kernels.low_latency import (
    LL_COMBINE_FIELDS,
    LL_DISPATCH_FIELDS,
    RECEIVE,
    SEND,
    ll_combine_kernel,
    ll_dispatch_kernel,
)
from xmoe.layout.low_latency import LowLatencyLayout, low_latency_layout
from xmoe.kernels.raw_launch import RawLaunch
from xmoe.layout.symmetric import CALL_CODES, DTYPE_CODES, FP8_GROUP, Field

#: Channels per packed UE8M0 word: four one-byte exponents of 128 channels each.
UE8M0_GROUP = 4 * FP8_GROUP


def words32(array: Any) -> Any:
    """A C-contiguous array with its last axis re-read as uint32 words."""
    shape = tuple(array.shape[:-1]) + (array.shape[-1] * array.dtype.itemsize // 4,)
    if type(array) is DeviceArray:
        return DeviceArray(array.ptr, shape, np.dtype(np.uint32), array.owner)
    return array.view(np.uint32).reshape(shape)


@lru_cache(maxsize=None)
def cuda_c_fits(force_put: bool, num_ranks: int, num_experts: int) -> bool:
    """Whether calls of this shape may run the generated CUDA C kernels (``kernels/low_latency_cuda.py``):
    on a GPU with FP8 conversions (sm_89 on), through stores (the put path stays Numba's), within
    the kernels' shared-memory counts; a call also needs :func:`aligned_rows`. Else the Numba kernels."""
    if not on_gpu() or force_put:
        return False
    from xmoe.kernels.build import current_device

    return (current_device().compute_capability >= 89 and num_experts <= low_latency_cuda.MAX_EXPERTS
            and num_ranks <= low_latency_cuda.MAX_RANKS)


def aligned_rows(*arrays: Any) -> bool:
    """Whether every array is C-contiguous from a 16-byte aligned address (the CUDA C kernels'
    16-byte loads and stores)."""
    return all(data_pointer(a) % 16 == 0 and (type(a) is not DeviceArray or a.c_contiguous) for a in arrays)


@dataclass
class CallPlan:
    """What every call of one shape shares, checked and made once (see ``LowLatencyMode``)."""

    layout: LowLatencyLayout
    views: dict[str, Any]  # the layout's fields as the kernels take them
    meta: tuple[int, ...]  # the call-shape words every rank must agree on
    fits_cuda_c: bool  # :func:`cuda_c_fits`
    num_tokens: int
    num_topk: int
    outputs: OutputPlan | None = None  # a dispatch's outputs
    launches: dict[tuple[bool, int], Prepared | RawLaunch] = dataclass_field(default_factory=dict)

    def launch(self, cuda_c: bool, phases: int, build: Callable[[int], Prepared | RawLaunch]) -> Prepared | RawLaunch:
        """The launch of ``phases`` in CUDA C or Numba, built by ``build(phases)`` on first use."""
        found = self.launches.get((cuda_c, phases))
        if found is None:
            found = self.launches[(cuda_c, phases)] = build(phases)
        return found


class LowLatencyMode:
    """The low-latency mode of one Buffer (see the module); ``state``: its low-latency block."""

    def __init__(self, state: BufferState) -> None:
        self.state = state
        self.pending = kernel_view(xp().zeros(2, np.int64))
        self._calls = 0
        self._layouts: dict[tuple[int, int, int], tuple[LowLatencyLayout, dict[str, Any]]] = {}
        self._dispatch_plans: dict[tuple, CallPlan] = {}
        self._combine_plans: dict[tuple, CallPlan] = {}
        self._no_stats = empty((0,), np.int32)  # the Numba dispatch's recv_stats without stats

    # ------------------------------------------------------------- layout
    def layout(self, num_max_tokens: int, hidden: int, num_experts: int) -> tuple[LowLatencyLayout, dict[str, Any]]:
        """The layout of a call shape and this rank's views of its fields (made once); ``ValueError``
        with the size needed when the block is too small."""
        key = (num_max_tokens, hidden, num_experts)
        found = self._layouts.get(key)
        if found is None:
            layout = low_latency_layout(num_max_tokens, hidden, self.state.num_ranks, num_experts)
            if layout.nbytes > self.state.nbytes:
                raise ValueError(
                    f"num_rdma_bytes={self.state.nbytes} is too small for low-latency calls of {num_max_tokens} "
                    f"tokens per rank, hidden {hidden} and {num_experts} experts: they need {layout.nbytes} bytes "
                    f"(Buffer.get_low_latency_rdma_size_hint)")
            found = self._layouts[key] = (layout, self._views(layout))
        return found

    def _views(self, layout: LowLatencyLayout) -> dict[str, Any]:
        """Every field as the kernels take it (payload fields also as uint32 words)."""
        def view(field: Field, dtype: Any = None) -> Any:
            shape, strides = field.shape, field.strides
            if dtype is not None:
                dtype = np.dtype(dtype)
                shape = shape[:-1] + (shape[-1] * field.dtype.itemsize // dtype.itemsize,)
                strides = strides[:-1] + (dtype.itemsize,)
            return strided_view(self.state.block.local, field.offset, shape, dtype or field.dtype, strides)

        fields = layout.fields
        views = {name: view(field) for name, field in fields.items()}
        views |= dict(dispatch_x=view(fields["dispatch_x"], np.uint32), combine_words=view(fields["combine_x"], np.uint32),
                      send_words=view(fields["send_x"], np.uint32))
        return views

    def _slot(self) -> int:
        """The ``pending`` slot of the next call (see the module)."""
        self._calls += 1
        return self._calls & 1

    def _fixed(self, views: dict[str, Any], names: tuple[str, ...], meta: tuple[int, ...], config: Config) -> dict:
        state = self.state
        return dict(peers=state.peer_offsets, rank=state.rank, calls=state.calls, work=state.work,
                    pending=self.pending, timeout_ns=config.timeout_ns, errors=state.status.errors,
                    call_shape=state.call_shape(meta)) | {name: views[name] for name in names}

    def _control(self, layout: LowLatencyLayout, views: dict[str, Any], kind: str, slots: str, meta: tuple[int, ...],
                 config: Config, phases: int) -> dict[str, Any]:
        """The fields both CUDA C kernels share (``kernels/low_latency_cuda.py``), for ``kind``
        ("dispatch" or "combine") whose rows land in field ``slots``."""
        state, fields = self.state, layout.fields
        return dict(phases=phases, rank=state.rank, num_ranks=state.num_ranks, num_experts=layout.num_experts,
                    hidden=layout.hidden, max_tokens=layout.num_max_tokens, peers=state.peer_offsets,
                    calls=state.calls, pending=self.pending, call_shape=state.call_shape(meta), work=state.work,
                    timeout_ns=config.timeout_ns, errors=state.status.errors, signals=views[f"{kind}_signals"],
                    meta=views[f"{kind}_meta"], meta_length=fields[f"{kind}_meta"].shape[-1],
                    control_half_bytes=fields[f"{kind}_signals"].strides[0],
                    data_half_bytes=fields[slots].strides[0], slot_bytes=fields[slots].strides[-2], slots=views[slots])

    def _raw(self, kernel: str, params: Any, fixed: dict[str, Any], args: dict[str, Any], layout: LowLatencyLayout,
             phases: int, token_blocks: int) -> RawLaunch:
        """A CUDA C launch of ``kernel``: ``token_blocks`` for the tokens and a block per local
        expert, as many blocks as may spin at once (every block sends before it waits); GPU-scope
        synchronisation when every peer shares this GPU, system scope otherwise."""
        from xmoe import runtime

        scope = "gpu" if runtime.get_group().ranks_on_device == self.state.num_ranks else "sys"
        function = low_latency_cuda.function(kernel, scope)
        local = layout.num_experts // self.state.num_ranks
        wanted = max(local, token_blocks, 1)
        blocks = min(wanted, spinning_blocks(function, low_latency_cuda.THREADS)) if phases & RECEIVE else wanted
        return RawLaunch(function, params, blocks, low_latency_cuda.THREADS, fixed | args, tuple(args))

    def _run(self, plan: CallPlan, cuda_c: bool, build: Callable[[int], Prepared | RawLaunch], args: dict[str, Any],
             stream: int, framework: str, return_recv_hook: bool) -> Callable[[], None]:
        """Launch the call on ``stream``: send and receive at once, or the send now and the
        receive by the returned hook, on the caller's current stream when it is called. A
        kernel's error is raised by the call on the simulator (its kernels have finished), by
        the Buffer's next call on the GPU."""
        if not return_recv_hook:
            plan.launch(cuda_c, SEND | RECEIVE, build)(stream, **args)
            self._raise_on_simulator_error()
            return _no_hook
        plan.launch(cuda_c, SEND, build)(stream, **args)
        self._raise_on_simulator_error()
        receive = plan.launch(cuda_c, RECEIVE, build)

        def hook() -> None:
            receive(stream_pointer(framework), **args)
            self._raise_on_simulator_error()

        return hook

    def _raise_on_simulator_error(self) -> None:
        if not on_gpu():
            self.state.raise_on_error()

    # ------------------------------------------------------------ dispatch
    def dispatch(self, x: Any, topk_idx: Any, num_max_tokens: int, num_experts: int, stats: Any, use_fp8: bool,
                 round_scale: bool, use_ue8m0: bool, return_recv_hook: bool, config: Config,
                 stream: int) -> tuple[Any, Any, LowLatencyHandle, Callable[[], None]]:
        """See ``Buffer.low_latency_dispatch``; ``stream``: the caller's stream pointer (0 on the simulator)."""
        num_max_tokens = check_int("num_max_dispatch_tokens_per_rank", num_max_tokens, 1)
        payload, origin = as_array(x, "x", raw=True)
        idx, idx_origin = as_array(topk_idx, "topk_idx", raw=True)
        stats_view, stats_origin = (None, None) if stats is None else as_array(
            stats, "cumulative_local_expert_recv_stats", raw=True)
        key = (payload.shape, origin, idx.shape, idx_origin, None if stats is None else stats_view.shape, stats_origin,
               num_max_tokens, num_experts, use_fp8, round_scale, use_ue8m0, config)
        plan = self._dispatch_plans.get(key)
        if plan is None:
            plan = self._dispatch_plans[key] = self._dispatch_plan(
                payload, origin, idx, idx_origin, stats_view, stats_origin, num_max_tokens, num_experts, use_fp8,
                round_scale, use_ue8m0, config)
        self.state.begin("low_latency_dispatch", plan.meta, config.timeout_s)  # names the call in an error report
        outputs, outputs_out = new_outputs(plan.outputs, origin)
        cuda_c = plan.fits_cuda_c and aligned_rows(payload)
        if cuda_c:
            args = dict(pending_slot=self._slot(), x=payload, topk_idx=idx, num_tokens=plan.num_tokens,
                        round_scale=int(round_scale), recv_stats=stats_view) | outputs
            scales = plan.outputs.specs
            args["recv_scales"] = args["recv_scales"] if scales["recv_scales"][0][-1] else None
            args["recv_packed_scales"] = args["recv_packed_scales"] if scales["recv_packed_scales"][0][-1] else None
        else:
            args = dict(pending_slot=self._slot(), x=words32(payload), x_bits=payload, topk_idx=idx, fp8=int(use_fp8),
                        round_scale=int(round_scale), recv_stats=self._no_stats if stats is None else stats_view)
            args |= outputs | dict(recv_x=words32(outputs["recv_x"]))

        def build(phases: int) -> Prepared | RawLaunch:
            layout, views, num_experts = plan.layout, plan.views, plan.layout.num_experts
            expert_sent = kernel_view(xp().zeros(num_experts, np.int32))
            if cuda_c:
                fixed = self._control(layout, views, "dispatch", "dispatch_x", plan.meta, config, phases)
                fixed |= dict(num_topk=plan.num_topk, fp8=int(use_fp8), slot_scales=views["dispatch_scales"],
                              slot_src_idx=views["dispatch_src_idx"], counts=views["dispatch_counts"],
                              expert_sent=expert_sent)
                return self._raw(low_latency_cuda.DISPATCH_KERNEL, low_latency_cuda.DISPATCH, fixed, args, layout,
                                 phases, token_blocks=layout.num_max_tokens)  # the send: a block a token
            fixed = self._fixed(views, LL_DISPATCH_FIELDS, plan.meta, config)
            fixed |= dict(phases=phases, expert_sent=expert_sent)
            return Prepared(ll_dispatch_kernel(transport(config.force_put)), config.num_sms, config.num_threads,
                            fixed | args, tuple(args), spins=bool(phases & RECEIVE))

        hook = self._run(plan, cuda_c, build, args, stream, origin.framework, return_recv_hook)
        out = outputs_out()
        received = (out["recv_x"], out["recv_packed_scales" if use_ue8m0 else "recv_scales"]) if use_fp8 else out["recv_x"]
        handle = LowLatencyHandle(out["recv_src_info"], out["recv_layout_range"], num_max_tokens, payload.shape[1],
                                  num_experts, outputs["recv_src_info"], outputs["recv_layout_range"], origin)
        return received, out["recv_count"], handle, hook

    def _dispatch_plan(self, payload: Any, origin: Any, idx: Any, idx_origin: Any, stats: Any, stats_origin: Any,
                       num_max_tokens: int, num_experts: int, use_fp8: bool, round_scale: bool, use_ue8m0: bool,
                       config: Config) -> CallPlan:
        """The checks of a dispatch shape (``ValueError`` naming the argument) and its plan."""
        ranks = self.state.num_ranks
        check_array(payload, origin, "x", BFLOAT16, (None, None))
        num_tokens, hidden = payload.shape
        if num_tokens > num_max_tokens:
            raise ValueError(f"x: {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank={num_max_tokens}")
        if hidden % FP8_GROUP:
            raise ValueError(f"x: hidden {hidden} is not a multiple of {FP8_GROUP}")
        if use_ue8m0 and not (use_fp8 and round_scale):
            raise ValueError("use_ue8m0=True: needs use_fp8=True and round_scale=True (power-of-two scales)")
        if use_ue8m0 and hidden % UE8M0_GROUP:
            raise ValueError(f"use_ue8m0=True: hidden {hidden} is not a multiple of {UE8M0_GROUP}")
        check_array(idx, idx_origin, "topk_idx", np.int64, (num_tokens, None), " (x's tokens)")
        local = num_experts // ranks
        if stats is not None:
            check_array(stats, stats_origin, "cumulative_local_expert_recv_stats", np.int32, (local,),
                        " (local experts)")
        layout, views = self.layout(num_max_tokens, hidden, num_experts)
        rows, groups = ranks * num_max_tokens, hidden // FP8_GROUP
        scale_words = (groups if use_fp8 and not use_ue8m0 else 0, groups // 4 if use_ue8m0 else 0)
        outputs = OutputPlan(dict(
            recv_x=((local, rows, hidden), np.uint8 if use_fp8 else np.uint16, "float8_e4m3fn" if use_fp8 else "bfloat16"),
            recv_scales=((local, rows, scale_words[0]), np.float32, None),
            recv_packed_scales=((local, rows, scale_words[1]), np.int32, None),
            recv_count=((local,), np.int32, None), recv_src_info=((local, rows), np.int32, None),
            recv_layout_range=((local, ranks), np.int64, None)))
        meta = (CALL_CODES["low_latency_dispatch"], DTYPE_CODES["float8_e4m3fn" if use_fp8 else "bfloat16"],
                2 * hidden, idx.shape[1], local, num_max_tokens)
        fits = idx.shape[1] <= low_latency_cuda.MAX_TOPK and cuda_c_fits(config.force_put, ranks, num_experts)
        return CallPlan(layout, views, meta, fits, num_tokens, idx.shape[1], outputs)

    # ------------------------------------------------------------- combine
    def combine(self, x: Any, topk_idx: Any, topk_weights: Any, handle: LowLatencyHandle, zero_copy: bool, out: Any,
                return_recv_hook: bool, config: Config, stream: int) -> tuple[Any, Callable[[], None]]:
        """See ``Buffer.low_latency_combine``."""
        payload, origin = as_array(x, "x", raw=True)
        idx, idx_origin = as_array(topk_idx, "topk_idx", raw=True)
        weights, weights_origin = as_array(topk_weights, "topk_weights", raw=True)
        result, out_origin = (None, None) if out is None else as_array(out, "out", raw=True)
        sizes = (handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        key = (payload.shape, origin, idx.shape, idx_origin, weights.shape, weights_origin,
               None if out is None else result.shape, out_origin, sizes, zero_copy, config)
        plan = self._combine_plans.get(key)
        if plan is None:
            plan = self._combine_plans[key] = self._combine_plan(payload, origin, idx, idx_origin, weights,
                                                                 weights_origin, result, out_origin, sizes, config)
        self.state.begin("low_latency_combine", plan.meta, config.timeout_s)
        if out is None:
            result, result_out = new_output((plan.num_tokens, handle.hidden), np.uint16, origin, "bfloat16", raw=True)
        else:
            result_out = lambda: out  # noqa: E731 (the caller's own tensor comes back)
        source = plan.views["combine_send"] if zero_copy else payload
        cuda_c = plan.fits_cuda_c and aligned_rows(source, result)
        args = dict(pending_slot=self._slot(), x=source if cuda_c else words32(source), src_info=handle.kernel_src_info,
                    layout_range=handle.kernel_layout_range, topk_idx=idx, topk_weights=weights)
        args |= dict(num_tokens=plan.num_tokens, num_topk=plan.num_topk, out=result) if cuda_c else dict(out=words32(result))

        def build(phases: int) -> Prepared | RawLaunch:
            if cuda_c:
                fixed = self._control(plan.layout, plan.views, "combine", "combine_x", plan.meta, config, phases)
                fixed |= dict(flags=plan.views["combine_flags"])
                warps = low_latency_cuda.THREADS // 32  # the receive: a warp a token
                return self._raw(low_latency_cuda.COMBINE_KERNEL, low_latency_cuda.COMBINE, fixed, args, plan.layout,
                                 phases, token_blocks=-(-plan.layout.num_max_tokens // warps))
            fixed = self._fixed(plan.views, LL_COMBINE_FIELDS, plan.meta, config)
            return Prepared(ll_combine_kernel(transport(config.force_put)), config.num_sms, config.num_threads,
                            fixed | dict(phases=phases) | args, tuple(args), spins=bool(phases & RECEIVE))

        hook = self._run(plan, cuda_c, build, args, stream, origin.framework, return_recv_hook)
        return result_out(), hook

    def _combine_plan(self, payload: Any, origin: Any, idx: Any, idx_origin: Any, weights: Any, weights_origin: Any,
                      result: Any, out_origin: Any, sizes: tuple[int, int, int], config: Config) -> CallPlan:
        """The checks of a combine shape (``ValueError`` naming the argument) and its plan."""
        ranks = self.state.num_ranks
        num_max_tokens, hidden, num_experts = sizes
        local = num_experts // ranks
        layout, views = self.layout(num_max_tokens, hidden, num_experts)
        check_array(payload, origin, "x", BFLOAT16, (local, ranks * num_max_tokens, hidden),
                    " (the dispatch's recv_x layout)")
        check_array(idx, idx_origin, "topk_idx", np.int64, (None, None))
        num_tokens, num_topk = idx.shape
        if num_tokens > num_max_tokens:
            raise ValueError(f"topk_idx: {num_tokens} tokens, more than the dispatch's {num_max_tokens} per rank")
        check_array(weights, weights_origin, "topk_weights", np.float32, idx.shape, " (topk_idx's)")
        if result is not None:
            check_array(result, out_origin, "out", BFLOAT16, (num_tokens, hidden))
        meta = (CALL_CODES["low_latency_combine"], DTYPE_CODES["bfloat16"], 2 * hidden, 0, local, num_max_tokens)
        fits = num_topk <= low_latency_cuda.MAX_TOPK and cuda_c_fits(config.force_put, ranks, num_experts)
        return CallPlan(layout, views, meta, fits, num_tokens, num_topk)

    def next_combine_buffer(self, handle: LowLatencyHandle) -> Any:
        """The local ``combine_send`` field of the handle's call shape as a bfloat16 tensor of the
        caller's type ``[local experts, ranks * max tokens, hidden]`` (a zero-copy combine's input)."""
        _, views = self.layout(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        field = views["combine_send"]
        array = xp().asarray(field) if type(field) is DeviceArray else field
        array = array.view(np.uint16).reshape(field.shape[:-1] + (handle.hidden,))
        return to_origin(array, handle.origin, "bfloat16")


def _no_hook() -> None:
    """The hook of a call that received already."""
