"""Framework in = framework out: PyTorch and JAX through the same calls (skipped when absent)."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe.interop import BFLOAT16, as_array, to_origin
from xmoe.testing.routing import make_routing

pytestmark = pytest.mark.sim  # NumPy arrays and CPU tensors; tests/test_gpu.py covers device tensors


def test_numpy_round_trip_is_zero_copy():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    array, origin = as_array(x, "x")
    assert array is x and to_origin(array, origin) is x


def test_torch_in_torch_out(group):
    torch = pytest.importorskip("torch")
    import xmoe

    routing = make_routing(11, 1, 20, 16, 4, 2, BFLOAT16)
    x = torch.from_numpy(routing.x[0].view(np.int16)).view(torch.bfloat16)
    idx = torch.from_numpy(routing.topk_idx[0])
    weights = torch.from_numpy(routing.topk_weights[0])
    buffer = xmoe.Buffer(group, 1 << 20)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    assert isinstance(per_rank, torch.Tensor) and in_rank.dtype == torch.bool
    recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                              num_tokens_per_expert=per_expert, topk_idx=idx,
                                                              topk_weights=weights)
    assert recv_x.dtype == torch.bfloat16 and recv_idx.dtype == torch.int64
    combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
    routed = (routing.topk_idx[0] >= 0).any(axis=1)
    # one rank: every routed token comes back once, bit for bit
    assert torch.equal(combined[torch.from_numpy(routed)], x[torch.from_numpy(routed)])
    kept_weights = np.where(routing.topk_idx[0] >= 0, routing.topk_weights[0], 0)  # masked slots carry 0
    assert torch.equal(combined_w, torch.from_numpy(kept_weights))
    buffer.destroy()


def test_jax_in_jax_out(group):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import xmoe

    jax.config.update("jax_enable_x64", True)  # int64 top-k ids, as dispatch takes them (else JAX makes int32)

    routing = make_routing(12, 1, 10, 8, 4, 2, BFLOAT16)
    x = jnp.asarray(routing.x[0])
    buffer = xmoe.Buffer(group, 1 << 20)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(jnp.asarray(routing.topk_idx[0]), 4)
    recv_x, *_ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                 num_tokens_per_expert=per_expert)
    assert type(recv_x).__module__.startswith("jax") and recv_x.dtype == jnp.bfloat16
    buffer.destroy()


def test_output_plan_places_outputs_apart_and_aligned():
    """The outputs of one allocation (``interop.new_outputs``): each 256-byte aligned, none
    overlapping another, all inside it (empty ones too), C-contiguous strides in elements."""
    from xmoe.interop import OUTPUT_ALIGNMENT, OutputPlan

    rng = np.random.default_rng(5)
    dtypes = [np.uint8, np.uint16, np.int32, np.float32, np.int64]
    for _ in range(50):
        specs = {f"out{i}": (tuple(int(n) for n in rng.integers(0, 7, rng.integers(1, 4))), dtypes[rng.integers(5)],
                             None) for i in range(int(rng.integers(1, 7)))}
        plan = OutputPlan(specs)
        spans = []
        for name, (first, shape, dtype, _, strides) in plan.places.items():
            assert first % OUTPUT_ALIGNMENT == 0 and shape == specs[name][0] and dtype == np.dtype(specs[name][1])
            if all(shape):  # NumPy's strides of an empty array are not C's
                assert strides == tuple(s // dtype.itemsize for s in np.empty(shape, dtype).strides)
            spans.append((first, first + int(np.prod(shape)) * dtype.itemsize))
        spans.sort()
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
        assert spans[-1][1] <= plan.nbytes
