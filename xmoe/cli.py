"""``python -m xmoe demo|info``.

``demo`` launches its own ranks (mpirun from the mpich wheel on the CPU simulator,
torchrun on the GPU), runs layout -> dispatch -> a toy expert -> combine, checks the
result against the NumPy reference and prints a table; exit status 0 when it matches.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

from xmoe import runtime

DEMO_CHILD_ENV = "XMOE_DEMO_CHILD"


def toy_expert(recv_x: np.ndarray, recv_topk_idx: np.ndarray, recv_topk_weights: np.ndarray, rank: int,
               num_local_experts: int) -> np.ndarray:
    """Scale each received row by the weighted sum of (global expert id + 1) over its local experts.

    ``recv_x`` ``[recv, hidden]`` float32 or bfloat16; ``recv_topk_idx`` int64 and
    ``recv_topk_weights`` float32 ``[recv, k]`` as dispatch returns them.
    """
    global_ids = recv_topk_idx + rank * num_local_experts + 1
    scale = np.where(recv_topk_idx >= 0, recv_topk_weights * global_ids, 0).sum(axis=1, dtype=np.float32)
    return (recv_x.astype(np.float32) * scale[:, None]).astype(recv_x.dtype)


def _demo_rank(args: argparse.Namespace) -> int:
    import xmoe
    from xmoe import reference
    from xmoe.testing.checks import backend_io
    from xmoe.testing.routing import make_routing

    group = xmoe.init()
    me, ranks = group.rank, group.world_size
    if args.experts % ranks:
        raise SystemExit(f"--experts {args.experts} is not divisible by --ranks {ranks}")
    local_experts = args.experts // ranks
    routing = make_routing(args.seed, ranks, args.tokens, args.hidden, args.experts, args.topk)
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(args.tokens, args.hidden, ranks, args.experts,
                                                              args.topk))
    to_device, to_host = backend_io()
    x, idx, weights = (to_device(a) for a in (routing.x[me], routing.topk_idx[me], routing.topk_weights[me]))
    times = {}
    start = time.perf_counter()
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, args.experts)
    times["layout"] = time.perf_counter() - start
    start = time.perf_counter()
    recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idx, topk_weights=weights)
    times["dispatch"] = time.perf_counter() - start
    start = time.perf_counter()
    expert_out = toy_expert(to_host(recv_x), to_host(recv_idx), to_host(recv_w), me, local_experts)
    times["expert"] = time.perf_counter() - start
    start = time.perf_counter()
    combined, _, _ = buffer.combine(to_device(expert_out), handle)
    combined = to_host(combined)
    times["combine"] = time.perf_counter() - start

    want = reference.dispatch(routing.x, routing.topk_idx, routing.topk_weights, args.experts)
    want_out = [toy_expert(w["recv_x"], w["recv_topk_idx"], w["recv_topk_weights"], r, local_experts)
                for r, w in enumerate(want)]
    all_in_rank = [reference.dispatch_layout(i, args.experts, ranks)[2] for i in routing.topk_idx]
    want_combined, _ = reference.combine(want_out, all_in_rank)[me]
    ok = bool(np.array_equal(combined.view(np.uint16), want_combined.view(np.uint16)))
    per_rank = to_host(per_rank)
    sent = int(per_rank.sum() - per_rank[me])
    rows = group.allgather((me, x.shape[0], sent, recv_x.shape[0], times, ok))
    buffer.destroy()
    matched = all(row[-1] for row in rows)
    if me == 0:
        print(f"xmoe demo: backend={group.backend} ranks={ranks} tokens={args.tokens} hidden={args.hidden} "
              f"experts={args.experts} top-{args.topk} bf16")
        header = f"{'rank':>4} {'tokens':>6} {'sent':>6} {'recv':>6} " + " ".join(f"{k + ' ms':>12}" for k in times)
        print(header)
        for rank, tokens, sent_r, recv, t, _ in rows:
            print(f"{rank:>4} {tokens:>6} {sent_r:>6} {recv:>6} " + " ".join(f"{v * 1e3:>12.1f}" for v in t.values()))
        print("result matches the NumPy reference on every rank" if matched else "MISMATCH against the reference")
    return 0 if matched else 1


def demo(args: argparse.Namespace) -> int:
    if runtime.launched() or os.environ.get(DEMO_CHILD_ENV):
        return _demo_rank(args)
    backend = runtime.default_backend()
    command = runtime.launcher_command(args.ranks, backend)
    child = [sys.executable, "-m", "xmoe", "demo", "--ranks", str(args.ranks), "--tokens", str(args.tokens),
             "--hidden", str(args.hidden), "--experts", str(args.experts), "--topk", str(args.topk),
             "--seed", str(args.seed)]
    env = dict(os.environ, **{DEMO_CHILD_ENV: "1", "XMOE_BACKEND": backend})
    return subprocess.run(command + child, env=env).returncode


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def info(args: argparse.Namespace) -> int:
    print(f"backend: {runtime.default_backend()} (XMOE_BACKEND={os.environ.get('XMOE_BACKEND', '') or 'unset'})")
    print(f"GPUs visible: {runtime.gpu_count()}")
    try:
        print(f"launcher: {' '.join(runtime.launcher_command(2, runtime.default_backend()))}")
    except RuntimeError as exc:
        print(f"launcher: {exc}")
    for package in ("xmoe", "numpy", "numba-cuda", "mpi4py", "ml_dtypes", "mpich", "cupy-cuda12x", "cupy-cuda13x",
                    "nvshmem4py-cu12", "nvshmem4py-cu13", "torch", "jax"):
        print(f"{package:>16}: {_version(package)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmoe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="layout -> dispatch -> toy expert -> combine on several ranks")
    for name, default in (("ranks", 4), ("tokens", 64), ("hidden", 128), ("experts", 16), ("topk", 4), ("seed", 0)):
        demo_parser.add_argument(f"--{name}", type=int, default=default)
    demo_parser.set_defaults(run=demo)
    commands.add_parser("info", help="backend, devices and versions").set_defaults(run=info)
    args: Any = parser.parse_args(argv)
    return args.run(args)
