"""Dispatch and combine on 2 and 4 ranks against the NumPy reference, element by element."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe import reference
from xmoe.interop import BFLOAT16
from xmoe.testing.routing import make_routing

POISON = {np.dtype(np.float32): np.float32(np.nan), BFLOAT16: BFLOAT16.type(np.nan)}


def bits(array: np.ndarray) -> np.ndarray:
    """Compare payloads bit for bit (NaN poison included)."""
    return array.view(np.uint8)


def run_and_check(buffer, group, routing, expert_alignment: int = 1, with_topk: bool = True) -> None:
    """layout -> dispatch -> combine (weighted) -> cached dispatch, each checked against the reference."""
    me, ranks = group.rank, group.world_size
    idx, x = routing.topk_idx[me], routing.x[me]
    weights = routing.topk_weights[me] if with_topk else None
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, routing.num_experts)
    want_per_rank, want_per_expert, want_in_rank = reference.dispatch_layout(idx, routing.num_experts, ranks)
    assert per_rdma is None
    np.testing.assert_array_equal(per_rank, want_per_rank)
    np.testing.assert_array_equal(per_expert, want_per_expert)
    np.testing.assert_array_equal(in_rank, want_in_rank)

    recv_x, recv_idx, recv_w, per_expert_list, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idx if with_topk else None, topk_weights=weights, expert_alignment=expert_alignment)
    event.current_stream_wait()
    want = reference.dispatch(routing.x, routing.topk_idx, routing.topk_weights, routing.num_experts, expert_alignment)
    mine = want[me]
    assert recv_x.dtype == x.dtype
    np.testing.assert_array_equal(bits(recv_x), bits(mine["recv_x"]))
    if with_topk:
        np.testing.assert_array_equal(recv_idx, mine["recv_topk_idx"])
        np.testing.assert_array_equal(recv_w, mine["recv_topk_weights"])
    else:
        assert recv_idx is None and recv_w is None
    assert per_expert_list == mine["num_recv_tokens_per_expert_list"]
    np.testing.assert_array_equal(handle[0], mine["rank_prefix_matrix"])
    np.testing.assert_array_equal(handle.recv_src_idx, mine["recv_src_idx"])

    # combine what every rank received, scaled so that each row differs from the input
    scale = np.float32(1.5)
    expert_out = [(w["recv_x"].astype(np.float32) * scale).astype(x.dtype) for w in want]
    combined, combined_w, _ = buffer.combine(expert_out[me], handle, topk_weights=recv_w if with_topk else None)
    all_in_rank = [reference.dispatch_layout(i, routing.num_experts, ranks)[2] for i in routing.topk_idx]
    want_w = [w["recv_topk_weights"] for w in want] if with_topk else None
    want_x, want_cw = reference.combine(expert_out, all_in_rank, want_w)[me]
    np.testing.assert_array_equal(bits(combined), bits(want_x))
    if with_topk:
        np.testing.assert_array_equal(combined_w, want_cw)
    else:
        assert combined_w is None

    # cached dispatch: same routing, new payload
    x2 = (x.astype(np.float32) - 3).astype(x.dtype)
    recv_x2, none_idx, none_w, cached_list, same_handle, _ = buffer.dispatch(x2, handle=handle)
    routing_x2 = [(xi.astype(np.float32) - 3).astype(x.dtype) for xi in routing.x]
    want2 = reference.dispatch(routing_x2, routing.topk_idx, None, routing.num_experts, expert_alignment)[me]
    np.testing.assert_array_equal(bits(recv_x2), bits(want2["recv_x"]))
    assert none_idx is None and none_w is None and same_handle is handle
    assert cached_list == per_expert_list


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
