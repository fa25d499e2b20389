"""Low-latency dispatch and combine against the NumPy reference, every element: bf16 and FP8
payloads (float32 and UE8M0 scales), receive hooks, two batches in flight, masked top-k
slots, a rank with no tokens, the most tokens, zero-copy combine, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe import reference
from xmoe.demo import backend_io
from xmoe.testing.low_latency import HIDDEN, MAX_TOKENS, check_combine, check_dispatch, make_inputs

RANKS = [pytest.param(2, marks=pytest.mark.mpi(ranks=2)), pytest.param(4, marks=pytest.mark.mpi(ranks=4))]


def settled(buffer, call):
    """``call()``, then, once its kernels have ended (a copy of its ``recv_count`` to the host),
    the error a kernel left: on the GPU a call returns before its kernels run."""
    result = call()
    backend_io()[1](result[1])
    buffer._low_latency.state.raise_on_error()
    return result


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
        received, handle = check_dispatch(buffer, group, xs, idxs, num_experts, **case)
        check_combine(buffer, group, received, handle, idxs, weights, num_experts, hook=case.get("hook", False))
    for tokens in ([0] + [MAX_TOKENS] * (ranks - 1), [MAX_TOKENS] * ranks):
        xs, idxs, weights = make_inputs(9, ranks, num_experts, tokens)
        received, handle = check_dispatch(buffer, group, xs, idxs, num_experts)
        check_combine(buffer, group, received, handle, idxs, weights, num_experts)
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
        check_combine(buffer, group, received, recv[2], idxs, weights, num_experts, hook=True)
    xs, idxs, weights = batches[0]
    received, handle = check_dispatch(buffer, group, xs, idxs, num_experts)
    check_combine(buffer, group, received, handle, idxs, weights, num_experts, zero_copy=True)
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
        settled(buffer, lambda: buffer.low_latency_dispatch(x, idx, MAX_TOKENS, num_experts, use_fp8=group.rank == 0))
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_low_latency_missing_rank_raises(group, monkeypatch):
    """A rank that does not call: the others' dispatch raises after the timeout, naming it, and
    the Buffer refuses later calls (no hang)."""
    import xmoe

    monkeypatch.setenv("XMOE_TIMEOUT_S", "2")
    to_device, _ = backend_io()
    num_experts = 8
    buffer = xmoe.Buffer(group, 0, xmoe.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, 2, num_experts),
                         low_latency_mode=True)
    xs, idxs, _ = make_inputs(8, 2, num_experts)
    if group.rank == 0:
        with pytest.raises(RuntimeError, match=r"low_latency_dispatch: rank 1 never arrived within 2.0 s"):
            settled(buffer, lambda: buffer.low_latency_dispatch(to_device(xs[0]), to_device(idxs[0]), MAX_TOKENS,
                                                                num_experts))
        with pytest.raises(RuntimeError, match="unusable after an earlier failure"):
            buffer.low_latency_dispatch(to_device(xs[0]), to_device(idxs[0]), MAX_TOKENS, num_experts)
    group.barrier()
    buffer.destroy()
