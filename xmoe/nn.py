"""The PyTorch adapter: an MoE layer as an ``nn.Module`` whose backward runs on xmoe too.

Imported only where PyTorch is (``import xmoe.nn``). The forward is :func:`xmoe.moe`'s
pipeline: router -> dispatch -> grouped GEMM up -> SwiGLU -> grouped GEMM down -> weighted sum
-> combine. The router's score, top-k gather and renormalisation run as PyTorch operations
(autograd differentiates them; the choice of experts itself has no gradient), and the
experts as :class:`ExpertsFunction`, whose backward uses the duality of the two collectives:

- combine's backward is a (cached) dispatch: each token's gradient goes to every rank that
  holds one of its experts, as the token went in the forward;
- dispatch's backward is a combine: each received row's input gradient goes back to its
  source and the ranks' parts are summed there, with the gradients of the top-k weights
  as combine's ``topk_weights`` (a rank's own experts' slots, zero elsewhere).

Per expert, with ``A`` its rows, ``gu = A @ W_up^T``, ``h = silu(gate) * up`` and each pair's
weight ``w``, the forward stores ``w * (h @ W_down^T)`` only (the down GEMM's row-weight
epilogue) and sums each row's pairs (``kernels/pairs``). The backward takes one GEMM
``g = dY @ W_down`` for both ``dh = w g`` and ``dw = <g, h>`` (so the unweighted output is
never kept), ``dA = d(gu) @ W_up``; those run as xmoe's grouped GEMMs (the weights read as
``[groups, K, N]``, ``w_layout="kn"``), and the steps between them as two kernels
(``kernels/expert_grads``: each pair's rows of ``dY``, plain and weighted; SwiGLU's derivative
with ``dw``). The weight gradients ``dW_down = (w dY)^T @ h`` and
``dW_up = d(gu)^T @ A`` group the reduction dimension (each expert's rows), which xmoe's
kernels do not do yet: they run as one ``torch._grouped_mm`` each (PyTorch >= 2.9), as
PyTorch's own grouped-GEMM autograd computes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xmoe.arguments import as_group, check_int
from xmoe.device_memory import on_gpu
from xmoe.event import current_stream
from xmoe.interop import Origin, as_array, to_origin
from xmoe.kernels.expert_grads import pair_grads, swiglu_backward
from xmoe.kernels.gemm import grouped_gemm
from xmoe.kernels.pairs import Pairs, gather_pairs, sum_pairs
from xmoe.kernels.router import select_experts
from xmoe.moe import layer_buffer


def _pairs(rows: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, counts: torch.Tensor,
           num_pairs: int) -> Pairs:
    """:func:`xmoe.kernels.pairs.gather_pairs` of PyTorch tensors (``rows`` bfloat16), as PyTorch
    tensors: the pair rows bfloat16, the rest as ``Pairs`` holds them."""
    arrays = gather_pairs(*(as_array(t, name)[0] for t, name in ((rows, "rows"), (topk_idx, "topk_idx"),
                                                                (topk_weights, "topk_weights"), (counts, "counts"))),
                          num_pairs, _stream())
    as_torch = Origin("torch", "float32")  # the dtype is the array's own: no bits to reinterpret
    return Pairs(to_origin(arrays.rows, Origin("torch", "bfloat16"), "bfloat16"),
                 *(to_origin(a, as_torch) for a in arrays[1:]))


def _sum_pairs(pair_out: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """bfloat16 ``[rows, hidden]``: :func:`xmoe.kernels.pairs.sum_pairs` of bfloat16 ``pair_out``."""
    summed = sum_pairs(as_array(pair_out, "pair_out")[0], as_array(slot, "slot")[0], None, _stream())
    return to_origin(summed, Origin("torch", "bfloat16"), "bfloat16")


def _swiglu(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=1)
    return nn.functional.silu(gate) * up


def _pair_grads(grad: torch.Tensor, row_of: torch.Tensor,
                pair_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bfloat16 ``(grad[row_of], grad[row_of] * pair_weights[:, None])``:
    :func:`xmoe.kernels.expert_grads.pair_grads`."""
    rows, weighted = pair_grads(as_array(grad, "grad")[0], as_array(row_of, "row_of")[0],
                                as_array(pair_weights, "pair_weights")[0], _stream())
    return tuple(to_origin(a, Origin("torch", "bfloat16"), "bfloat16") for a in (rows, weighted))


def _swiglu_backward(g: torch.Tensor, gu: torch.Tensor, h: torch.Tensor,
                     pair_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d(gu)`` bfloat16, ``d(pair weights)`` float32): :func:`xmoe.kernels.expert_grads.swiglu_backward`."""
    grad_gu, grad_weights = swiglu_backward(*(as_array(t, name)[0] for t, name in (
        (g, "g"), (gu, "gu"), (h, "h"), (pair_weights, "pair_weights"))), _stream())
    return (to_origin(grad_gu, Origin("torch", "bfloat16"), "bfloat16"),
            to_origin(grad_weights, Origin("torch", "float32")))


def _stream() -> Any:
    """The CuPy view of PyTorch's current stream (None on the simulator)."""
    return current_stream("torch") if on_gpu() else None


def _per_expert_outer(left: torch.Tensor, right: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """bfloat16 ``[experts, left cols, right cols]``: ``left[rows of e]^T @ right[rows of e]`` per
    expert (``left``, ``right`` bfloat16 with the pairs' rows expert by expert, ``offs`` their ends);
    float32 accumulation, zero for an expert without rows."""
    return torch._grouped_mm(left.t(), right, offs=offs)


class ExpertsFunction(torch.autograd.Function):
    """The routed experts of one layer: tokens to their experts' ranks, each expert's SwiGLU MLP,
    the weighted rows back and summed (see the module for the backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, counts: torch.Tensor,
                w_up: torch.Tensor, w_down: torch.Tensor, buffer: Any, num_experts: int) -> torch.Tensor:
        """``x`` bfloat16 ``[tokens, hidden]``, ``topk_idx`` int64 / ``topk_weights`` float32
        ``[tokens, k]``, ``counts`` int32 ``[experts]`` the router's choices per expert, ``w_up``
        bfloat16 ``[local experts, 2 * ffn, hidden]``, ``w_down`` ``[local experts, hidden, ffn]``,
        ``buffer`` the group's Buffer (None: a world of one); returns bfloat16 ``[tokens, hidden]``."""
        x, topk_weights, w_up, w_down = x.detach(), topk_weights.detach(), w_up.detach(), w_down.detach()  # DLPack exports no autograd leaves
        if buffer is None:
            rows, row_idx, row_weights, handle, num_pairs = x, topk_idx, topk_weights, None, topk_idx.numel()
        else:
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
            rows, row_idx, row_weights, per_expert_list, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights)
            counts = torch.tensor(per_expert_list, dtype=torch.int32, device=x.device)
            num_pairs = sum(per_expert_list)
        pairs = _pairs(rows, row_idx, row_weights, counts, num_pairs)
        gu = grouped_gemm(pairs.rows, w_up, pairs.offs)
        h = _swiglu(gu)
        weighted = grouped_gemm(h, w_down, pairs.offs, row_weights=pairs.weights)
        y = _sum_pairs(weighted, pairs.slot)
        if buffer is not None:
            y, _, _ = buffer.combine(y, handle)
        ctx.save_for_backward(pairs.rows, gu, h, pairs.weights, pairs.row_of, pairs.slot, pairs.offs, w_up, w_down)
        ctx.buffer, ctx.handle = buffer, handle
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple:
        a, gu, h, pair_weights, row_of, slot, offs, w_up, w_down = ctx.saved_tensors
        buffer, handle = ctx.buffer, ctx.handle
        grad = grad_y.to(torch.bfloat16).contiguous()
        if buffer is not None:  # combine's backward: a dispatch along the forward's routing
            grad, _, _, _, _, _ = buffer.dispatch(grad, handle=handle)
        grad_pairs, weighted_grad_pairs = _pair_grads(grad, row_of, pair_weights)
        # d(w o)/dh = w dY W_down and d(w o)/dw = <dY, h W_down^T> = <dY W_down, h>: one GEMM
        # gives both, so the unweighted expert output o is never stored
        grad_h_unweighted = grouped_gemm(grad_pairs, w_down, offs, w_layout="kn", out_dtype="float32")
        grad_gu, grad_pair_weights = _swiglu_backward(grad_h_unweighted, gu, h, pair_weights)
        grad_a = grouped_gemm(grad_gu, w_up, offs, w_layout="kn")
        grad_w_down = _per_expert_outer(weighted_grad_pairs, h, offs)
        grad_w_up = _per_expert_outer(grad_gu, a, offs)
        grad_weights = torch.where(slot >= 0, grad_pair_weights[slot.clamp(min=0)], 0.0)
        grad_x = _sum_pairs(grad_a, slot)
        if buffer is not None:  # dispatch's backward: a combine, the weights' gradients beside
            grad_x, grad_weights, _ = buffer.combine(grad_x, handle, topk_weights=grad_weights)
        return grad_x, None, grad_weights, None, grad_w_up, grad_w_down, None, None


class MoE(nn.Module):
    """One MoE layer of this rank (its tokens, its experts) with autograd.

    Args:
        hidden, ffn: the model's and each expert's width (multiples of 8).
        num_experts: experts in total (a multiple of the ranks); top_k: experts per token.
        group: an :class:`xmoe.Group` or a ``torch.distributed`` group of every rank; None: a
            world of one.
        num_shared_experts, shared_ffn: shared experts, one dense SwiGLU MLP of width
            ``num_shared_experts * shared_ffn`` (``shared_ffn`` None: ``ffn``), added for every token.
        scoring: "softmax" or "sigmoid"; bias (float32 ``[experts]``, for the choice only),
            n_group, topk_group, renormalize, scaling: as :func:`xmoe.select_experts` takes them.
        device: where the parameters live (None: PyTorch's default).

    Parameters: ``w_router`` ``[hidden, experts]``, ``w_up`` ``[local experts, 2 * ffn, hidden]``
    (gate rows, then up rows), ``w_down`` ``[local experts, hidden, ffn]``, and with shared
    experts ``w_shared_up`` ``[2 * width, hidden]``, ``w_shared_down`` ``[hidden, width]``; all
    bfloat16, rank r's experts ``r * E / R`` to ``(r + 1) * E / R - 1``.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, group: Any = None,
                 num_shared_experts: int = 0, shared_ffn: int | None = None, scoring: str = "softmax",
                 bias: torch.Tensor | None = None, n_group: int | None = None, topk_group: int | None = None,
                 renormalize: bool = True, scaling: float = 1.0, device: Any = None) -> None:
        super().__init__()
        self.group = None if group is None else as_group(group)
        ranks = 1 if self.group is None else self.group.world_size
        self.hidden, self.ffn, self.num_experts, self.top_k = (check_int(name, value, 1) for name, value in (
            ("hidden", hidden), ("ffn", ffn), ("num_experts", num_experts), ("top_k", top_k)))
        if num_experts % ranks:
            raise ValueError(f"num_experts={num_experts} does not split evenly over {ranks} ranks")
        local = num_experts // ranks
        self.routing = dict(scoring=scoring, bias=bias, n_group=n_group, topk_group=topk_group)
        self.renormalize, self.scaling = renormalize, scaling

        def weight(*shape: int) -> nn.Parameter:
            values = torch.randn(*shape, device=device) / shape[-1] ** 0.5
            return nn.Parameter(values.to(torch.bfloat16))

        self.w_router = weight(hidden, num_experts)
        self.w_up = weight(local, 2 * ffn, hidden)
        self.w_down = weight(local, hidden, ffn)
        width = check_int("num_shared_experts", num_shared_experts, 0) * (shared_ffn or ffn)
        self.w_shared_up = weight(2 * width, hidden) if width else None
        self.w_shared_down = weight(hidden, width) if width else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(topk_idx int64 [tokens, k], topk_weights float32 [tokens, k], counts int32 [experts])``
        of ``x``: the experts chosen by :func:`xmoe.select_experts`, their weights differentiable
        in the router, and the choices per expert."""
        logits = x.float() @ self.w_router.float()
        idx, _, counts = select_experts(logits.detach(), self.top_k, **self.routing)
        scores = torch.softmax(logits, dim=1) if self.routing["scoring"] == "softmax" else torch.sigmoid(logits)
        weights = scores.gather(1, idx)
        if self.renormalize:
            weights = weights / weights.sum(dim=1, keepdim=True)
        return idx, weights * self.scaling, counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens ``x`` bfloat16 ``[tokens, hidden]`` through the layer (same shape).
        On the GPU the shared experts run on a second stream beside the router and the routed
        experts (autograd runs each backward op on its forward op's stream)."""
        shared, joined = (None, None) if self.w_shared_up is None else self._start_shared(x)
        idx, weights, counts = self.route(x)
        buffer = None if self.group is None else layer_buffer(self.group, x.shape[0], self.hidden,
                                                                self.num_experts, self.top_k)
        y = ExpertsFunction.apply(x, idx, weights, counts, self.w_up, self.w_down, buffer, self.num_experts)
        if shared is None:
            return y
        joined()
        return (y.float() + shared.float()).to(torch.bfloat16)

    def _start_shared(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The shared experts' output bfloat16 ``[tokens, hidden]`` (bfloat16 matmuls, float32
        accumulation), started on a side stream on the GPU, and a function that makes the
        caller's stream wait for it."""
        if not x.is_cuda:
            return _swiglu(x @ self.w_shared_up.T) @ self.w_shared_down.T, lambda: None
        main = torch.cuda.current_stream(x.device)
        side = _side_stream(x.device)
        side.wait_stream(main)  # x is ready
        with torch.cuda.stream(side):
            x.record_stream(side)  # the allocator keeps x's memory until the side stream is done with it
            shared = _swiglu(x @ self.w_shared_up.T) @ self.w_shared_down.T

        def joined() -> None:
            main.wait_stream(side)
            shared.record_stream(main)

        return shared, joined


_SIDE_STREAMS: dict[Any, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The shared experts' stream on ``device`` (one per device, made once)."""
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return stream
