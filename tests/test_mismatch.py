"""Ranks that disagree on a call raise at once, each naming the difference, whatever the shapes:
the symmetric layout does not depend on the call's shape, so nothing is written where a
peer does not expect it, and a receiver compares every peer's call with its own first."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe.demo import backend_io
from xmoe.interop import BFLOAT16
from xmoe.testing.routing import make_routing

TOKENS, EXPERTS = 10, 8

# (what differs, rank 0's call, rank 1's call, the field the error names): a call is
# (hidden, top-k, dtype). Each pair used to end in "rank 1 never arrived", or wrote rows
# at offsets the peer did not expect.
CASES = [
    ("top-k", (32, 2, np.float32), (32, 1, np.float32)),
    ("top-k", (32, 2, np.float32), (32, 3, np.float32)),
    ("top-k", (32, 2, np.float32), (32, 4, np.float32)),
    ("row bytes", (32, 2, np.float32), (33, 2, np.float32)),
    ("row bytes", (32, 2, np.float32), (40, 2, np.float32)),
    ("row bytes", (32, 2, np.float32), (48, 2, np.float32)),
    ("row bytes", (32, 2, np.float32), (64, 2, np.float32)),
    ("row bytes", (32, 2, np.float32), (128, 2, np.float32)),
    ("payload dtype", (32, 2, np.float32), (64, 2, BFLOAT16)),  # the same bytes per row
]


def _buffer(group):
    import xmoe

    return xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(TOKENS, 128, 2, EXPERTS, 4, np.float32))


def _inputs(buffer, rank, hidden, topk, dtype, seed):
    routing = make_routing(seed, 2, TOKENS, hidden, EXPERTS, topk, dtype)
    to_device = backend_io()[0]
    idx = to_device(routing.topk_idx[rank])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, EXPERTS)
    return dict(x=to_device(routing.x[rank]), topk_idx=idx, topk_weights=to_device(routing.topk_weights[rank]),
                num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


def _value(field, call):
    hidden, topk, dtype = call
    return {"top-k": topk, "row bytes": hidden * np.dtype(dtype).itemsize,
            "payload dtype": np.dtype(dtype).name}[field]


@pytest.mark.mpi(ranks=2)
def test_dispatch_of_ranks_that_disagree(group):
    import xmoe

    me, peer = group.rank, 1 - group.rank
    for number, (field, *calls) in enumerate(CASES):
        buffer = _buffer(group)
        args = _inputs(buffer, me, *calls[me], seed=number)
        config = xmoe.Config(timeout_s=120)  # a mismatch must not end as a timeout
        with pytest.raises(RuntimeError, match=f"dispatch: ranks disagree on the call: rank {peer} has {field} "
                                               f"{_value(field, calls[peer])}, rank {me} has {field} "
                                               f"{_value(field, calls[me])}"):
            buffer.dispatch(config=config, **args)
        buffer.destroy()


@pytest.mark.mpi(ranks=2)
@pytest.mark.parametrize("call", ["combine", "cached dispatch"])
def test_combine_and_cached_dispatch_of_ranks_that_disagree(group, call):
    """After a dispatch both agree on, one rank passes another hidden size."""
    import xmoe

    me, peer = group.rank, 1 - group.rank
    buffer = _buffer(group)
    args = _inputs(buffer, me, 32, 2, np.float32, seed=1)
    recv_x, _, _, _, handle, _ = buffer.dispatch(**args)
    hidden = (32, 48)
    bytes_of = {r: 4 * hidden[r] for r in (0, 1)}
    message = (f"{call.split()[-1]}: ranks disagree on the call: rank {peer} has row bytes {bytes_of[peer]}, "
               f"rank {me} has row bytes {bytes_of[me]}")
    to_device = backend_io()[0]
    with pytest.raises(RuntimeError, match=message):
        if call == "combine":
            buffer.combine(to_device(np.ones((recv_x.shape[0], hidden[me]), np.float32)), handle,
                           config=xmoe.Config(timeout_s=120))
        else:
            buffer.dispatch(to_device(np.ones((TOKENS, hidden[me]), np.float32)), handle=handle,
                            config=xmoe.Config(timeout_s=120))
        buffer.get_dispatch_layout(to_device(np.zeros((1, 2), np.int64)), EXPERTS)  # the GPU raises at the next call
    buffer.destroy()
