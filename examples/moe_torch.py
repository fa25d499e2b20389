"""Train one MoE layer across ranks with PyTorch: forward, backward, an optimiser step.

    python examples/moe_torch.py                                  # a world of one
    torchrun --nproc_per_node=2 examples/moe_torch.py             # 2 ranks (GPU: CUDA tensors)
    mpirun -n 2 python examples/moe_torch.py                      # 2 ranks on the CPU simulator

Each rank holds its share of the experts in an ``xmoe.nn.MoE`` (router, routed experts and
a shared expert), draws its own tokens and fits the layer to a fixed random target map
for a few steps of Adam. The backward runs on xmoe as the forward does: dispatch's gradient
is a combine and combine's a dispatch. Rank 0 prints the loss of every rank per step.
"""

from __future__ import annotations

import torch

import xmoe
import xmoe.nn


def run(group: xmoe.Group | None = None, steps: int = 5, tokens: int = 32, hidden: int = 64, ffn: int = 32,
        experts: int = 8, top_k: int = 2) -> list[float]:
    """``steps`` training steps on every rank of ``group`` (None: a world of one); the mean loss
    over the ranks after each step."""
    me, ranks = (group.rank, group.world_size) if group is not None else (0, 1)
    device = "cuda" if xmoe.init().backend == "cuda" else "cpu"
    torch.manual_seed(0)  # the same router and shared expert on every rank
    layer = xmoe.nn.MoE(hidden, ffn, experts, top_k, group=group, num_shared_experts=1, device=device)
    generator = torch.Generator().manual_seed(1 + me)
    x = torch.randn(tokens + me, hidden, generator=generator).to(device, torch.bfloat16)
    target = torch.tanh(x.float() @ torch.randn(hidden, hidden, generator=generator).to(device) / hidden ** 0.5)
    optimiser = torch.optim.Adam(layer.parameters(), lr=3e-3)
    history = []
    for step in range(steps):
        loss = ((layer(x).float() - target) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses = group.allgather(loss.item()) if group is not None else [loss.item()]
        history.append(sum(losses) / ranks)
        if me == 0:
            print(f"step {step}: loss per rank {[round(value, 4) for value in losses]}")
    return history


if __name__ == "__main__":
    world = xmoe.init()
    run(world if world.world_size > 1 else None)
