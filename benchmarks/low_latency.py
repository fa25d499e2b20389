"""Low-latency dispatch and combine latency (decode) against the normal mode replayed from a graph.

Run on the GPU machine, one process per PE:
    torchrun --nproc_per_node=N benchmarks/low_latency.py [--tokens 1,8,32,128] [--out DIR]

Each rank routes its tokens to top-8 of 256 experts (hidden 7168); dispatch sends FP8 rows
(cast in the kernel), combine bfloat16 rows, as DeepEP's low-latency test does. Per token
count: "dispatch" and "combine" eager (median of CUDA-event timings of ``--batch`` calls back to
back, divided by the batch), "graph: ..." the same calls captured in a CUDA graph and
replayed, "send" / "hook" the two launches of a call with ``return_recv_hook`` (events
around each), and the host time per call (``dispatch_combine.host_overhead_us``, queued
behind GPU work). A time is that of the slowest rank. Baseline, in the same run: the normal
mode's ``dispatch(num_worst_tokens=...)`` + ``combine`` replayed from one CUDA graph.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_name, median_ms, write_results  # noqa: E402
from dispatch_combine import captured, host_overhead_us, mps_running  # noqa: E402

BASELINE = "normal mode: graph of dispatch (worst) + combine"


def split_ms(buffer, call, iterations: int) -> tuple[float, float]:
    """Median GPU times of the send launch and of the hook's launch of ``call(return_recv_hook=True)``."""
    import torch

    sends, hooks = [], []
    for _ in range(iterations + 2):
        start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        hook = call()
        middle.record()
        hook()
        end.record()
        end.synchronize()
        sends.append(start.elapsed_time(middle))
        hooks.append(middle.elapsed_time(end))
    return float(np.median(sends[2:])), float(np.median(hooks[2:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,8,32,128")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    import xmoe

    group = xmoe.init("cuda")
    torch.cuda.set_device(group.device)
    me, ranks = group.rank, group.world_size
    num_gpus = min(torch.cuda.device_count(), ranks)
    most = max(int(t) for t in args.tokens.split(","))
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(most, args.hidden, ranks, args.experts, args.topk),
                         xmoe.Buffer.get_low_latency_rdma_size_hint(most, args.hidden, ranks, args.experts),
                         low_latency_mode=True)
    generator = torch.Generator(device="cuda").manual_seed(4321 + me)
    rows, table = [], []
    for num_tokens in (int(t) for t in args.tokens.split(",")):
        scores = torch.rand(num_tokens, args.experts, device="cuda", generator=generator)
        idx = scores.topk(args.topk, dim=1).indices.to(torch.int64)
        weights = torch.rand(num_tokens, args.topk, device="cuda", generator=generator)
        x = torch.randn(num_tokens, args.hidden, device="cuda", generator=generator).to(torch.bfloat16)
        recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, most, args.experts, use_fp8=False)
        expert_out = recv_x.clone()

        def dispatch(hook: bool = False):
            return buffer.low_latency_dispatch(x, idx, most, args.experts, use_fp8=True, return_recv_hook=hook)[4]

        def combine(hook: bool = False):
            return buffer.low_latency_combine(expert_out, idx, weights, handle, return_recv_hook=hook)[2]

        def both():
            dispatch()
            combine()

        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, args.experts)

        def normal():
            recv = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                   num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=weights,
                                   num_worst_tokens=ranks * num_tokens)
            buffer.combine(recv[0], recv[4], topk_weights=recv[2])

        graphs = {"graph: dispatch": captured(dispatch), "graph: combine": captured(combine),
                  "graph: dispatch+combine": captured(both)}
        times = {"dispatch": median_ms(dispatch, args.iters, batch=args.batch),
                 "combine": median_ms(combine, args.iters, batch=args.batch)}
        times |= {name: median_ms(graph.replay, args.iters, batch=args.batch) for name, graph in graphs.items()}
        send, hook = split_ms(buffer, lambda: dispatch(True), args.iters)
        times |= {"dispatch send": send, "dispatch hook": hook}
        send, hook = split_ms(buffer, lambda: combine(True), args.iters)
        times |= {"combine send": send, "combine hook": hook}
        host = {"dispatch": host_overhead_us(dispatch, args.iters, queued=True),
                "combine": host_overhead_us(combine, args.iters, queued=True),
                "graph: dispatch+combine": host_overhead_us(graphs["graph: dispatch+combine"].replay, args.iters,
                                                            queued=True)}
        baseline_ms = median_ms(captured(normal).replay, args.iters, batch=args.batch)
        gathered = group.allgather((times, host, baseline_ms))
        slowest = {name: max(g[0][name] for g in gathered) for name in times}
        host_us = {name: float(np.median([g[1][name] for g in gathered])) for name in host}
        baseline_us = max(g[2] for g in gathered) * 1e3
        for name, ms in slowest.items():
            case = f"{name} tokens={num_tokens}"
            rows.append({"case": case, "metric": "time", "unit": "us", "higher_is_better": False,
                         "xmoe": round(ms * 1e3, 1), "baseline": round(baseline_us, 1), "baseline_name": BASELINE})
            if name in host_us:
                rows.append({"case": case, "metric": "host overhead", "unit": "us", "higher_is_better": False,
                             "xmoe": round(host_us[name], 1), "baseline": None, "baseline_name": None})
            table.append((case, ms * 1e3, baseline_us, host_us.get(name)))
        group.barrier()

    if me == 0:
        mode = f"{num_gpus}gpu-{ranks}pe" + ("-mps" if mps_running() else "")
        print(f"low-latency: {device_name(num_gpus)}, {mode}, hidden {args.hidden}, top-{args.topk} of {args.experts} "
              f"experts, FP8 dispatch, bf16 combine; baseline: {BASELINE}")
        print(f"{'case':<40} {'time us':>9} {'baseline us':>12} {'host us':>8}")
        for case, t_us, base_us, host in table:
            print(f"{case:<40} {t_us:>9.1f} {base_us:>12.1f} {'-' if host is None else f'{host:.1f}':>8}")
        path = write_results("low_latency", device_name(num_gpus), mode, rows, args.out, {"batch": args.batch})
        print(f"wrote {path}")
    buffer.destroy()


if __name__ == "__main__":
    main()
