"""Dispatch and combine on 2 and 4 ranks against the NumPy reference, element by element."""

from __future__ import annotations

import numpy as np
import pytest

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
