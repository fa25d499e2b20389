"""Dispatch and combine on 2 and 4 ranks against the NumPy reference, element by element."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe.interop import BFLOAT16
from xmoe.testing.checks import run_and_check
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
    nbytes = xmoe.Buffer.get_nvl_size_hint(48, 41, ranks, num_experts, topk, np.float32)
    buffer = xmoe.Buffer(group, nbytes)
    cases = [
        dict(seed=1, tokens=[17 + 9 * r for r in range(ranks)], pattern="random"),
        dict(seed=2, tokens=24, pattern="one_rank"),
        dict(seed=3, tokens=24, pattern="skip_last"),
        dict(seed=4, tokens=[0] + [20] * (ranks - 1), pattern="random"),
        dict(seed=5, tokens=48, pattern="random", alignment=8),
        dict(seed=6, tokens=30, pattern="random", with_topk=False),
        dict(seed=7, tokens=25, pattern="random", hidden=41),
    ]
    for case in cases:
        routing = make_routing(case["seed"], ranks, case["tokens"], case.get("hidden", hidden), num_experts, topk,
                               dtype, case["pattern"])
        run_and_check(buffer, group, routing, case.get("alignment", 1), case.get("with_topk", True))
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
