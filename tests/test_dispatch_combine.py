"""Dispatch and combine on 2 and 4 ranks against the NumPy reference, element by element."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe.demo import backend_io
from xmoe.interop import BFLOAT16
from xmoe.testing.checks import run_and_check, run_standard_cases
from xmoe.testing.routing import make_routing


@pytest.mark.parametrize("dtype", [np.float32, BFLOAT16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("ranks", [pytest.param(2, marks=pytest.mark.mpi(ranks=2)),
                                   pytest.param(4, marks=pytest.mark.mpi(ranks=4))])
def test_dispatch_combine_patterns(group, ranks, dtype):
    """Random routing with masked slots and tokens routed nowhere, all tokens to one rank,
    a rank that receives nothing, a rank with no tokens, without top-k, with expert
    alignment, and an odd hidden size: one Buffer reused by every call."""
    import xmoe

    num_experts, hidden, topk = 4 * ranks, 40, 3
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(48, hidden + 1, ranks, num_experts, topk, np.float32))
    run_standard_cases(buffer, group, 48, hidden, num_experts, topk, dtype, alignment=8)
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_buffer_reuse_many_calls(group):
    """Many calls on one Buffer alternate parity halves; fresh inputs every call."""
    import xmoe

    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(32, 16, 2, 8, 2, np.float32))
    for call in range(6):
        routing = make_routing(100 + call, 2, 32, 16, 8, 2, np.float32)
        run_and_check(buffer, group, routing)
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_repeated_cached_dispatch_and_combine(group):
    """Cached dispatch and combine called again and again with one handle, fresh payloads."""
    import xmoe
    from xmoe.testing.checks import check_repeated_calls

    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(40, 24, 2, 8, 3, np.float32))
    check_repeated_calls(buffer, group, make_routing(7, 2, 40, 24, 8, 3, BFLOAT16))
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_more_blocks_than_work(group):
    """Blocks take tokens and rows 4 at a time: with 7 blocks and 3 tokens a rank most blocks
    find nothing to do, the kernels must still finish, and the block that exits last must
    zero the work counters for the next call (later calls, other grids, stay correct)."""
    import xmoe

    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(32, 16, 2, 8, 2, np.float32))
    for call, (tokens, blocks) in enumerate([(3, 7), (3, 7), (32, 1), (32, 3)]):
        routing = make_routing(200 + call, 2, tokens, 16, 8, 2, np.float32)
        run_and_check(buffer, group, routing, config=xmoe.Config(num_sms=blocks))
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_worst_case_outputs(group):
    """num_worst_tokens: outputs of every token of every rank, the count never read by the
    host; the received rows match the reference, the rest is padding that combine ignores."""
    import xmoe

    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(48, 41, 2, 8, 3, np.float32))
    run_standard_cases(buffer, group, 48, 40, 8, 3, BFLOAT16, alignment=8, worst_case=True)
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_worst_case_outputs_too_short(group):
    """More rows arrive than num_worst_tokens holds: an error naming it (raised by the call on
    the simulator, whose kernels have finished), never rows written past the outputs."""
    import xmoe
    from xmoe import reference

    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(16, 8, 2, 4, 2, np.float32))
    to_device, to_host = backend_io()
    routing = make_routing(5, 2, 16, 8, 4, 2, np.float32, "one_rank")  # rank 0 receives every token
    idx = to_device(routing.topk_idx[group.rank])
    x = to_device(routing.x[group.rank])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    want = reference.dispatch(routing.x, routing.topk_idx, routing.topk_weights, 4)[group.rank]
    received = len(want["recv_src_idx"])
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx)
    if received:
        with pytest.raises(RuntimeError, match=f"received {received} rows, more than the num_worst_tokens"):
            buffer.dispatch(x, num_worst_tokens=received - 1, **args)
            buffer.get_dispatch_layout(idx, 4)  # on the GPU the Buffer's next call raises the kernel's error
    else:  # the rank that receives nothing: its call succeeds, with padding only
        recv_x, recv_idx, _, _, handle, _ = buffer.dispatch(x, num_worst_tokens=3, **args)
        assert recv_x.shape[0] == 3 and (to_host(recv_idx) == -1).all() and (to_host(handle.recv_src_idx) == -1).all()
    buffer.destroy()


@pytest.mark.mpi(ranks=8)
def test_eight_ranks(group):
    """Eight ranks (the most one NVLink node holds): every peer reached through its block's
    offset from this rank's, both parity halves, top-k, a cached dispatch and a combine."""
    import xmoe

    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(12, 16, 8, 16, 3, np.float32))
    for call in range(2):
        run_and_check(buffer, group, make_routing(300 + call, 8, 12, 16, 16, 3, BFLOAT16))
    buffer.destroy()
