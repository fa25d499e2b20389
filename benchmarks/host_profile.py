"""Where a dispatch/combine call spends host time: cProfile of rank 0 over repeated calls.

    torchrun --nproc_per_node=2 benchmarks/host_profile.py [--tokens 128] [--calls 50]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()

    import torch

    import xmoe

    group = xmoe.init("cuda")
    torch.cuda.set_device(group.device)
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(args.tokens, 7168, group.world_size, 256, 8))
    idx = torch.rand(args.tokens, 256, device="cuda").topk(8, dim=1).indices.to(torch.int64)
    weights = torch.rand(args.tokens, 8, device="cuda")
    x = torch.randn(args.tokens, 7168, device="cuda").to(torch.bfloat16)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 256)

    def calls() -> None:
        for _ in range(args.calls):
            recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=idx, topk_weights=weights)
            buffer.combine(recv_x, handle, topk_weights=recv_w)
            buffer.dispatch(x, handle=handle)

    calls()  # compile and warm up
    profiler = cProfile.Profile()
    profiler.enable()
    calls()
    profiler.disable()
    if group.rank == 0:
        stats = pstats.Stats(profiler)
        stats.sort_stats("cumulative").print_stats(args.top)
    buffer.destroy()


if __name__ == "__main__":
    main()
