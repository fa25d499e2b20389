"""Dispatch/combine bandwidth against a device copy (one GPU) or NCCL all-to-all (several GPUs).

Run on the GPU machine, one process per PE:
    torchrun --nproc_per_node=N benchmarks/dispatch_combine.py [--tokens 128,...,4096] [--out DIR]

Each rank routes its tokens to top-8 of 256 experts (hidden 7168, bfloat16). Times are the
median of CUDA-event timings of ``--batch`` calls back to back, divided by the batch (the
host queues the next call while the GPU runs one, except where a non-cached dispatch waits
for its receive counts); a call's time is that of the slowest rank. Bandwidth counts
the bytes that cross ranks (rows sent to another rank: payload, top-k ids and weights),
read plus written, as a copy of them moves them: ``2 * bytes / time``. The baseline moves
the same bytes in the same run: with one GPU a device-to-device copy by one process, with
one GPU per PE ``torch.distributed.all_to_all_single`` over NCCL. On one GPU a row a rank
keeps costs the same memory traffic as a row it sends, so that copy is out of reach there
(``NOTES.md``); one GPU also gets a second baseline, "copy of routed rows": every PE at
once copies all the rows it sends, its own included (the true entries of
``is_token_in_rank``), timed as above (slowest rank), and its rows count those bytes for
xmoe too (metric "aggregate bandwidth, all routed rows"; "time" against either baseline).
Host overhead is the median wall time of a call minus the time it spent blocked on the
GPU, for a call queued behind another ("host us") and for one that finds the GPU idle
("idle us"). "dispatch (worst)" dispatches into outputs of ``ranks x tokens`` rows
(``num_worst_tokens``): the host never waits for the received count. "graph: ..." replays
a dispatch (worst) and a combine captured in one CUDA graph (its time and bandwidth count
both calls, against twice the baselines; its host time is that of ``replay()``). "FP8 ..."
dispatches float8_e4m3fn rows with their scales (``xmoe.quantize_fp8``): its bytes are those
rows, and the baselines' times are scaled to them (a copy's time is linear in its bytes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_name, median_ms, write_results  # noqa: E402


def host_overhead_us(fn, iterations: int, queued: bool) -> float:
    """Median host time of a call not spent blocked on the GPU, in microseconds. ``queued``:
    the timed call follows an untimed one, so its launches queue behind GPU work (as in a
    model's forward pass); else the GPU is idle when it starts (the driver then takes
    10-25 us longer per launch, measured on the H100 machine)."""
    import torch

    from xmoe.event import StreamPlan

    overheads = []
    for _ in range(iterations):
        torch.cuda.synchronize()
        if queued:
            fn()
        waited = StreamPlan.waited_s
        wall = time.perf_counter()
        fn()
        wall = time.perf_counter() - wall
        overheads.append((wall - (StreamPlan.waited_s - waited)) * 1e6)
    return float(np.median(overheads))


#: The case that replays a dispatch (worst) and a combine captured in one CUDA graph.
GRAPH = "graph: dispatch (worst)+combine"
#: The prefix of the FP8 payload's cases (rows of float8_e4m3fn with their scales).
FP8 = "FP8 "
#: The second baseline on one GPU: a device copy of every row a rank routes, its own included.
ROUTED_COPY = "copy of routed rows"


def captured(fn):
    """``fn``'s GPU work captured in a CUDA graph (after one eager call that compiles and prepares it)."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def mps_running() -> bool:
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe, "control"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="128,256,512,1024,2048,4096")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    import xmoe
    from xmoe.comm import get_heap

    start_up = time.perf_counter()
    group = xmoe.init("cuda")
    torch.cuda.set_device(group.device)
    me, ranks = group.rank, group.world_size
    num_gpus = min(torch.cuda.device_count(), ranks)
    tokens_list = [int(t) for t in args.tokens.split(",")]
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(max(tokens_list), args.hidden, ranks, args.experts,
                                                              args.topk))
    nvshmem_init_s = get_heap(group).init_seconds
    nccl = dist.new_group(backend="nccl") if num_gpus == ranks and ranks > 1 else None
    generator = torch.Generator(device="cuda").manual_seed(1234 + me)

    def routing(num_tokens: int):
        scores = torch.rand(num_tokens, args.experts, device="cuda", generator=generator)
        idx = scores.topk(args.topk, dim=1).indices.to(torch.int64)
        weights = torch.rand(num_tokens, args.topk, device="cuda", generator=generator)
        x = torch.randn(num_tokens, args.hidden, device="cuda", generator=generator).to(torch.bfloat16)
        return x, idx, weights

    def round_trip(x, idx, weights):
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, args.experts)
        recv = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                               num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=weights)
        buffer.combine(recv[0], recv[4], topk_weights=recv[2])
        return per_rank, in_rank, per_expert, recv

    first = time.perf_counter()
    round_trip(*routing(64))
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - first
    start_up_s = time.perf_counter() - start_up

    rows, table = [], []
    row_bytes = args.hidden * 2 + args.topk * 8 + 4
    fp8_row_bytes = args.hidden + args.hidden // 128 * 4 + args.topk * 8 + 4  # rows, scales, top-k, source
    for num_tokens in tokens_list:
        x, idx, weights = routing(num_tokens)
        per_rank, in_rank, per_expert, recv = round_trip(x, idx, weights)
        recv_x, recv_w, handle = recv[0], recv[2], recv[4]

        def dispatch():
            buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=weights)

        def worst_case():
            buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=weights,
                            num_worst_tokens=ranks * num_tokens)

        def cached():
            buffer.dispatch(x, handle=handle)

        x_fp8 = xmoe.quantize_fp8(x)

        def dispatch_fp8():
            buffer.dispatch(x_fp8, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=weights)

        def cached_fp8():
            buffer.dispatch(x_fp8, handle=handle)

        def combine():
            buffer.combine(recv_x, handle, topk_weights=recv_w)

        def worst_case_and_combine():
            recv = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                   num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=weights,
                                   num_worst_tokens=ranks * num_tokens)
            buffer.combine(recv[0], recv[4], topk_weights=recv[2])

        calls = {"dispatch": dispatch, "dispatch (worst)": worst_case, "cached dispatch": cached, "combine": combine,
                 GRAPH: captured(worst_case_and_combine).replay, FP8 + "dispatch": dispatch_fp8,
                 FP8 + "cached dispatch": cached_fp8}
        mine = {name: median_ms(fn, args.iters, batch=args.batch) for name, fn in calls.items()}
        host = {name: (host_overhead_us(fn, args.iters, queued=True), host_overhead_us(fn, args.iters, queued=False))
                for name, fn in calls.items()}
        sent = per_rank.cpu().numpy()  # sent[r]: tokens with is_token_in_rank[:, r]
        crossing = int(sent.sum() - sent[me])
        routed = int(sent.sum())  # every (token, destination) pair, this rank included
        gathered = group.allgather((mine, host, crossing, routed))
        total_bytes = sum(g[2] for g in gathered) * row_bytes
        routed_bytes = sum(g[3] for g in gathered) * row_bytes
        slowest = {name: max(g[0][name] for g in gathered) for name in mine}
        host_us = {name: [float(np.median([g[1][name][i] for g in gathered])) for i in (0, 1)] for name in host}

        group.barrier()
        if nccl is not None:
            per_peer = max(total_bytes // ranks // ranks, 1)
            send = torch.empty(per_peer * ranks, dtype=torch.uint8, device="cuda")
            receive = torch.empty_like(send)
            baseline_ms = median_ms(lambda: dist.all_to_all_single(receive, send, group=nccl), args.iters,
                                    batch=args.batch)
            baseline_ms = max(group.allgather(baseline_ms))
            baseline_name = "NCCL all_to_all_single (read+write)"
        else:
            baseline_ms = None
            if me == 0:
                source = torch.empty(total_bytes, dtype=torch.uint8, device="cuda")
                target = torch.empty_like(source)
                baseline_ms = median_ms(lambda: target.copy_(source), args.iters, batch=args.batch)
            baseline_ms = group.broadcast(baseline_ms)
            baseline_name = "device copy (read+write)"
        group.barrier()
        routed_ms = None
        if nccl is None:  # one GPU: every PE copies all the rows it routes, all PEs at once
            source = torch.empty(routed * row_bytes, dtype=torch.uint8, device="cuda")
            target = torch.empty_like(source)
            group.barrier()
            routed_ms = max(group.allgather(median_ms(lambda: target.copy_(source), args.iters, batch=args.batch)))
            group.barrier()  # no PE's next (spinning) kernels start while another still copies

        baseline_gbs = 2 * total_bytes / baseline_ms / 1e6
        for name in mine:
            # the graph replays a dispatch and a combine: twice the bytes, against twice the baseline
            moved, base_ms = (2, 2 * baseline_ms) if name == GRAPH else (1, baseline_ms)
            if name.startswith(FP8):  # FP8 rows move fewer bytes: the baselines' times scaled to them
                moved *= fp8_row_bytes / row_bytes
                base_ms *= fp8_row_bytes / row_bytes
            gbs = 2 * moved * total_bytes / slowest[name] / 1e6
            case = f"{name} tokens={num_tokens}"
            rows.append({"case": case, "metric": "aggregate bandwidth", "unit": "GB/s", "higher_is_better": True,
                         "xmoe": round(gbs, 1), "baseline": round(baseline_gbs, 1), "baseline_name": baseline_name})
            rows.append({"case": case, "metric": "time", "unit": "us", "higher_is_better": False,
                         "xmoe": round(slowest[name] * 1e3, 1), "baseline": round(base_ms * 1e3, 1),
                         "baseline_name": baseline_name})
            routed_us = None
            if routed_ms is not None:
                routed_us = moved * routed_ms * 1e3
                rows.append({"case": case, "metric": "aggregate bandwidth, all routed rows", "unit": "GB/s",
                             "higher_is_better": True,
                             "xmoe": round(2 * moved * routed_bytes / slowest[name] / 1e6, 1),
                             "baseline": round(2 * routed_bytes / routed_ms / 1e6, 1),
                             "baseline_name": ROUTED_COPY})
                rows.append({"case": case, "metric": "time", "unit": "us", "higher_is_better": False,
                             "xmoe": round(slowest[name] * 1e3, 1), "baseline": round(routed_us, 1),
                             "baseline_name": ROUTED_COPY})
            for metric, value in zip(("host overhead", "host overhead, idle GPU"), host_us[name]):
                rows.append({"case": case, "metric": metric, "unit": "us", "higher_is_better": False,
                             "xmoe": round(value, 1), "baseline": None, "baseline_name": None})
            table.append((case, slowest[name] * 1e3, gbs, baseline_gbs, base_ms / slowest[name], routed_us,
                          *host_us[name]))

    if me == 0:
        mode = f"{num_gpus}gpu-{ranks}pe" + ("-mps" if mps_running() else "")
        print(f"dispatch/combine: {device_name(num_gpus)}, {mode}, hidden {args.hidden}, top-{args.topk} of "
              f"{args.experts} experts, bf16; start-up {start_up_s:.2f} s (NVSHMEM init {nvshmem_init_s:.2f} s, "
              f"first round trip {first_call_s:.2f} s)")
        print(f"baseline: {baseline_name}; routed us: {ROUTED_COPY} (one GPU only); ratio: that baseline's "
              f"time / xmoe's")
        print(f"{'case':<44} {'time us':>9} {'GB/s':>8} {'baseline':>9} {'ratio':>6} {'routed us':>9} {'ratio':>6} "
              f"{'host us':>8} {'idle us':>8}")
        for case, t_us, gbs, base, ratio, routed_us, host, idle in table:
            second = f"{routed_us:>9.1f} {routed_us / t_us:>6.2f}" if routed_us is not None else f"{'-':>9} {'-':>6}"
            print(f"{case:<44} {t_us:>9.1f} {gbs:>8.1f} {base:>9.1f} {ratio:>6.2f} {second} {host:>8.1f} {idle:>8.1f}")
        path = write_results("dispatch_combine", device_name(num_gpus), mode, rows, args.out,
                             {"batch": args.batch, "start_up_s": round(start_up_s, 3),
                              "nvshmem_init_s": round(nvshmem_init_s, 3),
                              "first_round_trip_s": round(first_call_s, 3)})
        print(f"wrote {path}")
    buffer.destroy()


if __name__ == "__main__":
    main()
