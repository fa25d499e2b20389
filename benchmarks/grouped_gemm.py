"""Grouped GEMM and router against PyTorch on one GPU, side by side in one run.

    python benchmarks/grouped_gemm.py [--iters 20] [--out DIR]

Shapes of Qwen3-30B-A3B (hidden 2048, ffn 768, 128 experts, top-8; 4096 and 16384 tokens)
and DeepSeek-V3 (hidden 7168, ffn 2048, 256 experts, top-8; 4096 tokens); rows = tokens x 8
routed balanced or Zipf-skewed. Up projection ``[rows, hidden] x [experts, 2 ffn, hidden]``
and down projection ``[rows, ffn] x [experts, hidden, ffn]``: xmoe's kernel against
``torch._grouped_mm`` (baseline) and a dense ``torch.matmul`` of the same FLOPs (ceiling);
the fused rows (SwiGLU, top-k weights) against PyTorch doing the same in separate ops. The
router against PyTorch's matmul, softmax/sigmoid, (group) top-k sequence. Median of CUDA
event timings of ``--batch`` calls back to back (GPU time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_name, median_ms, write_results  # noqa: E402

MODELS = {"qwen3-30b-a3b": (2048, 768, 128, 8), "deepseek-v3": (7168, 2048, 256, 8)}
CASES = [("qwen3-30b-a3b", 4096), ("qwen3-30b-a3b", 16384), ("deepseek-v3", 4096)]


def torch_grouped_topk(logits, k, bias, n_group, topk_group):
    """The PyTorch sequence (vLLM's ``grouped_topk``): sigmoid, bias, group filter, top-k, renormalise."""
    import torch

    tokens = logits.shape[0]
    scores = logits.sigmoid()
    choice = scores + bias[None]
    group_scores = choice.view(tokens, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    mask = mask.unsqueeze(-1).expand(tokens, n_group, choice.shape[1] // n_group).reshape(tokens, -1)
    ids = torch.topk(choice.masked_fill(~mask.bool(), float("-inf")), k=k, dim=-1)[1]
    weights = scores.gather(1, ids)
    return ids, weights / weights.sum(dim=-1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=5, help="calls timed back to back (GPU time, not host)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    import xmoe
    from xmoe.testing.expert import group_sizes

    rng = np.random.default_rng(0)
    rows_out, picked = [], {}

    def tflops(flops: float, ms: float) -> float:
        return flops / ms / 1e9

    def record(case: str, metric: str, unit: str, higher: bool, mine: float, base: float, base_name: str, **extra):
        rows_out.append({"case": case, "metric": metric, "unit": unit, "higher_is_better": higher, "xmoe": mine,
                         "baseline": base, "baseline_name": base_name, **extra})
        ratio = mine / base if higher else base / mine
        print(f"{case:44s} {metric:14s} xmoe {mine:9.1f} {base_name:>34s} {base:9.1f}  {ratio:5.2f}x "
              + " ".join(f"{key} {value}" for key, value in extra.items()), flush=True)

    for model, tokens in CASES:
        hidden, ffn, experts, topk = MODELS[model]
        rows = tokens * topk
        w1 = torch.randn(experts, 2 * ffn, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
        w2 = torch.randn(experts, hidden, ffn, device="cuda", dtype=torch.bfloat16) / ffn**0.5
        for pattern in ("balanced", "zipf"):
            offs = torch.from_numpy(np.cumsum(group_sizes(rng, rows, experts, pattern)).astype(np.int32)).cuda()
            for projection, a, w, in_dim, out_dim in (
                ("up", torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16), w1, hidden, 2 * ffn),
                ("down", torch.randn(rows, ffn, device="cuda", dtype=torch.bfloat16), w2, ffn, hidden),
            ):
                case = f"{model} t{tokens} {projection} {pattern}"
                flops = 2.0 * rows * in_dim * out_dim
                dense_b = torch.randn(in_dim, out_dim, device="cuda", dtype=torch.bfloat16)
                w_t = w.transpose(-2, -1)
                mine = median_ms(lambda: xmoe.grouped_gemm(a, w, offs), args.iters, batch=args.batch)
                base = median_ms(lambda: torch._grouped_mm(a, w_t, offs=offs), args.iters, batch=args.batch)
                dense = median_ms(lambda: torch.matmul(a, dense_b), args.iters, batch=args.batch)
                record(case, "TFLOP/s", "TFLOP/s", True, tflops(flops, mine), tflops(flops, base), "torch._grouped_mm",
                       dense_matmul=round(tflops(flops, dense), 1))
                if projection == "up":
                    fused = median_ms(lambda: xmoe.grouped_gemm(a, w, offs, epilogue="swiglu"), args.iters, batch=args.batch)
                    unfused = median_ms(lambda: (lambda h: F.silu(h[:, :ffn]) * h[:, ffn:])(
                        torch._grouped_mm(a, w_t, offs=offs)), args.iters, batch=args.batch)
                    record(case + " +swiglu", "time", "us", False, fused * 1e3, unfused * 1e3,
                           "torch._grouped_mm + silu*up")
                else:
                    weights = torch.rand(rows, device="cuda")
                    fused = median_ms(lambda: xmoe.grouped_gemm(a, w, offs, row_weights=weights), args.iters, batch=args.batch)
                    unfused = median_ms(lambda: torch._grouped_mm(a, w_t, offs=offs) * weights[:, None].bfloat16(),
                                        args.iters, batch=args.batch)
                    record(case + " +topk weights", "time", "us", False, fused * 1e3, unfused * 1e3,
                           "torch._grouped_mm + multiply")
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        w_router = torch.randn(hidden, experts, device="cuda", dtype=torch.bfloat16) / hidden**0.5
        if model == "deepseek-v3":
            bias = torch.randn(experts, device="cuda") * 0.01
            mine = median_ms(lambda: xmoe.router(x, w_router, topk, scoring="sigmoid", bias=bias, n_group=8,
                                                 topk_group=4, renormalize=True), args.iters, batch=args.batch)
            base = median_ms(lambda: torch_grouped_topk((x @ w_router).float(), topk, bias, 8, 4), args.iters, batch=args.batch)
        else:
            mine = median_ms(lambda: xmoe.router(x, w_router, topk, renormalize=True), args.iters, batch=args.batch)
            base = median_ms(lambda: (lambda p: (lambda wv, wi: (wi, wv / wv.sum(-1, keepdim=True)))(
                *torch.topk(p, topk, dim=-1)))(torch.softmax((x @ w_router).float(), dim=-1)), args.iters, batch=args.batch)
        record(f"{model} t{tokens} router", "time", "us", False, mine * 1e3, base * 1e3,
               "torch matmul+score+topk")

    from xmoe.kernels.gemm.autotune import cache_path

    if cache_path().exists():
        picked = __import__("json").loads(cache_path().read_text())
    path = write_results("grouped_gemm", device_name(1), "1gpu", rows_out, args.out, {"autotuned": picked})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
