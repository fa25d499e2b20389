"""What ``python -m xmoe demo`` runs on each rank, and the inputs it draws.

Random routing (:func:`make_routing`) and the NumPy <-> device converters
(:func:`backend_io`) live here, in the library, because the demo needs them;
:mod:`xmoe.testing` builds its cases on the same functions.

Every rank draws the inputs of *all* ranks from one seed, keeps its own, and can run
the NumPy reference for any rank without communication.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from xmoe.interop import BFLOAT16, FLOAT8_E4M3

#: Routing patterns: ``random`` (masked slots, some tokens routed nowhere), ``one_rank``
#: (every token to rank 0's experts), ``skip_last`` (the last rank receives nothing).
PATTERNS = ("random", "one_rank", "skip_last")
#: The demo's steps, in order; rank 0 reports each as it finishes.
STEPS = ("layout", "dispatch", "expert", "combine")


@dataclass
class Routing:
    """Inputs of every rank: ``x[r]`` ``[tokens_r, hidden]``, ``topk_idx[r]`` int64 ``[tokens_r, k]``,
    ``topk_weights[r]`` float32 ``[tokens_r, k]``."""

    x: list[np.ndarray]
    topk_idx: list[np.ndarray]
    topk_weights: list[np.ndarray]
    num_experts: int


def random_topk(rng: np.random.Generator, num_tokens: int, experts: np.ndarray, num_topk: int) -> np.ndarray:
    """int64 ``[num_tokens, num_topk]``: distinct experts per token drawn from ``experts``."""
    keys = rng.random((num_tokens, experts.size))
    chosen = np.argsort(keys, axis=1)[:, :num_topk]
    return experts[chosen].astype(np.int64)


def make_routing(
    seed: int,
    num_ranks: int,
    tokens: list[int] | int,
    hidden: int,
    num_experts: int,
    num_topk: int,
    dtype: np.dtype | type = BFLOAT16,
    pattern: str = "random",
    mask_prob: float = 0.2,
) -> Routing:
    """Random inputs of every rank (see :data:`PATTERNS`); ``tokens`` per rank or one count for all."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r}: expected one of {PATTERNS}")
    rng = np.random.default_rng(seed)
    counts = [tokens] * num_ranks if isinstance(tokens, int) else list(tokens)
    per_rank = num_experts // num_ranks
    experts = np.arange(num_experts)
    if pattern == "one_rank":
        experts = experts[:per_rank]
    elif pattern == "skip_last":
        experts = experts[: num_experts - per_rank]
    k = min(num_topk, experts.size)
    xs, idxs, weights = [], [], []
    for count in counts:
        xs.append(rng.standard_normal((count, hidden)).astype(np.float32).astype(dtype))
        idx = np.full((count, num_topk), -1, np.int64)
        idx[:, :k] = random_topk(rng, count, experts, k)
        if pattern == "random":
            idx[rng.random(idx.shape) < mask_prob] = -1
            idx[:: 7] = -1  # tokens routed nowhere
        idxs.append(idx)
        weights.append(rng.random((count, num_topk)).astype(np.float32))
    return Routing(xs, idxs, weights, num_experts)


def identity(array: Any) -> Any:
    return array


def torch_io() -> tuple[Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]:
    """(to_device, to_host) between NumPy (bfloat16 as ml_dtypes) and CUDA PyTorch tensors."""
    import torch

    from xmoe.interop import to_host as array_to_host

    def to_device(array: np.ndarray) -> Any:
        if array.dtype == BFLOAT16:
            return torch.from_numpy(array.view(np.int16)).cuda().view(torch.bfloat16)
        if array.dtype == FLOAT8_E4M3:
            return torch.from_numpy(array.view(np.uint8)).cuda().view(torch.float8_e4m3fn)
        return torch.from_numpy(array).cuda()

    def to_host(tensor: Any) -> np.ndarray:
        if not isinstance(tensor, torch.Tensor):  # a handle's own arrays (CuPy, DeviceArray)
            return array_to_host(tensor)
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).cpu().numpy().view(BFLOAT16)
        if tensor.dtype == torch.float8_e4m3fn:
            return tensor.view(torch.uint8).cpu().numpy().view(FLOAT8_E4M3)
        return tensor.cpu().numpy()

    return to_device, to_host


def backend_io() -> tuple[Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]:
    """NumPy in and out on the simulator; CUDA PyTorch tensors on the GPU."""
    from xmoe.device_memory import on_gpu

    return torch_io() if on_gpu() else (identity, identity)


def toy_expert(recv_x: np.ndarray, recv_topk_idx: np.ndarray, recv_topk_weights: np.ndarray, rank: int,
               num_local_experts: int) -> np.ndarray:
    """Scale each received row by the weighted sum of (global expert id + 1) over its local experts.

    ``recv_x`` ``[recv, hidden]`` float32 or bfloat16; ``recv_topk_idx`` int64 and
    ``recv_topk_weights`` float32 ``[recv, k]`` as dispatch returns them.
    """
    global_ids = recv_topk_idx + rank * num_local_experts + 1
    scale = np.where(recv_topk_idx >= 0, recv_topk_weights * global_ids, 0).sum(axis=1, dtype=np.float32)
    return (recv_x.astype(np.float32) * scale[:, None]).astype(recv_x.dtype)


def run_rank(tokens: int, hidden: int, num_experts: int, num_topk: int, seed: int) -> bool:
    """One rank of the demo: layout -> dispatch -> :func:`toy_expert` -> combine on ``tokens``
    random bfloat16 tokens per rank, checked bit for bit against the NumPy reference.

    Rank 0 prints each step as it finishes, then a table of every rank's counts and step
    times (labelled as simulator times on the sim backend). Returns whether every rank's
    result matched. ``num_experts`` must be a multiple of the number of ranks.
    """
    import xmoe
    from xmoe import reference

    group = xmoe.init()
    me, ranks = group.rank, group.world_size
    local_experts = num_experts // ranks
    unit = "ms (sim)" if group.backend == "sim" else "ms"
    routing = make_routing(seed, ranks, tokens, hidden, num_experts, num_topk)
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(tokens, hidden, ranks, num_experts, num_topk))
    to_device, to_host = backend_io()
    x, idx, weights = (to_device(a) for a in (routing.x[me], routing.topk_idx[me], routing.topk_weights[me]))
    times: dict[str, float] = {}

    def finished(step: str, start: float) -> None:
        times[step] = time.perf_counter() - start
        if me == 0:
            print(f"  step {len(times)}/{len(STEPS)} {step:<8} done on rank 0 in {times[step] * 1e3:.1f} {unit}",
                  flush=True)

    start = time.perf_counter()
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    finished("layout", start)
    start = time.perf_counter()
    recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idx, topk_weights=weights)
    finished("dispatch", start)
    start = time.perf_counter()
    expert_out = toy_expert(to_host(recv_x), to_host(recv_idx), to_host(recv_w), me, local_experts)
    finished("expert", start)
    start = time.perf_counter()
    combined, _, _ = buffer.combine(to_device(expert_out), handle)
    combined = to_host(combined)
    finished("combine", start)

    want = reference.dispatch(routing.x, routing.topk_idx, routing.topk_weights, num_experts)
    want_out = [toy_expert(w["recv_x"], w["recv_topk_idx"], w["recv_topk_weights"], r, local_experts)
                for r, w in enumerate(want)]
    all_in_rank = [reference.dispatch_layout(i, num_experts, ranks)[2] for i in routing.topk_idx]
    want_combined, _ = reference.combine(want_out, all_in_rank)[me]
    ok = bool(np.array_equal(combined.view(np.uint16), want_combined.view(np.uint16)))
    per_rank = to_host(per_rank)
    sent = int(per_rank.sum() - per_rank[me])
    rows = group.allgather((me, x.shape[0], sent, recv_x.shape[0], times, ok))
    buffer.destroy()
    matched = all(row[-1] for row in rows)
    if me == 0:
        print(f"xmoe demo: backend={group.backend} ranks={ranks} tokens={tokens} hidden={hidden} "
              f"experts={num_experts} top-{num_topk} bf16")
        print(f"{'rank':>4} {'tokens':>6} {'sent':>6} {'recv':>6} "
              + " ".join(f"{f'{step} {unit}':>17}" for step in STEPS))
        for rank, num_tokens, sent_r, recv, step_times, _ in rows:
            print(f"{rank:>4} {num_tokens:>6} {sent_r:>6} {recv:>6} "
                  + " ".join(f"{step_times[step] * 1e3:>17.1f}" for step in STEPS))
        print("result matches the NumPy reference on every rank" if matched else "MISMATCH against the reference")
    return matched
