"""Layout kernels against the NumPy reference on fresh random routing, outputs poisoned first."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe import reference
from xmoe.comm.status import ERR_EXPERT_ID
from xmoe.kernels.dispatch import send_slot_kernel
from xmoe.kernels.launch import launch
from xmoe.kernels.layout import launch_dispatch_layout
from xmoe.testing.routing import make_routing

pytestmark = pytest.mark.sim  # kernels launched on NumPy arrays


@pytest.mark.parametrize("tokens, ranks, experts, topk, pattern", [
    (0, 2, 8, 2, "random"), (1, 1, 4, 4, "random"), (67, 4, 16, 4, "random"), (130, 8, 64, 8, "random"),
    (40, 4, 16, 3, "one_rank"), (40, 4, 16, 3, "skip_last"),
])
def test_dispatch_layout_matches_reference(tokens, ranks, experts, topk, pattern):
    idx = make_routing(tokens + ranks, ranks, tokens, 4, experts, topk, np.float32, pattern).topk_idx[0]
    per_rank = np.full(ranks, -5, np.int32)
    per_expert = np.full(experts, -5, np.int32)
    in_rank = np.ones((tokens, ranks), np.bool_)
    in_rank[::2] = False
    errors = np.zeros(2, np.int32)
    launch_dispatch_layout(idx, experts, per_rank, per_expert, in_rank, errors, 32)
    want_rank, want_expert, want_in = reference.dispatch_layout(idx, experts, ranks)
    assert errors[0] == 0
    np.testing.assert_array_equal(per_rank, want_rank)
    np.testing.assert_array_equal(per_expert, want_expert)
    np.testing.assert_array_equal(in_rank, want_in)


@pytest.mark.parametrize("bad_value", [-2, 16, 1000])
def test_dispatch_layout_reports_out_of_range_expert(bad_value):
    idx = make_routing(9, 4, 20, 4, 16, 2, np.float32).topk_idx[0]
    idx[13, 1] = bad_value
    errors = np.zeros(2, np.int32)
    launch_dispatch_layout(idx, 16, np.empty(4, np.int32), np.empty(16, np.int32), np.empty((20, 4), np.bool_),
                           errors, 32)
    assert (int(errors[0]), divmod(int(errors[1]), 2)) == (ERR_EXPERT_ID, (13, 1))


@pytest.mark.parametrize("tokens, ranks, threads", [(0, 3, 32), (1, 1, 32), (31, 2, 32), (33, 4, 32), (300, 5, 64)])
def test_send_slots_match_reference(tokens, ranks, threads):
    rng = np.random.default_rng(tokens * 7 + ranks)
    in_rank = rng.random((tokens, ranks)) < 0.4
    slots = np.full((tokens, ranks), -9, np.int32)
    counts = np.full(ranks, -9, np.int32)
    launch(send_slot_kernel, ranks, threads, is_token_in_rank=in_rank, send_slot=slots, tokens_per_rank=counts)
    np.testing.assert_array_equal(slots, reference.send_slots(in_rank))
    np.testing.assert_array_equal(counts, in_rank.sum(axis=0))
