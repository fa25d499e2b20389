"""``xmoe.fused_moe``: the MoE layer's forward as one kernel for dispatch, experts and combine.

The contract and results are :func:`xmoe.moe`'s (router, top-k weights, SwiGLU experts, shared
experts added); between the router and the output there is one launch, ``kernels/fused.py``,
whose blocks pack tiles of tokens into the experts' owners, run each tile as soon as it lands
and bring the results home tile by tile (the symmetric layout: ``layout/fused.py``). Today that
kernel is the protocol's Numba twin: its experts' products are scalar loops, so on a GPU it is
correct and slow; the tensor-core kernel is to come (issue 17).

For callers who want compilation and allocation done once (FlashMoE's API)::

    handle = xmoe.fused.initialize(group, hidden, ffn, num_experts, top_k, max_tokens)
    y = xmoe.fused.forward(handle, x, w_router, w_up, w_down)
    xmoe.fused.finalize(handle)

``fused_moe(...)`` makes and keeps such a handle per layer shape.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from xmoe import runtime
from xmoe.arguments import as_group, check_int
from xmoe.config import Config
from xmoe.device_memory import kernel_view, on_gpu, strided_view, xp
from xmoe.event import current_stream, stream_pointer
from xmoe.interop import to_origin
from xmoe.layout.fused import FusedLayout, fused_layout
from xmoe.layout.symmetric import contiguous_field
from xmoe.moe import (
    LayerArguments,
    add_to_rows,
    check_config_for_backend,
    check_layer,
    sized_for_tokens,
    start_shared_mlp,
)

#: Rows a tile (FlashMoE's and the grouped GEMM's 128).
BLOCK_M = 128
#: Handles ``fused_moe`` made, per (group, hidden, ffn, experts, top-k, capacity factor): the most
#: tokens a rank they hold, and the handle.
_HANDLES: dict[tuple, tuple[int, "FusedHandle"]] = {}


@dataclass
class FusedHandle:
    """What one fused layer shape keeps between forwards (see :func:`initialize`)."""

    group: runtime.Group | None
    hidden: int
    ffn: int
    num_experts: int
    top_k: int
    layout: FusedLayout
    state: Any  # xmoe.ep.state.BufferState of the layout's symmetric block
    views: dict[str, Any]  # the layout's fields as the kernel takes them
    scratch: dict[str, Any]  # the kernel's scratch arrays (``fill`` and ``tile_done`` zeroed each forward)
    config: Config


def initialize(group: Any, hidden: int, ffn: int, num_experts: int, top_k: int, max_tokens: int, *,
               capacity_factor: float | None = None, block_m: int = BLOCK_M,
               config: Config | None = None) -> FusedHandle:
    """Allocate the symmetric memory of a fused layer (collective: every rank calls it alike).

    Args:
        group: the :class:`xmoe.Group` or a ``torch.distributed`` group of every rank; None: a
            world of one.
        hidden, ffn: the model's and each expert's width; num_experts: in total (a multiple of the
            ranks); top_k: experts per token.
        max_tokens: the most tokens any rank passes to one forward.
        capacity_factor: None (no token dropped: every cell holds every token of a rank), or f:
            a cell holds ``f * max_tokens * top_k / num_experts`` rows, the rest are dropped.
        block_m: rows a tile.
        config: the kernel's launch (``num_sms``, ``num_threads``) and its peer timeout.

    ``ValueError`` naming a bad argument, or giving the bytes needed when the heap cannot hold them.
    """
    from xmoe.comm import get_heap
    from xmoe.ep.state import BufferState

    group = runtime.init() if group is None else as_group(group)
    from xmoe.kernels.fused import MAX_TOPK  # Numba's backend is chosen by now

    hidden, ffn, num_experts, top_k, max_tokens = (check_int(name, value, low) for name, value, low in (
        ("hidden", hidden, 8), ("ffn", ffn, 1), ("num_experts", num_experts, 1), ("top_k", top_k, 1),
        ("max_tokens", max_tokens, 0)))
    if top_k > MAX_TOPK:
        raise ValueError(f"top_k={top_k}: the fused kernel takes at most {MAX_TOPK}")
    config = check_config_for_backend(config).resolved(group.backend)
    layout = fused_layout(group.world_size, num_experts, max_tokens, hidden, top_k, block_m, capacity_factor)
    _check_ranks_agree(group, dict(hidden=hidden, ffn=ffn, num_experts=num_experts, top_k=top_k,
                                   max_tokens=max_tokens, block_m=block_m, capacity_factor=capacity_factor))
    try:
        block = get_heap(group).alloc(layout.nbytes)
    except (MemoryError, RuntimeError) as error:  # the heap's own message names no layer shape
        raise ValueError(layout.size_message(None)) from error
    state = BufferState(group.rank, group.world_size, block)
    return FusedHandle(group, hidden, ffn, num_experts, top_k, layout, state, _views(layout, state),
                       _scratch(layout, ffn), config)


def _check_ranks_agree(group: runtime.Group, shape: dict[str, Any]) -> None:
    """``ValueError`` naming the first argument on which the ranks differ: the layout, and so where
    every rank writes into its peers, follows from them (no later call compares them)."""
    every = group.allgather(tuple(shape.values()))
    for i, name in enumerate(shape):
        values = [ranks_shape[i] for ranks_shape in every]
        if len(set(values)) > 1:
            each = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"{name}: the ranks disagree ({each}); every rank must initialize the fused layer alike")


def _views(layout: FusedLayout, state: Any) -> dict[str, Any]:
    """This rank's views of the layout's fields as the kernel takes them (see ``kernels/fused.py``)."""
    cells = layout.num_local_experts * layout.num_ranks
    words, bits = (layout.capacity, layout.hidden // 2), (layout.capacity, layout.hidden)

    def view(name: str, dtype: Any, shape: tuple[int, ...]) -> Any:
        field = contiguous_field(name, layout.fields[name].offset, dtype, shape)
        return strided_view(state.block.local, field.offset, field.shape, field.dtype, field.strides)

    return dict(tile_flags=view("tile_flags", np.int64, (cells * layout.tiles,)),
                result_flags=view("result_flags", np.int64, (layout.num_experts * layout.tiles,)),
                dispatch_words=view("dispatch_x", np.uint32, (cells,) + words),
                dispatch_bits=view("dispatch_x", np.uint16, (cells,) + bits),
                combine_words=view("combine_x", np.uint32, (layout.num_experts,) + words),
                combine_bits=view("combine_x", np.uint16, (layout.num_experts,) + bits))


def _scratch(layout: FusedLayout, ffn: int) -> dict[str, Any]:
    """The kernel's scratch (``kernels/fused.py``), made once: per cell a row's products, per rank
    the packing counters, per token slot its row in the cell."""
    xpm, cells = xp(), layout.num_local_experts * layout.num_ranks
    return dict(fill=xpm.zeros(layout.num_experts, np.int32),
                tile_done=xpm.zeros((layout.num_experts, layout.tiles), np.int32),
                position=xpm.empty((layout.max_tokens, layout.top_k), np.int32),
                gate_up=xpm.empty((cells, 2 * ffn), np.float32), hidden_act=xpm.empty((cells, ffn), np.float32),
                result_row=xpm.empty((cells, layout.hidden // 2), np.uint32))


def forward(handle: FusedHandle, x: Any, w_router: Any, w_up: Any, w_down: Any, *, scoring: str = "softmax",
            bias: Any = None, n_group: int | None = None, topk_group: int | None = None, renormalize: bool = True,
            scaling: float = 1.0, shared: tuple[Any, Any] | None = None) -> Any:
    """One forward of the layer ``handle`` was made for: the arguments and result of
    :func:`xmoe.moe` (``x`` at most the handle's ``max_tokens`` rows)."""
    layer = check_layer(x, w_router, w_up, w_down, handle.top_k, handle.group, shared)
    return _forward(handle, layer, x, w_router, dict(scoring=scoring, bias=bias, n_group=n_group,
                                                     topk_group=topk_group, renormalize=renormalize, scaling=scaling))


def _forward(handle: FusedHandle, layer: LayerArguments, x: Any, w_router: Any, routing: dict[str, Any]) -> Any:
    """:func:`forward` of checked arguments (``x`` and ``w_router`` also as the caller passed them,
    for the router; ``routing``: its keywords)."""
    from xmoe.comm.device import transport
    from xmoe.kernels.fused import fused_kernel
    from xmoe.kernels.launch import launch
    from xmoe.kernels.router import route

    tokens, hidden = layer.x.shape
    layout, state = handle.layout, handle.state
    if (hidden, layer.num_experts, layer.w_down.shape[2]) != (handle.hidden, handle.num_experts, handle.ffn):
        raise ValueError(f"x / w_router / w_down: hidden {hidden}, {layer.num_experts} experts, ffn "
                         f"{layer.w_down.shape[2]}; the handle was made for {handle.hidden}, {handle.num_experts}, "
                         f"{handle.ffn}")
    if tokens > layout.max_tokens:
        raise ValueError(f"x: {tokens} tokens, more than the handle's max_tokens={layout.max_tokens}")
    state.check_usable()
    stream = current_stream(layer.origin.framework) if on_gpu() else None
    with stream or nullcontext():
        _, idx, weights, counts = route(x, w_router, handle.top_k, **routing)
        shared_rows = None if layer.shared is None else start_shared_mlp(layer.x, layer.shared, stream)
        scratch = handle.scratch
        scratch["fill"].fill(0)
        scratch["tile_done"].fill(0)
        out = xp().empty((tokens, hidden // 2), np.uint32)
        args = dict(x=layer.x.view(np.uint32), topk_idx=idx, topk_weights=weights, counts=counts,
                    w_up=layer.w_up, w_down=layer.w_down, out=out, block_m=layout.block_m,
                    peers=state.peer_offsets, rank=state.rank, calls=state.calls, work=state.work,
                    timeout_ns=handle.config.timeout_ns, errors=state.status.errors) | scratch | handle.views
        args["position"] = scratch["position"][:tokens]
        state.begin("fused_moe", (), handle.config.timeout_s)
        launch(fused_kernel(transport(handle.config.force_put)), handle.config.num_sms, handle.config.num_threads,
               stream_pointer(layer.origin.framework) if on_gpu() else 0, spins=True,
               **{name: kernel_view(value) if hasattr(value, "shape") else value for name, value in args.items()})
        state.raise_on_error()
        y = out.view(np.uint16)
        if shared_rows is not None:
            y = add_to_rows(y, shared_rows(), stream)
    return to_origin(y, layer.origin, "bfloat16")


def finalize(handle: FusedHandle) -> None:
    """Free the handle's symmetric memory (collective)."""
    handle.state.free()


def fused_moe(x: Any, w_router: Any, w_up: Any, w_down: Any, top_k: int, *, group: Any = None,
              scoring: str = "softmax", bias: Any = None, n_group: int | None = None, topk_group: int | None = None,
              renormalize: bool = True, scaling: float = 1.0, shared: tuple[Any, Any] | None = None,
              capacity_factor: float | None = None, config: Config | None = None) -> Any:
    """:func:`xmoe.moe` through the fused kernel (same arguments and result; ``capacity_factor``
    as :func:`initialize` takes it). Collective: the largest token count of any rank sizes a
    handle, made again when a call outgrows it."""
    layer = check_layer(x, w_router, w_up, w_down, top_k, group, shared)
    group = layer.group or runtime.init()
    hidden, ffn = layer.x.shape[1], layer.w_down.shape[2]

    def make(most: int) -> FusedHandle:
        return initialize(group, hidden, ffn, layer.num_experts, layer.top_k, most, capacity_factor=capacity_factor,
                          config=config)

    key = (id(group), hidden, ffn, layer.num_experts, layer.top_k, capacity_factor, config)
    handle = sized_for_tokens(_HANDLES, key, group, layer.x.shape[0], make, finalize)
    return _forward(handle, layer, x, w_router, dict(scoring=scoring, bias=bias, n_group=n_group,
                                                     topk_group=topk_group, renormalize=renormalize, scaling=scaling))
