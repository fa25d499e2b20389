"""A rank that never calls dispatch makes the others raise, not hang."""

from __future__ import annotations

import time

import numpy as np
import pytest

from xmoe.testing.routing import make_routing

# NumPy inputs, and errors raised by the call itself (the simulator's kernels have finished when a
# call returns); tests/test_gpu.py has the GPU's missing-rank tests
pytestmark = pytest.mark.sim


@pytest.mark.mpi(ranks=2)
def test_missing_rank_raises_runtime_error(group):
    import xmoe

    buffer = xmoe.Buffer(group, 1 << 20)
    routing = make_routing(0, 2, 16, 8, 4, 2, np.float32)
    if group.rank == 0:
        idx = routing.topk_idx[0]
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1 never arrived"):
            buffer.dispatch(routing.x[0], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert, topk_idx=idx, config=xmoe.Config(timeout_s=1.0))
        assert time.monotonic() - start < 30
        with pytest.raises(RuntimeError, match="unusable after an earlier failure"):
            buffer.dispatch(routing.x[0], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert)
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_mismatched_hidden_raises(group):
    import xmoe

    buffer = xmoe.Buffer(group, 1 << 20)
    hidden = 8 if group.rank == 0 else 16
    routing = make_routing(0, 2, 16, hidden, 4, 2, np.float32)
    idx = routing.topk_idx[group.rank]
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    with pytest.raises(RuntimeError, match="ranks disagree on the call: rank . has row bytes"):
        buffer.dispatch(routing.x[group.rank], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert, topk_idx=idx, config=xmoe.Config(timeout_s=5.0))
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_missing_rank_in_combine_raises(group):
    """combine does not wait for the device; its peer errors raise at once on the simulator
    (its kernels have finished when the call returns) and at the Buffer's next call on the GPU."""
    import xmoe

    buffer = xmoe.Buffer(group, 1 << 20)
    routing = make_routing(0, 2, 16, 8, 4, 2, np.float32)
    idx = routing.topk_idx[group.rank]
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    recv_x, _, _, _, handle, _ = buffer.dispatch(routing.x[group.rank], num_tokens_per_rank=per_rank,
                                                 is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    if group.rank == 0:
        with pytest.raises(RuntimeError, match="combine: rank 1 never arrived"):
            buffer.combine(recv_x, handle, config=xmoe.Config(timeout_s=1.0))
        with pytest.raises(RuntimeError, match="unusable after an earlier failure"):
            buffer.dispatch(routing.x[0], handle=handle)
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_missing_rank_in_fused_moe_raises(group):
    """A rank that never runs the fused forward: the others' waits for its tiles end in a
    RuntimeError naming it (the kernel's waits stop at the first timeout)."""
    import xmoe
    import xmoe.fused
    from xmoe.interop import BFLOAT16

    rng = np.random.default_rng(0)
    handle = xmoe.fused.initialize(group, 16, 8, 8, 2, 12, config=xmoe.Config(timeout_s=1.0))
    if group.rank == 0:
        shapes = ((12, 16), (16, 8), (4, 16, 16), (4, 16, 8))  # x, w_router, w_up, w_down
        weights = [rng.standard_normal(shape).astype(BFLOAT16) for shape in shapes]
        with pytest.raises(RuntimeError, match="fused_moe: rank 1 never arrived"):
            xmoe.fused.forward(handle, *weights)
    xmoe.fused.finalize(handle)


@pytest.mark.mpi(ranks=2)
def test_ranks_that_disagree_on_the_fused_layer_raise(group):
    """The fused layer's layout follows from initialize's arguments: ranks that differ raise at
    once, naming the argument, before anything is written into a peer."""
    import xmoe.fused

    with pytest.raises(ValueError, match=r"hidden: the ranks disagree \(rank 0: 16, rank 1: 24\)"):
        xmoe.fused.initialize(group, 16 + 8 * group.rank, 8, 8, 2, 12)
    with pytest.raises(ValueError, match=r"capacity_factor: the ranks disagree \(rank 0: None, rank 1: 1.5\)"):
        xmoe.fused.initialize(group, 16, 8, 8, 2, 12, capacity_factor=None if group.rank == 0 else 1.5)
