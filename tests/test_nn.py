"""The PyTorch adapter (``xmoe.nn``): the layer's output and the gradients of its input and of
every weight (router, experts, shared experts) against a pure-PyTorch layer in float32, on a
world of one and on 2 and 4 ranks (each holding its experts, with different token counts);
CPU tensors on the simulator, CUDA tensors on the GPU."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from xmoe import runtime

HIDDEN, FFN, SHARED, EXPERTS, TOPK = 64, 32, 16, 8, 3
DEVICE = "cuda" if runtime.default_backend() == "cuda" else "cpu"


def weights(seed: int) -> dict:
    """Every weight of the layer (all experts), bfloat16 values, float32 tensors."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).bfloat16().float()  # noqa: E731
    return dict(w_router=rand(HIDDEN, EXPERTS), w_up=rand(EXPERTS, 2 * FFN, HIDDEN), w_down=rand(EXPERTS, HIDDEN, FFN),
                w_shared_up=rand(2 * SHARED, HIDDEN), w_shared_down=rand(HIDDEN, SHARED))


def reference_layer(x, w_router, w_up, w_down, w_shared_up, w_shared_down):
    """The layer in float32 PyTorch (softmax top-k renormalised, SwiGLU experts, a shared expert)."""
    scores = torch.softmax(x @ w_router, dim=1)
    top, idx = torch.topk(scores, TOPK, dim=1)
    weights = top / top.sum(dim=1, keepdim=True)
    gate, up = torch.einsum("th,tkfh->tkf", x, w_up[idx]).chunk(2, dim=2)
    out = torch.einsum("tkf,tkhf->tkh", torch.nn.functional.silu(gate) * up, w_down[idx])
    gate, up = (x @ w_shared_up.T).chunk(2, dim=1)
    return (weights[:, :, None] * out).sum(dim=1) + (torch.nn.functional.silu(gate) * up) @ w_shared_down.T


def layer(group, full: dict, rank: int, ranks: int):
    import xmoe.nn

    module = xmoe.nn.MoE(HIDDEN, FFN, EXPERTS, TOPK, group=group, num_shared_experts=1, shared_ffn=SHARED,
                         device=DEVICE)
    local = slice(rank * EXPERTS // ranks, (rank + 1) * EXPERTS // ranks)
    with torch.no_grad():
        for name, value in full.items():
            getattr(module, name).copy_(value[local] if name in ("w_up", "w_down") else value)
    return module


def check_close(got, want, what):
    assert got is not None and got.shape == want.shape, f"{what}: {None if got is None else got.shape}, want {want.shape}"
    if not want.numel():
        return
    scale = want.abs().max().item()
    err = (got.float() - want).abs().max().item()
    assert err <= 0.02 * scale, f"{what}: max error {err} against max {scale}"  # bfloat16 rounding: ~0.5%


def run_and_compare(group, rank: int, ranks: int, tokens: list[int]) -> None:
    full = {name: value.to(DEVICE) for name, value in weights(0).items()}
    xs = [torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(10 + r)).bfloat16().to(DEVICE)
          for r, n in enumerate(tokens)]
    grads = [torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(20 + r)).to(DEVICE)
             for r, n in enumerate(tokens)]
    module = layer(group, full, rank, ranks)
    x = xs[rank].clone().requires_grad_()
    y = module(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y.float().backward(grads[rank])
    # the reference over every rank's tokens: the experts' gradients sum over them; the router and
    # the shared expert, replicated, are a leaf per rank
    experts = {name: full[name].clone().requires_grad_() for name in ("w_up", "w_down")}
    replicated = [{name: full[name].clone().requires_grad_() for name in ("w_router", "w_shared_up", "w_shared_down")}
                  for _ in range(ranks)]
    ref_xs = [x_r.float().requires_grad_() for x_r in xs]
    outputs = [reference_layer(ref_xs[r], replicated[r]["w_router"], experts["w_up"], experts["w_down"],
                               replicated[r]["w_shared_up"], replicated[r]["w_shared_down"]) for r in range(ranks)]
    sum((out * g).sum() for out, g in zip(outputs, grads)).backward()
    local = slice(rank * EXPERTS // ranks, (rank + 1) * EXPERTS // ranks)
    check_close(y, outputs[rank].detach(), "y")
    check_close(x.grad, ref_xs[rank].grad, "dx")
    for name in ("w_router", "w_shared_up", "w_shared_down"):
        check_close(getattr(module, name).grad, replicated[rank][name].grad, f"d {name}")
    for name in ("w_up", "w_down"):
        check_close(getattr(module, name).grad, experts[name].grad[local], f"d {name}")


def test_moe_module_world_of_one():
    run_and_compare(None, 0, 1, [24])


@pytest.mark.parametrize("ranks", [pytest.param(2, marks=pytest.mark.mpi(ranks=2)),
                                   pytest.param(4, marks=pytest.mark.mpi(ranks=4))])
def test_moe_module_ranks(group, ranks):
    run_and_compare(group, group.rank, ranks, [10, 7, 0, 12][:ranks])
