"""One MoE layer's forward pass, xmoe.moe against an unfused PyTorch layer, a world of one.

    python benchmarks/moe_layer.py [--out DIR]

Shapes: Qwen3-30B-A3B (hidden 2048, 128 experts, top-8, ffn 768) at 128, 4096 and 16384
tokens, and a DeepSeek-V3-like layer (hidden 7168, 256 experts, top-8, ffn 2048, one shared
expert of ffn 2048) at 128 and 4096. The baseline, in the same run, is the layer written with
PyTorch's own operations: matmul, softmax, topk, argsort, gather, ``torch._grouped_mm``, SiLU,
``torch._grouped_mm``, ``index_add_`` (its forward + backward through autograd is recorded
too; xmoe's backward is not built yet, issue 16). Times are medians of CUDA-event timings of
``--batch`` calls back to back, divided by the batch; the host reads one count a call in
``xmoe.moe``, which that timing includes.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    import xmoe

    rows = []
    print(f"{'case':<36} {'xmoe fwd us':>12} {'torch fwd us':>13} {'ratio':>6} {'torch fwd+bwd us':>17}")
    for model, ((hidden, ffn, experts, top_k, shared_ffn), token_counts) in MODELS.items():
        w_router = torch.randn(hidden, experts, device="cuda", dtype=torch.bfloat16) / hidden**0.5
        w_up = torch.randn(experts, 2 * ffn, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
        w_down = torch.randn(experts, hidden, ffn, device="cuda", dtype=torch.bfloat16) / ffn**0.5
        shared = None if not shared_ffn else (
            torch.randn(2 * shared_ffn, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5,
            torch.randn(hidden, shared_ffn, device="cuda", dtype=torch.bfloat16) / shared_ffn**0.5)
        for tokens in token_counts:
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
            mine = median_ms(lambda: xmoe.moe(x, w_router, w_up, w_down, top_k, shared=shared), args.iters,
                             batch=args.batch)
            base = median_ms(lambda: torch_layer(x, w_router, w_up, w_down, top_k, shared), args.iters,
                             batch=args.batch)
            params = [p.requires_grad_() for p in (w_router, w_up, w_down)]
            x_grad = x.clone().requires_grad_()

            def forward_backward():
                torch_layer(x_grad, *params, top_k, shared).float().sum().backward()

            both = median_ms(forward_backward, args.iters, batch=1)
            for p in params:
                p.requires_grad_(False)
            case = f"{model} tokens={tokens}"
            rows.append({"case": case, "metric": "forward time", "unit": "us", "higher_is_better": False,
                         "xmoe": round(mine * 1e3, 1), "baseline": round(base * 1e3, 1),
                         "baseline_name": "unfused PyTorch layer"})
            rows.append({"case": case, "metric": "forward + backward time", "unit": "us", "higher_is_better": False,
                         "xmoe": None, "baseline": round(both * 1e3, 1), "baseline_name": "unfused PyTorch layer"})
            print(f"{case:<36} {mine * 1e3:>12.1f} {base * 1e3:>13.1f} {base / mine:>6.2f} {both * 1e3:>17.1f}",
                  flush=True)
    print(f"wrote {write_results('moe_layer', device_name(1), '1gpu', rows, args.out)}")


if __name__ == "__main__":
    main()
