"""One MoE layer, xmoe against an unfused PyTorch layer: forward, and forward + backward.

    python benchmarks/moe_layer.py [--out DIR]                                  # a world of one
    torchrun --nproc_per_node=N benchmarks/moe_layer.py [--tokens 4096]       # N PEs, one GPU or N

Shapes: Qwen3-30B-A3B (hidden 2048, 128 experts, top-8, ffn 768) at 128, 4096 and 16384
tokens, and a DeepSeek-V3-like layer (hidden 7168, 256 experts, top-8, ffn 2048, one shared
expert of ffn 2048) at 128 and 4096. xmoe's forward is ``xmoe.moe`` (across ranks also with
``Config(num_chunks=2 / 4)``: dispatch and combine overlapping the experts), its forward +
backward ``xmoe.nn.MoE`` (autograd). The baseline, in the same run and on each rank's own
tokens with all experts (a world of one), is the layer written with PyTorch's own operations:
matmul, softmax, topk, argsort, gather, ``torch._grouped_mm``, SiLU, ``torch._grouped_mm``,
``index_add_``, and its autograd for the backward. Across ranks that baseline does no
communication and holds every expert, so it is a reference point, not the same work.
Times are medians of CUDA-event timings of ``--batch`` calls back to back, divided by the
batch (a backward is timed one at a time); the max over ranks where there are several.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_name, median_ms, write_results  # noqa: E402

#: name -> (hidden, ffn, experts, top-k, shared ffn), token counts
MODELS = {"qwen3-30b-a3b": ((2048, 768, 128, 8, 0), (128, 4096, 16384)),
          "deepseek-v3-like": ((7168, 2048, 256, 8, 2048), (128, 4096))}


def torch_layer(x, w_router, w_up, w_down, top_k, shared):
    """The unfused PyTorch layer (the baseline): the same routing, experts and sum as xmoe.moe."""
    import torch
    import torch.nn.functional as F

    ffn = w_down.shape[2]
    probs = (x @ w_router).float().softmax(dim=-1)
    weights, idx = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    token = order // top_k
    offs = torch.bincount(flat, minlength=w_up.shape[0]).cumsum(0).to(torch.int32)
    gate_up = torch._grouped_mm(x[token], w_up.transpose(1, 2), offs=offs)
    h = F.silu(gate_up[:, :ffn]) * gate_up[:, ffn:]
    y = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs) * weights.flatten()[order, None].to(x.dtype)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token, y.float())
    if shared is not None:
        width = shared[1].shape[1]
        gate_up = x @ shared[0].t()
        out = out + ((F.silu(gate_up[:, :width]) * gate_up[:, width:]) @ shared[1].t()).float()
    return out.to(x.dtype)


def xmoe_module(group, hidden, ffn, experts, top_k, shared_ffn, w_router, w_up, w_down, shared):
    """An ``xmoe.nn.MoE`` holding the given weights (shared storage; ``w_up`` / ``w_down``: this
    rank's experts)."""
    import torch
    from xmoe.nn import MoE

    module = MoE(hidden, ffn, experts, top_k, group=group, num_shared_experts=1 if shared_ffn else 0,
                 shared_ffn=shared_ffn or None, device="cuda")
    with torch.no_grad():
        module.w_router.data = w_router
        module.w_up.data = w_up
        module.w_down.data = w_down
        if shared is not None:
            module.w_shared_up.data, module.w_shared_down.data = shared
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--tokens", type=str, default=None,
                        help="comma-separated token counts per rank (default: each model's list)")
    parser.add_argument("--models", type=str, default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    import xmoe

    group = xmoe.init("cuda") if xmoe.runtime.launched() else None
    ranks = 1 if group is None else group.world_size
    if group is not None:
        torch.cuda.set_device(group.device)
    chunk_counts = (1,) if group is None else (1, 2, 4)

    def slowest(ms: float) -> float:
        return ms if group is None else max(group.allgather(ms))

    rows = []
    report = group is None or group.rank == 0
    if report:
        print(f"{'case':<44} {'xmoe fwd us':>12} {'torch fwd us':>13} {'ratio':>6} {'xmoe f+b us':>12} "
              f"{'torch f+b us':>13} {'ratio':>6}")
    for model in args.models.split(","):
        (hidden, ffn, experts, top_k, shared_ffn), token_counts = MODELS[model]
        if args.tokens:
            token_counts = [int(t) for t in args.tokens.split(",")]
        gen = torch.Generator(device="cuda").manual_seed(0)  # every rank the same full layer

        def randn(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

        w_router = randn(hidden, experts) / hidden**0.5
        w_up = randn(experts, 2 * ffn, hidden) / hidden**0.5
        w_down = randn(experts, hidden, ffn) / ffn**0.5
        shared = None if not shared_ffn else (randn(2 * shared_ffn, hidden) / hidden**0.5,
                                              randn(hidden, shared_ffn) / shared_ffn**0.5)
        local = experts // ranks
        first = 0 if group is None else group.rank * local
        mine_up, mine_down = w_up[first:first + local], w_down[first:first + local]
        module = xmoe_module(group, hidden, ffn, experts, top_k, shared_ffn, w_router, mine_up, mine_down, shared)
        for tokens in token_counts:
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
            base = slowest(median_ms(lambda: torch_layer(x, w_router, w_up, w_down, top_k, shared), args.iters,
                                     batch=args.batch))
            params = [p.requires_grad_() for p in (w_router, w_up, w_down)]
            x_grad = x.clone().requires_grad_()
            base_both = slowest(median_ms(
                lambda: torch_layer(x_grad, *params, top_k, shared).float().sum().backward(), args.iters))
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            mine_both = slowest(median_ms(lambda: module(x_grad).float().sum().backward(), args.iters))
            module.zero_grad(set_to_none=True)
            x_grad.grad = None
            for chunks in chunk_counts:
                config = xmoe.Config(num_chunks=chunks)
                mine = slowest(median_ms(
                    lambda: xmoe.moe(x, w_router, mine_up, mine_down, top_k, group=group, shared=shared,
                                     config=config), args.iters, batch=args.batch))
                case = f"{model} tokens={tokens}" + (f" chunks={chunks}" if group is not None else "")
                both = mine_both if chunks == 1 else None
                rows.append({"case": case, "metric": "forward time", "unit": "us", "higher_is_better": False,
                             "xmoe": round(mine * 1e3, 1), "baseline": round(base * 1e3, 1),
                             "baseline_name": "unfused PyTorch layer"})
                rows.append({"case": case, "metric": "forward + backward time", "unit": "us",
                             "higher_is_better": False, "xmoe": None if both is None else round(both * 1e3, 1),
                             "baseline": round(base_both * 1e3, 1), "baseline_name": "unfused PyTorch layer"})
                if report:
                    both_text = f"{both * 1e3:>12.1f}" if both is not None else f"{'':>12}"
                    ratio_text = f"{base_both / both:>6.2f}" if both is not None else f"{'':>6}"
                    print(f"{case:<44} {mine * 1e3:>12.1f} {base * 1e3:>13.1f} {base / mine:>6.2f} {both_text} "
                          f"{base_both * 1e3:>13.1f} {ratio_text}", flush=True)
        del module, w_up, w_down, mine_up, mine_down, shared
        torch.cuda.empty_cache()
    if report:
        gpus = torch.cuda.device_count() if group is not None else 1
        mode = "1gpu" if group is None else f"{gpus}gpu-{ranks}pe" + ("-mps" if gpus < ranks else "")
        print(f"wrote {write_results('moe_layer', device_name(gpus), mode, rows, args.out)}")
    if group is not None:
        xmoe.finalize()


if __name__ == "__main__":
    main()
