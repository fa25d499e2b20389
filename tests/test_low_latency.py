"""Low-latency dispatch and combine against the NumPy reference, every element: bf16 and FP8
payloads (float32 and UE8M0 scales), receive hooks, two batches in flight, masked top-k
slots, a rank with no tokens, the most tokens, zero-copy combine, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe import reference
from xmoe.demo import backend_io
from xmoe.interop import BFLOAT16, FLOAT8_E4M3

RANKS = [pytest.param(2, marks=pytest.mark.mpi(ranks=2)), pytest.param(4, marks=pytest.mark.mpi(ranks=4))]
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


def dispatch(buffer, group, xs, idxs, num_experts, use_fp8=False, round_scale=False, use_ue8m0=False, hook=False):
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
    np.testing.assert_array_equal(to_host(recv_count), want["count"])
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


def combine(buffer, group, received, handle, idxs, weights, num_experts, hook=False, zero_copy=False):
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
    got = to_host(combined).astype(np.float32)
    assert got.shape == want.shape and not np.isnan(got).any()
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-2, atol=1e-2)
    assert combined is out


@pytest.mark.parametrize("ranks", RANKS)
def test_low_latency_dispatch_combine(group, ranks):
    """bf16, FP8 with float32 scales, FP8 with UE8M0 scales, each with and without a hook; a rank
    with no tokens and every rank at the most tokens; one Buffer for every call."""
    import xmoe

    num_experts = 4 * ranks
    buffer = xmoe.Buffer(group, 0, xmoe.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, ranks, num_experts),
                         low_latency_mode=True)
    cases = [dict(), dict(hook=True), dict(use_fp8=True), dict(use_fp8=True, round_scale=True, hook=True),
             dict(use_fp8=True, round_scale=True, use_ue8m0=True)]
    for seed, case in enumerate(cases):
        xs, idxs, weights = make_inputs(seed, ranks, num_experts)
        received, handle = dispatch(buffer, group, xs, idxs, num_experts, **case)
        combine(buffer, group, received, handle, idxs, weights, num_experts, hook=case.get("hook", False))
    for tokens in ([0] + [MAX_TOKENS] * (ranks - 1), [MAX_TOKENS] * ranks):
        xs, idxs, weights = make_inputs(9, ranks, num_experts, tokens)
        received, handle = dispatch(buffer, group, xs, idxs, num_experts)
        combine(buffer, group, received, handle, idxs, weights, num_experts)
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_low_latency_two_batches_in_flight(group):
    """dispatch A, dispatch B (both only sending), receive A, receive B, combine A, combine B,
    then a zero-copy combine: the halves of the block keep the batches apart."""
    import xmoe

    num_experts = 8
    buffer = xmoe.Buffer(group, 0, xmoe.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, 2, num_experts),
                         low_latency_mode=True)
    batches = [make_inputs(20 + b, 2, num_experts) for b in range(2)]
    to_device, _ = backend_io()
    sent = [buffer.low_latency_dispatch(to_device(xs[group.rank]), to_device(idxs[group.rank]), MAX_TOKENS,
                                        num_experts, use_fp8=False, return_recv_hook=True) for xs, idxs, _ in batches]
    for recv in sent:
        recv[4]()
    for (xs, idxs, weights), recv in zip(batches, sent):
        want = reference.low_latency_dispatch(xs, idxs, num_experts)[group.rank]
        received = [np.asarray(backend_io()[1](recv[0]))[e, :n] for e, n in enumerate(want["count"])]
        for e, rows in enumerate(received):
            np.testing.assert_array_equal(rows.view(np.uint16), want["rows"][e].view(np.uint16))
        combine(buffer, group, received, recv[2], idxs, weights, num_experts, hook=True)
    xs, idxs, weights = batches[0]
    received, handle = dispatch(buffer, group, xs, idxs, num_experts)
    combine(buffer, group, received, handle, idxs, weights, num_experts, zero_copy=True)
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_low_latency_bad_input(group):
    """Too many tokens, a block too small (the error gives the size), hidden not a multiple of 128,
    UE8M0 without power-of-two scales, LogFMT, a normal-mode call on a low-latency Buffer, and
    ranks that disagree on the payload (named, no hang)."""
    import xmoe

    to_device, _ = backend_io()
    num_experts = 8
    hint = xmoe.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, 2, num_experts)
    buffer = xmoe.Buffer(group, 0, hint, low_latency_mode=True)
    xs, idxs, weights = make_inputs(3, 2, num_experts, [MAX_TOKENS, MAX_TOKENS])
    x, idx = to_device(xs[group.rank]), to_device(idxs[group.rank])
    with pytest.raises(ValueError, match="more than num_max_dispatch_tokens_per_rank=5"):
        buffer.low_latency_dispatch(x, idx, MAX_TOKENS - 1, num_experts)
    with pytest.raises(ValueError, match=f"need {xmoe.Buffer.get_low_latency_rdma_size_hint(12, HIDDEN, 2, 8)} bytes"):
        buffer.low_latency_dispatch(x, idx, 12, num_experts)
    with pytest.raises(ValueError, match="hidden 500 is not a multiple of 128"):
        buffer.low_latency_dispatch(to_device(xs[group.rank][:, :500].copy()), idx, MAX_TOKENS, num_experts)
    with pytest.raises(ValueError, match="use_ue8m0=True: needs"):
        buffer.low_latency_dispatch(x, idx, MAX_TOKENS, num_experts, use_ue8m0=True)
    with pytest.raises(ValueError, match="topk_idx: expected dtype int64"):
        buffer.low_latency_dispatch(x, to_device(idxs[group.rank].astype(np.int32)), MAX_TOKENS, num_experts)
    with pytest.raises(ValueError, match="no normal-mode memory"):
        buffer.get_dispatch_layout(idx, num_experts)
    _, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, MAX_TOKENS, num_experts, use_fp8=False)
    with pytest.raises(ValueError, match="use_logfmt"):
        buffer.low_latency_combine(x, idx, to_device(weights[group.rank]), handle, use_logfmt=True)
    with pytest.raises(RuntimeError, match=r"ranks disagree on the call: rank \d has payload dtype"):
        buffer.low_latency_dispatch(x, idx, MAX_TOKENS, num_experts, use_fp8=group.rank == 0)
    buffer.destroy()
