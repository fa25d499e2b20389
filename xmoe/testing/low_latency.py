"""The low-latency round trip the multi-rank tests run on every backend, checked against the
NumPy reference element by element (rows and scales bit for bit, combine within bf16 rounding)."""

from __future__ import annotations

from typing import Any

import numpy as np

from xmoe import reference
from xmoe.demo import backend_io
from xmoe.interop import BFLOAT16, FLOAT8_E4M3

#: The sizes of the tests' calls: hidden, most tokens a rank passes, top-k.
HIDDEN, MAX_TOKENS, TOPK = 512, 6, 3


def make_inputs(seed: int, ranks: int, num_experts: int, tokens: list[int] | None = None) -> tuple[list, list, list]:
    """Per rank: bf16 rows ``[tokens_r, HIDDEN]``, distinct expert ids with some masked (-1), positive weights."""
    rng = np.random.default_rng(seed)
    tokens = tokens or [int(n) for n in rng.integers(1, MAX_TOKENS + 1, ranks)]
    xs, idxs, weights = [], [], []
    for n in tokens:
        xs.append((rng.standard_normal((n, HIDDEN)) * 3).astype(BFLOAT16))
        idx = np.argsort(rng.random((n, num_experts)), axis=1)[:, :TOPK].astype(np.int64)
        idx[rng.random(idx.shape) < 0.2] = -1
        idxs.append(idx)
        weights.append(rng.random((n, TOPK)).astype(np.float32))
    return xs, idxs, weights


def check_dispatch(buffer: Any, group: Any, xs: list, idxs: list, num_experts: int, use_fp8: bool = False,
                   round_scale: bool = False, use_ue8m0: bool = False, hook: bool = False) -> tuple[list, Any]:
    """One low-latency dispatch of this rank's inputs, its receive (by the hook when asked) and its
    check against the reference; returns ``(received rows as bf16 per local expert, handle)``."""
    import xmoe

    to_device, to_host = backend_io()
    me, ranks = group.rank, group.world_size
    local = num_experts // ranks
    stats = to_device(np.full(local, 5, np.int32))
    recv_x, recv_count, handle, event, receive = buffer.low_latency_dispatch(
        to_device(xs[me]), to_device(idxs[me]), MAX_TOKENS, num_experts, cumulative_local_expert_recv_stats=stats,
        use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0, return_recv_hook=hook)
    assert isinstance(event, xmoe.EventOverlap)
    receive()
    if use_fp8:
        casts = [reference.quantize_fp8(x, round_scale) for x in xs]
        want = reference.low_latency_dispatch([c[0] for c in casts], idxs, num_experts)[me]
        want_scales = reference.low_latency_dispatch([c[1] for c in casts], idxs, num_experts)[me]["rows"]
        rows = to_host(recv_x[0])
        assert rows.shape == (local, ranks * MAX_TOKENS, HIDDEN) and rows.dtype == FLOAT8_E4M3
    else:
        want = reference.low_latency_dispatch(xs, idxs, num_experts)[me]
        rows = to_host(recv_x)
        assert rows.shape == (local, ranks * MAX_TOKENS, HIDDEN) and rows.dtype == BFLOAT16
    count = to_host(recv_count)  # waits for the kernels: a kernel's error (a timeout naming the peer) is in
    buffer._low_latency.state.raise_on_error()
    np.testing.assert_array_equal(count, want["count"])
    np.testing.assert_array_equal(to_host(stats), want["count"] + 5)
    np.testing.assert_array_equal(to_host(handle[1]), want["layout_range"])
    src_info = to_host(handle[0])
    received = []
    for e in range(local):
        n = want["count"][e]
        np.testing.assert_array_equal(src_info[e, :n], want["src_info"][e])
        np.testing.assert_array_equal(rows[e, :n].view(np.uint8), want["rows"][e].view(np.uint8))
        if not use_fp8:
            received.append(rows[e, :n])
            continue
        expert_scales = to_host(recv_x[1])[e, :n]
        if use_ue8m0:  # four exponent bytes per int32: 2 ** (byte - 127)
            exponents = expert_scales.view(np.uint8).reshape(n, HIDDEN // 128).astype(np.int32)
            expert_scales = np.ldexp(np.float32(1), exponents - 127).astype(np.float32)
        np.testing.assert_array_equal(expert_scales, want_scales[e])
        received.append(reference.dequantize_fp8(rows[e, :n], expert_scales))
    return received, handle


def check_combine(buffer: Any, group: Any, received: list, handle: Any, idxs: list, weights: list, num_experts: int,
                  hook: bool = False, zero_copy: bool = False) -> None:
    """A combine of a toy expert's outputs (each row times its expert's number) checked against the
    reference; the rows past each expert's count hold NaN, which must not reach any token."""
    to_device, to_host = backend_io()
    me, ranks = group.rank, group.world_size
    local = num_experts // ranks
    outputs = [(rows.astype(np.float32) * (me * local + e + 1) / 4).astype(BFLOAT16) for e, rows in enumerate(received)]
    x = np.full((local, ranks * MAX_TOKENS, HIDDEN), np.nan, BFLOAT16)
    for e, rows in enumerate(outputs):
        x[e, : len(rows)] = rows
    if zero_copy:
        target = buffer.get_next_low_latency_combine_buffer(handle)
        target[:] = to_device(x)
    out = to_device(np.full((len(idxs[me]), HIDDEN), np.nan, BFLOAT16))
    combined, _, receive = buffer.low_latency_combine(to_device(x), to_device(idxs[me]), to_device(weights[me]),
                                                      handle, zero_copy=zero_copy, return_recv_hook=hook, out=out)
    receive()
    everyone = group.allgather(outputs)
    want = reference.low_latency_combine(everyone, idxs, weights, num_experts)[me]
    got = to_host(combined).astype(np.float32)  # waits for the kernels: a kernel's error is in by now
    buffer._low_latency.state.raise_on_error()
    assert got.shape == want.shape
    broken = np.nonzero(np.isnan(got).any(axis=1))[0]
    assert not len(broken), (f"rank {me}: tokens {broken[:6].tolist()} of {len(got)} summed NaN (rows past a count), "
                             f"routed to {idxs[me][broken[:6]].tolist()}; tokens per rank "
                             f"{[len(i) for i in idxs]}, NaN channels of the first {np.isnan(got[broken[0]]).sum()}")
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-2, atol=1e-2)
    assert combined is out
