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

Per expert, with ``A`` its rows, ``gu = A @ W_up^T`` and ``h = silu(gate) * up``, ``o = h @ W_down^T``:
``dh = (w dY) @ W_down`` and ``dA = d(gu) @ W_up`` run as xmoe's grouped GEMMs (the weights
read as ``[groups, K, N]``, ``w_layout="kn"``); the weight gradients ``dW_down = (w dY)^T @ h``
and ``dW_up = d(gu)^T @ A`` group the reduction dimension (each expert's rows), which xmoe's
kernels do not do yet: they run as one ``torch._grouped_mm`` each (PyTorch >= 2.9), as
PyTorch's own grouped-GEMM autograd computes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xmoe.arguments import as_group, check_int
from xmoe.kernels.gemm import grouped_gemm
from xmoe.kernels.router import select_experts
from xmoe.moe import layer_buffer


class _Pairs:
    """The (row, local expert) pairs of received rows, laid out expert by expert.

    Attributes:
        order: int64 ``[pairs]``, each pair's flat index into ``[rows, k]``; row_of: its row.
        offs: int32 ``[local experts]``, cumulative pair counts (the grouped GEMMs' ``offs``).
    """

    def __init__(self, topk_idx: torch.Tensor, num_local_experts: int) -> None:
        flat = topk_idx.reshape(-1)
        valid = flat >= 0
        keys = torch.where(valid, flat, torch.full_like(flat, num_local_experts))
        num_pairs = int(valid.sum())  # the host sizes the GEMMs: one synchronisation
        self.order = torch.sort(keys, stable=True).indices[:num_pairs]
        self.row_of = self.order // topk_idx.shape[1]
        counts = torch.bincount(flat[valid], minlength=num_local_experts)
        self.offs = torch.cumsum(counts, 0).to(torch.int32)


def _swiglu(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=1)
    return nn.functional.silu(gate) * up


def _swiglu_backward(gu: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=1)
    sig = torch.sigmoid(gate)
    return torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * gate * sig], dim=1)


def _per_expert_outer(left: torch.Tensor, right: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """bfloat16 ``[experts, left cols, right cols]``: ``left[rows of e]^T @ right[rows of e]`` per
    expert (``left``, ``right`` bfloat16 with the pairs' rows expert by expert, ``offs`` their ends);
    float32 accumulation, zero for an expert without rows."""
    return torch._grouped_mm(left.t(), right, offs=offs)


class ExpertsFunction(torch.autograd.Function):
    """The routed experts of one layer: tokens to their experts' ranks, each expert's SwiGLU MLP,
    the weighted rows back and summed (see the module for the backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, w_up: torch.Tensor,
                w_down: torch.Tensor, buffer: Any, num_experts: int) -> torch.Tensor:
        """``x`` bfloat16 ``[tokens, hidden]``, ``topk_idx`` int64 / ``topk_weights`` float32
        ``[tokens, k]``, ``w_up`` bfloat16 ``[local experts, 2 * ffn, hidden]``, ``w_down``
        ``[local experts, hidden, ffn]``, ``buffer`` the group's Buffer (None: a world of one);
        returns bfloat16 ``[tokens, hidden]``."""
        x, topk_weights, w_up, w_down = x.detach(), topk_weights.detach(), w_up.detach(), w_down.detach()  # DLPack exports no autograd leaves
        if buffer is None:
            rows, row_idx, row_weights, handle = x, topk_idx, topk_weights, None
        else:
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
            rows, row_idx, row_weights, _, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights)
        pairs = _Pairs(row_idx, w_up.shape[0])
        a = rows[pairs.row_of].contiguous()
        gu = grouped_gemm(a, w_up, pairs.offs, out_dtype="float32")
        h = _swiglu(gu).to(torch.bfloat16)
        o = grouped_gemm(h, w_down, pairs.offs, out_dtype="float32")
        pair_weights = row_weights.reshape(-1)[pairs.order]
        summed = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        summed.index_add_(0, pairs.row_of, o * pair_weights[:, None])
        y = summed.to(torch.bfloat16)
        if buffer is not None:
            y, _, _ = buffer.combine(y, handle)
        ctx.save_for_backward(a, gu, h, o, pair_weights, w_up, w_down)
        ctx.pairs, ctx.buffer, ctx.handle, ctx.row_shape = pairs, buffer, handle, row_weights.shape
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple:
        a, gu, h, o, pair_weights, w_up, w_down = ctx.saved_tensors
        pairs, buffer, handle = ctx.pairs, ctx.buffer, ctx.handle
        grad = grad_y.to(torch.bfloat16).contiguous()
        if buffer is not None:  # combine's backward: a dispatch along the forward's routing
            grad, _, _, _, _, _ = buffer.dispatch(grad, handle=handle)
        grad_pairs = grad[pairs.row_of].float()
        grad_pair_weights = (grad_pairs * o).sum(dim=1)
        grad_o = (grad_pairs * pair_weights[:, None]).to(torch.bfloat16)
        grad_h = grouped_gemm(grad_o, w_down, pairs.offs, w_layout="kn", out_dtype="float32")
        grad_gu = _swiglu_backward(gu, grad_h).to(torch.bfloat16)
        grad_a = grouped_gemm(grad_gu, w_up, pairs.offs, w_layout="kn", out_dtype="float32")
        grad_w_down = _per_expert_outer(grad_o, h, pairs.offs)
        grad_w_up = _per_expert_outer(grad_gu, a, pairs.offs)
        grad_rows = torch.zeros((ctx.row_shape[0], a.shape[1]), dtype=torch.float32, device=a.device)
        grad_rows.index_add_(0, pairs.row_of, grad_a)
        grad_weights = torch.zeros(ctx.row_shape.numel(), dtype=torch.float32, device=a.device)
        grad_weights[pairs.order] = grad_pair_weights
        grad_weights = grad_weights.reshape(ctx.row_shape)
        grad_x = grad_rows.to(torch.bfloat16)
        if buffer is not None:  # dispatch's backward: a combine, the weights' gradients beside
            grad_x, grad_weights, _ = buffer.combine(grad_x, handle, topk_weights=grad_weights)
        return grad_x, None, grad_weights, grad_w_up, grad_w_down, None, None


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

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(topk_idx int64 [tokens, k], topk_weights float32 [tokens, k])`` of ``x``: the experts
        chosen by :func:`xmoe.select_experts`, their weights differentiable in the router."""
        logits = x.float() @ self.w_router.float()
        idx, _, _ = select_experts(logits.detach(), self.top_k, **self.routing)
        scores = torch.softmax(logits, dim=1) if self.routing["scoring"] == "softmax" else torch.sigmoid(logits)
        weights = scores.gather(1, idx)
        if self.renormalize:
            weights = weights / weights.sum(dim=1, keepdim=True)
        return idx, weights * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens ``x`` bfloat16 ``[tokens, hidden]`` through the layer (same shape)."""
        idx, weights = self.route(x)
        buffer = None if self.group is None else layer_buffer(self.group, x.shape[0], self.hidden,
                                                                self.num_experts, self.top_k)
        y = ExpertsFunction.apply(x, idx, weights, self.w_up, self.w_down, buffer, self.num_experts)
        if self.w_shared_up is not None:
            shared = _swiglu(x @ self.w_shared_up.T)  # bfloat16 matmuls, float32 accumulation
            y = (y.float() + (shared @ self.w_shared_down.T).float()).to(torch.bfloat16)
        return y
