"""Dispatch and combine on 2 and 4 ranks against the NumPy reference, element by element."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe import reference
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


@pytest.mark.parametrize("worst_case", [False, True], ids=["sized", "worst-case"])
@pytest.mark.mpi(ranks=2)
def test_fp8_dispatch_then_bf16_combine(group, worst_case):
    """An FP8 pair (rows, one scale per 128 channels) is dispatched as a pair, bit for bit, its
    scales with their rows; a cached dispatch takes a new pair; combine takes bfloat16 rows."""
    import xmoe
    from xmoe.interop import FLOAT8_E4M3

    me, tokens, hidden, experts, topk = group.rank, 24, 256, 8, 3
    to_device, to_host = backend_io()
    routing = make_routing(21, 2, tokens, hidden, experts, topk, BFLOAT16)
    # FP8 dispatch, bfloat16 combine: room for the wider rows (combine after a worst-case dispatch
    # sends back at most num_worst_tokens rows a source, as far as the host knows)
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(2 * tokens if worst_case else tokens, hidden, 2,
                                                              experts, topk, BFLOAT16))
    pairs = [reference.quantize_fp8(x) for x in routing.x]
    idx = to_device(routing.topk_idx[me])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, experts)
    worst = 2 * tokens if worst_case else 0
    (recv_fp8, recv_scales), recv_idx, recv_w, _, handle, _ = buffer.dispatch(
        xmoe.quantize_fp8(to_device(routing.x[me])), num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx,
        topk_weights=to_device(routing.topk_weights[me]), num_worst_tokens=worst)
    want = reference.dispatch([p[0].view(np.uint8) for p in pairs], routing.topk_idx, routing.topk_weights, experts)
    want_scales = reference.dispatch([p[1] for p in pairs], routing.topk_idx, None, experts)
    rows = len(want[me]["recv_src_idx"])
    got_fp8, got_scales = to_host(recv_fp8), to_host(recv_scales)
    assert got_fp8.dtype == FLOAT8_E4M3 and got_scales.dtype == np.float32
    assert got_fp8.shape[0] == got_scales.shape[0] == (worst or rows)
    np.testing.assert_array_equal(got_fp8.view(np.uint8)[:rows], want[me]["recv_x"])
    np.testing.assert_array_equal(got_scales[:rows], want_scales[me]["recv_x"])
    np.testing.assert_array_equal(to_host(recv_idx)[:rows], want[me]["recv_topk_idx"])

    # combine the dequantised rows (bfloat16), as an expert would return them
    expert_out = [reference.dequantize_fp8(w["recv_x"].view(FLOAT8_E4M3), s["recv_x"])
                  for w, s in zip(want, want_scales)]
    mine_out = np.concatenate([expert_out[me], np.zeros((worst - rows if worst else 0, hidden), BFLOAT16)])
    combined, _, _ = buffer.combine(to_device(mine_out), handle)
    all_in_rank = [reference.dispatch_layout(i, experts, 2)[2] for i in routing.topk_idx]
    want_x, _ = reference.combine(expert_out, all_in_rank, None)[me]
    np.testing.assert_array_equal(to_host(combined).view(np.uint16), want_x.view(np.uint16))

    # cached dispatch of a new pair
    pairs2 = [reference.quantize_fp8((x.astype(np.float32) * -2).astype(BFLOAT16), round_scale=True)
              for x in routing.x]
    recv2, _, _, _, _, _ = buffer.dispatch((to_device(pairs2[me][0]), to_device(pairs2[me][1])), handle=handle)
    want2 = reference.dispatch([p[0].view(np.uint8) for p in pairs2], routing.topk_idx, None, experts)[me]
    want2_scales = reference.dispatch([p[1] for p in pairs2], routing.topk_idx, None, experts)[me]
    np.testing.assert_array_equal(to_host(recv2[0]).view(np.uint8)[:rows], want2["recv_x"])
    np.testing.assert_array_equal(to_host(recv2[1])[:rows], want2_scales["recv_x"])
    buffer.destroy()
