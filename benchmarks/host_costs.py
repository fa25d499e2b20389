"""Host time of dispatch/combine calls, by step, and the cost of the single operations a call is made of.

    torchrun --nproc_per_node=2 benchmarks/host_costs.py [--tokens 4096] [--calls 30] [--profile 30] [--low-latency]

Host time of a call is its wall time minus the time it spent blocked on the GPU (the
non-cached dispatch's wait for the receive counts), median over calls, each queued behind
an untimed call of its kind (as in a model's forward pass: an idle GPU makes launches slower). The step table
wraps the Buffer's helpers with timers (so its totals run a little above the plain calls);
the single operations are timed alone, back to back; ``--profile N`` adds cProfile's top N
functions (by own time) over the timed calls; ``--low-latency`` times the low-latency mode's
FP8 dispatch and combine instead (``--tokens`` per rank, top-8 of 256 experts). Prints rank
0's numbers.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import cProfile
import pstats
import time
from typing import Any, Callable

import numpy as np

#: Module-level functions of the call path timed step by step: (module, name).
STEPS = (("xmoe.buffer", "as_array"), ("xmoe.ep.normal", "new_output"), ("xmoe.ep.normal", "as_words"))
#: The same for the low-latency mode.
LOW_LATENCY_STEPS = (("xmoe.ep.low_latency", "as_array"), ("xmoe.ep.low_latency", "new_output"),
                     ("xmoe.ep.low_latency", "new_outputs"), ("xmoe.ep.low_latency", "aligned_rows"),
                     ("xmoe.buffer", "stream_pointer"), ("xmoe.ep.low_latency", "CallPlan.launch"),
                     ("xmoe.ep.low_latency", "LowLatencyMode._run"), ("xmoe.ep.state", "BufferState.raise_on_error"),
                     ("xmoe.ep.state", "BufferState.check_usable"), ("xmoe.buffer", "Buffer._config"),
                     ("xmoe.ep.low_latency", "LowLatencyHandle"))


def timed_steps(steps: list[tuple[Any, str]]) -> dict[str, list[float]]:
    """Replace each ``owner.<name>`` of ``steps`` by a wrapper that records each call's wall time
    (``name`` may be ``Class.attribute`` of the owner module)."""
    spent: dict[str, list[float]] = collections.defaultdict(list)
    for owner, name in steps:
        label = name
        if "." in name:
            class_name, name = name.split(".")
            owner = getattr(owner, class_name)
        module = owner

        def wrapper(*args: Any, _inner: Callable = getattr(module, name), _name: str = label, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = _inner(*args, **kwargs)
            spent[_name].append(time.perf_counter() - start)
            return result

        setattr(module, name, wrapper)
    return spent


def per_call_us(fn: Callable[[], Any], calls: int = 300) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def normal_calls(xmoe: Any, group: Any, tokens: int, x: Any, idx: Any, weights: Any) -> tuple[Any, dict]:
    """A normal-mode Buffer and its four calls of ``tokens`` routed rows: dispatch, worst-case, cached, combine."""
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(tokens, 7168, group.world_size, 256, 8))
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 256)

    def dispatch(**extra: Any) -> Any:
        return buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                               num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=weights, **extra)

    recv_x, _, recv_weights, _, handle, _ = dispatch()
    return buffer, {"dispatch": dispatch,
                    "dispatch (worst)": lambda: dispatch(num_worst_tokens=group.world_size * tokens),
                    "cached dispatch": lambda: buffer.dispatch(x, handle=handle),
                    "combine": lambda: buffer.combine(recv_x, handle, topk_weights=recv_weights)}


def low_latency_calls(xmoe: Any, group: Any, tokens: int, x: Any, idx: Any, weights: Any) -> tuple[Any, dict]:
    """A low-latency Buffer and its two calls: FP8 dispatch and bf16 combine of ``tokens`` tokens."""
    buffer = xmoe.Buffer(group, 0, xmoe.Buffer.get_low_latency_rdma_size_hint(tokens, 7168, group.world_size, 256),
                         low_latency_mode=True)
    recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, tokens, 256, use_fp8=False)
    return buffer, {"dispatch": lambda: buffer.low_latency_dispatch(x, idx, tokens, 256, use_fp8=True),
                    "combine": lambda: buffer.low_latency_combine(recv_x, idx, weights, handle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's top N functions (0: no profile)")
    parser.add_argument("--low-latency", action="store_true", help="time the low-latency mode's calls")
    args = parser.parse_args()

    import cupy
    import torch
    from numba import cuda

    import xmoe
    import xmoe.buffer as buffer_module
    from xmoe.event import StreamPlan, _torch_stream_pointer
    from xmoe.interop import as_array
    from xmoe.kernels import launch as launch_module
    from xmoe.kernels.raw_launch import RawLaunch

    group = xmoe.init("cuda")
    torch.cuda.set_device(group.device)
    idx = torch.rand(args.tokens, 256, device="cuda").topk(8, dim=1).indices.to(torch.int64)
    weights = torch.rand(args.tokens, 8, device="cuda")
    x = torch.randn(args.tokens, 7168, device="cuda").to(torch.bfloat16)
    if args.low_latency:
        buffer, calls = low_latency_calls(xmoe, group, args.tokens, x, idx, weights)
        steps_of = LOW_LATENCY_STEPS
    else:
        buffer, calls = normal_calls(xmoe, group, args.tokens, x, idx, weights)
        steps_of = STEPS
    for fn in calls.values():
        fn()
    # Prepared.__call__: a kernel launch (every launch of a dispatch or combine is prepared)
    steps = timed_steps([(importlib.import_module(module), name) for module, name in steps_of]
                        + [(launch_module.Prepared, "__call__"), (RawLaunch, "__call__"),
                           (buffer_module, "check_routing")])
    host: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(args.calls):
        for name, fn in calls.items():
            torch.cuda.synchronize()
            group.barrier()
            fn()  # the timed call queues behind this one, as in a model's forward pass
            waited = StreamPlan.waited_s
            start = time.perf_counter()
            fn()
            host[name].append((time.perf_counter() - start - (StreamPlan.waited_s - waited)) * 1e6)
    step_times = {name: list(values) for name, values in steps.items()}  # before the profiled calls
    profiler = cProfile.Profile()
    if args.profile:
        profiler.enable()
        for _ in range(args.calls):
            for fn in calls.values():
                torch.cuda.synchronize()
                group.barrier()
                fn()
        profiler.disable()
    torch.cuda.synchronize()

    @cuda.jit
    def empty_kernel(a, n):
        pass

    tensor = torch.zeros(4, device="cuda")
    array, _ = as_array(tensor, "a", raw=True)
    launch_module.launch(empty_kernel, 1, 32, a=array, n=1)
    device = torch.device("cuda")
    single = {
        "launch of an empty Numba kernel (pack + cuLaunchKernel)": lambda: launch_module.launch(empty_kernel, 1, 32,
                                                                                                a=array, n=1),
        "torch.empty [tokens, 7168] bf16": lambda: torch.empty((args.tokens, 7168), dtype=torch.bfloat16,
                                                              device=device),
        "cupy.empty [tokens, 7168] uint16": lambda: cupy.empty((args.tokens, 7168), cupy.uint16),
        "as_array(tensor, raw=True)": lambda: as_array(x, "x", raw=True),
        "PyTorch current stream pointer": _torch_stream_pointer,
    }
    single_us = {name: per_call_us(fn) for name, fn in single.items()}
    if group.rank == 0:
        print(f"host time per call, {group.world_size} PEs, {args.tokens} tokens (median of {args.calls}):")
        for name, values in host.items():
            print(f"  {name:<18} {np.median(values):8.1f} us")
        print("steps (median us per call of the step, calls of the step per timed call round):")
        for name, values in sorted(step_times.items(), key=lambda item: -np.median(item[1])):
            print(f"  {name:<30} {np.median(values) * 1e6:8.1f} us  x{len(values) / (2 * args.calls):.0f}")
        if not args.low_latency:
            launches = {key[:2]: prepared.blocks for key, prepared in buffer._normal._launches.items()}
            print("grid of each launch (blocks):", launches)
        print("single operations:")
        for name, value in single_us.items():
            print(f"  {name:<58} {value:8.1f} us")
        if args.profile:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    buffer.destroy()


if __name__ == "__main__":
    main()
