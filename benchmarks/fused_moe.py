"""The fused MoE layer (``xmoe.fused_moe``) against xmoe's unfused layer and the unfused PyTorch layer.

    python benchmarks/fused_moe.py [--tokens 128,4096] [--models ...] [--out DIR]       # a world of one
    torchrun --nproc_per_node=N benchmarks/fused_moe.py                                # N PEs, one GPU or N

Shapes and the PyTorch baseline are ``moe_layer.py``'s (Qwen3-30B-A3B at 128 / 4096 / 16384
tokens, the DeepSeek-V3-like layer with its shared expert at 128 / 4096), forward only. In one
run, per shape: ``xmoe.fused_moe`` (one kernel for dispatch, experts and combine; its handle made
once), ``xmoe.moe`` (router, dispatch, grouped GEMMs, combine as separate launches) and the
unfused PyTorch layer on each rank's own tokens with every expert (no communication: a reference
point across ranks, not the same work). Also the floor of a decode step, as issue 17 counts it:
this rank's experts' weights read once at the rate an H200 copies at (4.26 TB/s measured there;
1.21 GB in 0.28 ms at the Qwen3 shape).
Times are medians of CUDA-event timings, the max over ranks; a layer slower than
``--slow-ms`` per call is timed over ``--slow-iters`` single calls (the fused kernel's experts
are scalar loops today, seconds a call at the large shapes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_name, median_ms, write_results  # noqa: E402
from moe_layer import MODELS, torch_layer  # noqa: E402

#: Bytes a second of the floor: the device copy's 4.26 TB/s measured on one H200.
READ_BYTES_PER_S = 4.26e12


def timed_ms(fn, iterations: int, batch: int, slow_ms: float, slow_iterations: int) -> float:
    """``median_ms`` of ``fn``, over fewer single calls when one call takes more than ``slow_ms``."""
    once = median_ms(fn, 1, warmup=1)
    if once > slow_ms:
        return median_ms(fn, slow_iterations, warmup=0)
    return median_ms(fn, iterations, batch=batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--slow-ms", type=float, default=50.0)
    parser.add_argument("--slow-iters", type=int, default=3)
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

    def slowest(ms: float) -> float:
        return ms if group is None else max(group.allgather(ms))

    def timed(fn) -> float:
        return slowest(timed_ms(fn, args.iters, args.batch, args.slow_ms, args.slow_iters))

    rows = []
    report = group is None or group.rank == 0
    if report:
        print(f"{'case':<36} {'fused us':>11} {'xmoe.moe us':>12} {'torch us':>10} {'floor us':>9} "
              f"{'vs moe':>7} {'vs torch':>8}")
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
        weight_bytes = (mine_up.numel() + mine_down.numel()) * mine_up.element_size()
        for tokens in token_counts:
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
            layer = dict(group=group, shared=shared)
            fused = timed(lambda: xmoe.fused_moe(x, w_router, mine_up, mine_down, top_k, **layer))
            unfused = timed(lambda: xmoe.moe(x, w_router, mine_up, mine_down, top_k, **layer))
            base = timed(lambda: torch_layer(x, w_router, w_up, w_down, top_k, shared))
            floor_ms = weight_bytes / READ_BYTES_PER_S * 1e3
            case = f"{model} tokens={tokens}"
            for baseline, name in ((unfused, "xmoe.moe (unfused)"), (base, "unfused PyTorch layer"),
                                   (floor_ms, "experts' weights read once")):
                rows.append({"case": case, "metric": "forward time", "unit": "us", "higher_is_better": False,
                             "xmoe": round(fused * 1e3, 1), "baseline": round(baseline * 1e3, 1),
                             "baseline_name": name})
            if report:
                print(f"{case:<36} {fused * 1e3:>11.1f} {unfused * 1e3:>12.1f} {base * 1e3:>10.1f} "
                      f"{floor_ms * 1e3:>9.1f} {unfused / fused:>7.2f} {base / fused:>8.2f}", flush=True)
        del w_up, w_down, mine_up, mine_down, shared
        torch.cuda.empty_cache()
    if report:
        gpus = torch.cuda.device_count() if group is not None else 1
        mode = "1gpu" if group is None else f"{gpus}gpu-{ranks}pe" + ("-mps" if gpus < ranks else "")
        print(f"wrote {write_results('fused_moe', device_name(gpus), mode, rows, args.out)}")
    if group is not None:
        xmoe.finalize()


if __name__ == "__main__":
    main()
