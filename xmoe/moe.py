"""``xmoe.moe``: one MoE layer's forward pass, router -> dispatch -> experts -> combine.

Every rank passes its own tokens and its own experts (rank r holds experts ``r * E / R`` to
``(r + 1) * E / R - 1``). The router (``xmoe.router``) picks each token's top-k experts; the
normal mode's ``Buffer`` moves each token once to every rank that holds one of its experts;
there each (row, local expert) pair is copied to its expert's part of one array
(``kernels/pairs``), the experts run as two grouped GEMMs (SwiGLU fused into the up
projection, the routing weight into the down projection, ``kernels/gemm``), and each row's
pair outputs are summed in float32 and rounded to bfloat16 once; combine sums each token's
rows from every rank. A world of one skips dispatch and combine. Shared experts (a dense
SwiGLU MLP every token goes through) are added.

The experts' part reads nothing back from the device: the pair counts come from the router
(a world of one) or from dispatch's per-expert counts (across ranks the host waits once a
dispatch, for its counts). With ``Config(num_chunks=n)`` the tokens go in n chunks: the
dispatch of chunk i + 1 and the combine of chunk i - 1 run on the Buffer's communication
stream while the experts of chunk i run on the caller's stream; shared experts run on a
second stream from the start. Autograd is PyTorch's adapter, ``nn.py``.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from typing import Any, Callable, NamedTuple

import numpy as np

from xmoe import runtime
from xmoe.arguments import as_group, check_array, check_int
from xmoe.device_memory import on_gpu, xp
from xmoe.config import Config, check_config
from xmoe.event import EventOverlap, current_stream, event_on_current_stream
from xmoe.interop import BFLOAT16, Origin, as_array, to_origin
from xmoe.kernels.pairs import gather_pairs, sum_pairs

#: Buffers ``moe`` made, per (group, hidden, experts, top-k): (tokens per rank they hold, Buffer).
_BUFFERS: dict[tuple, tuple[int, Any]] = {}


def moe(x: Any, w_router: Any, w_up: Any, w_down: Any, top_k: int, *, group: Any = None, scoring: str = "softmax",
        bias: Any = None, n_group: int | None = None, topk_group: int | None = None, renormalize: bool = True,
        scaling: float = 1.0, shared: tuple[Any, Any] | None = None, return_aux: bool = False,
        config: Config | None = None) -> Any:
    """One MoE layer: ``y[t] = sum_k weight[t, k] * expert_k(x[t]) (+ shared(x[t]))``.

    Args:
        x: bfloat16 ``[tokens, hidden]``, this rank's tokens (the count may differ between ranks).
        w_router: bfloat16 ``[hidden, experts]``, the full router (logits = ``x @ w_router``).
        w_up: bfloat16 ``[local experts, 2 * ffn, hidden]``, this rank's experts' gate rows then up
            rows (``nn.Linear`` / vLLM ``w13`` layout).
        w_down: bfloat16 ``[local experts, hidden, ffn]``.
        top_k: experts per token.
        group: the :class:`xmoe.Group` or a ``torch.distributed`` group of every rank; None: a
            world of one (no communication).
        scoring, bias, n_group, topk_group, renormalize, scaling: as ``xmoe.router`` takes them
            (weights renormalised to sum to 1 by default).
        shared: ``(w_shared_up bfloat16 [2 * shared_ffn, hidden], w_shared_down bfloat16
            [hidden, shared_ffn])``, a dense SwiGLU MLP added for every token, or None.
        return_aux: also return this rank's auxiliary losses (see :func:`aux_losses`).
        config: the Buffer's :class:`xmoe.Config` for dispatch and combine, and
            ``num_chunks``: the tokens split into that many chunks so that communication
            overlaps the experts (the same on every rank). None: the defaults, one chunk.

    Returns:
        bfloat16 ``[tokens, hidden]``, the caller's tensor type; with ``return_aux``, the tuple
        ``(y, load-balancing loss, router z-loss)`` (the losses as Python floats: forward only).
    """
    from xmoe.kernels.router import route

    layer = check_layer(x, w_router, w_up, w_down, top_k, group, shared)
    x_array, origin, group, num_ranks = layer.x, layer.origin, layer.group, layer.num_ranks
    (num_tokens, hidden), num_experts, top_k = x_array.shape, layer.num_experts, layer.top_k
    if origin.framework == "jax" and num_ranks > 1:
        import jax

        if not jax.config.jax_enable_x64:  # the router's int64 top-k ids would come back as int32
            raise ValueError("x: JAX arrays across ranks need jax.config.update('jax_enable_x64', True) "
                             "(dispatch takes int64 top-k ids)")
    config = check_config_for_backend(config)
    stream = current_stream(origin.framework) if on_gpu() else None
    with stream or nullcontext():  # CuPy's work on the caller's stream, with the kernels
        logits, idx, weights, counts = route(x, w_router, top_k, scoring=scoring, bias=bias, n_group=n_group,
                                             topk_group=topk_group, renormalize=renormalize, scaling=scaling)
        shared_rows = None if shared is None else start_shared_mlp(x_array, layer.shared, stream)
        if num_ranks == 1:  # every id the router picks is valid: tokens * k pairs
            y = expert_rows(x_array, idx, weights, counts, idx.size, layer.w_up, layer.w_down, stream,
                            extra=shared_rows)
        else:
            buffer = layer_buffer(group, num_tokens, hidden, num_experts, top_k)
            y = _routed_experts(buffer, x, to_origin(idx, origin), to_origin(weights, origin), num_experts,
                                layer.w_up, layer.w_down, origin, config, stream)
            if shared_rows is not None:
                y = add_to_rows(y, shared_rows(), stream)
    y = to_origin(y, origin, "bfloat16")
    if return_aux:
        return (y,) + aux_losses(logits, counts, top_k)
    return y


class LayerArguments(NamedTuple):
    """The arguments of one MoE layer call, checked: backend arrays (bfloat16 as uint16 bits)."""

    x: Any  # [tokens, hidden]
    origin: Origin  # x's framework and dtype
    group: runtime.Group | None
    num_ranks: int
    num_experts: int
    top_k: int
    w_up: Any  # [local experts, 2 * ffn, hidden]
    w_down: Any  # [local experts, hidden, ffn]
    shared: tuple[Any, Any] | None  # (up [2 * width, hidden], down [hidden, width])


def check_layer(x: Any, w_router: Any, w_up: Any, w_down: Any, top_k: int, group: Any,
                shared: tuple[Any, Any] | None) -> LayerArguments:
    """:func:`moe`'s arguments of these names checked (``ValueError`` naming a bad one) and
    converted; the shapes are those :func:`moe` documents."""
    x_array, origin = as_array(x, "x")
    check_array(x_array, origin, "x", BFLOAT16, (None, None))
    hidden = x_array.shape[1]
    group = None if group is None else as_group(group)
    num_ranks = 1 if group is None else group.world_size
    router_array, router_origin = as_array(w_router, "w_router")
    check_array(router_array, router_origin, "w_router", BFLOAT16, (hidden, None), " ([hidden, experts])")
    num_experts = router_array.shape[1]
    if num_experts % num_ranks:
        raise ValueError(f"w_router: {num_experts} experts do not split evenly over {num_ranks} ranks")
    local = num_experts // num_ranks
    up, up_origin = as_array(w_up, "w_up")
    check_array(up, up_origin, "w_up", BFLOAT16, (local, None, hidden), " ([local experts, 2 * ffn, hidden])")
    ffn = up.shape[1] // 2
    down, down_origin = as_array(w_down, "w_down")
    check_array(down, down_origin, "w_down", BFLOAT16, (local, hidden, ffn), " ([local experts, hidden, ffn])")
    top_k = check_int("top_k", top_k, 1)
    return LayerArguments(x_array, origin, group, num_ranks, num_experts, top_k, up, down,
                          None if shared is None else shared_weights(shared, hidden))


def check_config_for_backend(config: Any) -> Config:
    """``config`` (None: the defaults) checked in every field for the backend in use."""
    if config is None:
        return Config()
    check_config(config)
    config.resolved("cuda" if on_gpu() else "sim")  # checks every field now (the Buffer resolves it again)
    return config


def _caller_event(origin: Origin) -> EventOverlap:
    """An event now on the caller's stream (nothing to wait for on the simulator)."""
    return event_on_current_stream(origin.framework) if on_gpu() else EventOverlap()


def _routed_experts(buffer: Any, x: Any, idx: Any, weights: Any, num_experts: int, w_up: Any, w_down: Any,
                    origin: Origin, config: Config, stream: Any) -> Any:
    """uint16 (bfloat16 bits) ``[tokens, hidden]``: the routed experts' sum for this rank's tokens
    across ranks, in ``config.num_chunks`` chunks of tokens.

    The Buffer's calls run on its communication stream (``async_finish``) in the order
    dispatch 0, dispatch 1, combine 0, dispatch 2, combine 1, ...; the experts of chunk i run
    on the caller's stream between dispatch i and combine i, so they overlap dispatch i + 1
    and combine i - 1. ``x``, ``idx`` (int64 ``[tokens, k]``), ``weights`` (float32
    ``[tokens, k]``): the caller's tensors."""
    num_tokens = idx.shape[0]
    chunks = config.num_chunks
    bounds = [num_tokens * i // chunks for i in range(chunks + 1)]
    routed = _caller_event(origin)  # the router's top-k, which every chunk's layout reads
    held = []  # every chunk's tensors: the communication stream reads or writes them until its last call
    combined, finished = [], None

    def combine(rows: Any, handle: Any, experts_done: EventOverlap) -> None:
        nonlocal finished
        out, _, finished = buffer.combine(rows, handle, config=config, previous_event=experts_done,
                                          async_finish=True)
        combined.append(as_array(out, "combined")[0])
        held.append(out)

    pending = None
    for start, end in zip(bounds, bounds[1:]):
        chunk_x, chunk_idx, chunk_weights = x[start:end], idx[start:end], weights[start:end]
        per_rank, _, per_expert, in_rank, laid_out = buffer.get_dispatch_layout(
            chunk_idx, num_experts, previous_event=routed, async_finish=True)
        recv_x, recv_idx, recv_weights, per_expert_list, handle, received = buffer.dispatch(
            chunk_x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=chunk_idx, topk_weights=chunk_weights, config=config, previous_event=laid_out,
            async_finish=True)
        if pending is not None:
            combine(*pending)
        received.current_stream_wait()
        counts = xp().asarray(np.asarray(per_expert_list, dtype=np.int32))
        rows = expert_rows(as_array(recv_x, "recv_x")[0], as_array(recv_idx, "recv_topk_idx")[0],
                           as_array(recv_weights, "recv_topk_weights")[0], counts, sum(per_expert_list), w_up,
                           w_down, stream)
        rows = to_origin(rows, origin, "bfloat16")
        pending = (rows, handle, _caller_event(origin))
        held.append((chunk_x, chunk_idx, chunk_weights, per_rank, per_expert, in_rank, recv_x, recv_idx,
                     recv_weights, rows))
    combine(*pending)
    finished.current_stream_wait()
    return combined[0] if chunks == 1 else xp().concatenate(combined)


def aux_losses(logits: Any, counts: Any, top_k: int) -> tuple[float, float]:
    """``(load-balancing loss, z-loss)`` of one rank's router: Switch/GShard's
    ``experts * sum_e f_e * P_e`` (``f_e``: the fraction of the tokens' top-k slots routed to e,
    ``P_e``: e's mean softmax probability) and ``mean_t logsumexp(logits_t)^2``; 0 without tokens.
    ``logits`` float32 ``[tokens, experts]``, ``counts`` int32 ``[experts]``."""
    xpm = xp()
    num_tokens, num_experts = logits.shape
    if num_tokens == 0:
        return 0.0, 0.0
    peak = logits.max(axis=1, keepdims=True)
    exp = xpm.exp(logits - peak)
    total = exp.sum(axis=1, keepdims=True)
    probs = exp / total
    fraction = counts.astype(np.float32) / np.float32(num_tokens * top_k)
    balance = float(num_experts * (fraction * probs.mean(axis=0)).sum())
    z_loss = float(((xpm.log(total) + peak) ** 2).mean())
    return balance, z_loss


def expert_rows(rows: Any, topk_idx: Any, topk_weights: Any, counts: Any, num_pairs: int, w_up: Any, w_down: Any,
                stream: Any, extra: Callable[[], Any] | None = None) -> Any:
    """uint16 (bfloat16 bits) ``[rows, hidden]``: each row's sum over its (local expert id, weight)
    pairs of ``weight * down(swiglu(up(row)))``, each pair's term rounded to bfloat16 as the down
    GEMM stores it, the sum in float32 (plus ``extra()``, float32 ``[rows, hidden]``, where given)
    rounded once.

    ``rows`` uint16 ``[rows, hidden]``, ``topk_idx`` int64 ``[rows, k]`` (-1: no expert here),
    ``topk_weights`` float32 ``[rows, k]``, ``counts`` int32 ``[local experts]`` the pairs of each
    expert and ``num_pairs`` their sum (what the router or dispatch counted), weights as
    :func:`moe` takes them; all backend arrays. The work runs on ``stream`` (a CuPy stream; None
    on the simulator); ``extra`` is called just before the sum (it may make ``stream`` wait)."""
    from xmoe.kernels.gemm import GemmVariant, Problem, gemm_into

    num_local, ffn, hidden = w_up.shape[0], w_up.shape[1] // 2, w_up.shape[2]
    with stream or nullcontext():
        pairs = gather_pairs(rows, topk_idx, topk_weights, counts, num_pairs, stream)
        h = xp().empty((num_pairs, ffn), np.uint16)
        gemm_into(Problem(pairs.rows, w_up, h, pairs.offs, None, num_pairs, ffn, hidden, num_local),
                  GemmVariant("swiglu", "nk", "bf16"), stream)
        pair_out = xp().empty((num_pairs, hidden), np.uint16)
        gemm_into(Problem(h, w_down, pair_out, pairs.offs, pairs.weights, num_pairs, hidden, ffn, num_local),
                  GemmVariant("row_scale", "nk", "bf16"), stream)
        return sum_pairs(pair_out, pairs.slot, None if extra is None else extra(), stream)


def add_to_rows(rows: Any, extra: Any, stream: Any) -> Any:
    """uint16 (bfloat16 bits) ``rows + extra``, summed in float32 and rounded once (``rows``
    bfloat16 bits ``[n, hidden]``, ``extra`` float32 ``[n, hidden]``; one pair a row for
    :func:`~xmoe.kernels.pairs.sum_pairs`)."""
    return sum_pairs(rows, xp().arange(rows.shape[0], dtype=np.int32)[:, None], extra, stream)


def shared_weights(shared: Any, hidden: int) -> tuple[Any, Any]:
    """``shared``'s two weights as backend arrays (bfloat16 bits), checked."""
    if not (isinstance(shared, tuple) and len(shared) == 2):
        raise ValueError("shared: expected (w_shared_up [2 * ffn, hidden], w_shared_down [hidden, ffn])")
    up, up_origin = as_array(shared[0], "shared[0]")
    check_array(up, up_origin, "shared[0]", BFLOAT16, (None, hidden), " ([2 * shared_ffn, hidden])")
    down, down_origin = as_array(shared[1], "shared[1]")
    check_array(down, down_origin, "shared[1]", BFLOAT16, (hidden, up.shape[0] // 2), " ([hidden, shared_ffn])")
    return up, down


@lru_cache(maxsize=8)
def _side_stream(device: int) -> Any:
    import cupy

    return cupy.cuda.Stream(non_blocking=True)


def start_shared_mlp(x: Any, weights: tuple[Any, Any], stream: Any) -> Callable[[], Any]:
    """Start the dense SwiGLU MLP of the shared experts on every token of ``x`` (uint16
    ``[tokens, hidden]``); on the GPU it runs on a second stream, beside the routed experts.
    Returns a function that gives its float32 ``[tokens, hidden]`` result, ordered before the
    caller's stream's next work."""
    up, down = weights
    if stream is None:
        ready = _dense_swiglu(x, up, down, None)
        return lambda: ready
    import cupy

    side = _side_stream(cupy.cuda.runtime.getDevice())
    side.wait_event(stream.record())
    result = _dense_swiglu(x, up, down, side)
    done = side.record()

    def wait() -> Any:
        stream.wait_event(done)
        return result

    return wait


def _dense_swiglu(x: Any, up: Any, down: Any, stream: Any) -> Any:
    """float32 ``[tokens, hidden]``: ``down(swiglu(up(x)))`` for every row of ``x`` (uint16
    ``[tokens, hidden]``), ``up`` ``[2 * width, hidden]``, ``down`` ``[hidden, width]``."""
    from xmoe.kernels.gemm import GemmVariant, Problem, gemm_into

    (tokens, hidden), width = x.shape, down.shape[1]
    with stream or nullcontext():
        offs = xp().full((1,), tokens, dtype=np.int32)
        h = xp().empty((tokens, width), np.uint16)
        gemm_into(Problem(x, up[None], h, offs, None, tokens, width, hidden, 1), GemmVariant("swiglu", "nk", "bf16"),
                  stream)
        out = xp().empty((tokens, hidden), np.float32)
        gemm_into(Problem(h, down[None], out, offs, None, tokens, hidden, width, 1), GemmVariant("none", "nk", "f32"),
                  stream)
    return out


def sized_for_tokens(cache: dict[tuple, tuple[int, Any]], key: tuple, group: runtime.Group, num_tokens: int,
                     make: Callable[[int], Any], release: Callable[[Any], None]) -> Any:
    """The object ``cache`` holds under ``key`` for calls of up to its token count (collective: the
    largest ``num_tokens`` of any rank sizes it; every rank releases it and makes a new one,
    ``make(tokens)``, when a call outgrows it)."""
    most = max(group.allgather(num_tokens))
    held = cache.get(key)
    if held is None or held[0] < most:
        if held is not None:
            release(held[1])
        held = cache[key] = (most, make(most))
    return held[1]


def layer_buffer(group: runtime.Group, num_tokens: int, hidden: int, num_experts: int, top_k: int) -> Any:
    """A Buffer of ``group`` that holds this call (:func:`sized_for_tokens`)."""
    from xmoe.buffer import Buffer

    def make(most: int) -> Any:
        return Buffer(group, Buffer.get_nvl_size_hint(most, hidden, group.world_size, num_experts, top_k))

    return sized_for_tokens(_BUFFERS, (id(group), hidden, num_experts, top_k), group, num_tokens, make,
                            lambda buffer: buffer.destroy())
