"""Bad input raises a clear ValueError/RuntimeError naming the argument."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from xmoe.testing.routing import make_routing

TOKENS, HIDDEN, EXPERTS, TOPK = 12, 8, 4, 2


@pytest.fixture
def buffer(group):
    import xmoe

    buf = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(TOKENS, HIDDEN, group.world_size, EXPERTS, TOPK, np.float32))
    yield buf
    buf.destroy()


@pytest.fixture
def inputs(buffer):
    routing = make_routing(3, 1, TOKENS, HIDDEN, EXPERTS, TOPK, np.float32)
    x, idx, w = routing.x[0], routing.topk_idx[0], routing.topk_weights[0]
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, EXPERTS)
    return dict(x=x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert)


def dispatch_args(inputs, **changes):
    args = dict(inputs)
    args.update(changes)
    return {k: v for k, v in args.items() if v is not None or k in changes}


DISPATCH_CASES = {
    "x float64": (dict(x=np.zeros((TOKENS, HIDDEN))), "x: expected dtype float32 or bfloat16"),
    "x 1-D": (dict(x=np.zeros(TOKENS, np.float32)), r"x: expected shape"),
    "x a list": (dict(x=[[1.0]]), "unsupported tensor type"),
    "layout missing": (dict(num_tokens_per_rank=None), "num_tokens_per_rank: required without handle"),
    "in_rank int32": (dict(is_token_in_rank=np.ones((TOKENS, 1), np.int32)), "is_token_in_rank: expected dtype bool"),
    "in_rank rows": (dict(is_token_in_rank=np.ones((TOKENS + 1, 1), np.bool_)), r"is_token_in_rank: expected shape \[12, 1\]"),
    "per_rank ranks": (dict(num_tokens_per_rank=np.zeros(3, np.int32)), r"num_tokens_per_rank: expected shape \[1\]"),
    "per_expert int64": (dict(num_tokens_per_expert=np.zeros(EXPERTS, np.int64)), "num_tokens_per_expert: expected dtype int32"),
    "topk int32": (dict(topk_idx=np.zeros((TOKENS, TOPK), np.int32)), "topk_idx: expected dtype int64"),
    "weights no idx": (dict(topk_idx=None), "topk_weights: passed without topk_idx"),
    "weights shape": (dict(topk_weights=np.zeros((TOKENS, TOPK + 1), np.float32)), "topk_weights: expected shape"),
    "weights float64": (dict(topk_weights=np.zeros((TOKENS, TOPK))), "topk_weights: expected dtype float32"),
    "alignment 0": (dict(expert_alignment=0), "expert_alignment=0"),
    "worst tokens < 0": (dict(num_worst_tokens=-1), "num_worst_tokens=-1: must be an int >= 0"),
    "worst tokens float": (dict(num_worst_tokens=8.0), "num_worst_tokens=8.0: must be an int"),
    "config type": (dict(config={"num_sms": 2}), "config: expected an xmoe.Config"),
    "previous_event": (dict(previous_event=object()), "previous_event: expected an EventOverlap"),
}


@pytest.mark.parametrize("case", DISPATCH_CASES)
def test_dispatch_rejects(buffer, inputs, case):
    changes, message = DISPATCH_CASES[case]
    with pytest.raises(ValueError, match=message):
        buffer.dispatch(**dispatch_args(inputs, **changes))


def test_config_out_of_range(buffer, inputs):
    import xmoe

    with pytest.raises(ValueError, match="config.num_threads=2000"):
        buffer.dispatch(**dispatch_args(inputs, config=xmoe.Config(num_threads=2000)))


@pytest.mark.parametrize("topk_idx, num_experts, message", [
    (np.zeros((4, 2), np.int32), 4, "topk_idx: expected dtype int64"),
    (np.zeros(4, np.int64), 4, "topk_idx: expected shape"),
    (np.array([[0, 1], [2, 9]], np.int64), 4, r"topk_idx\[1, 1\]=9"),
    (np.array([[0, -3]], np.int64), 4, r"topk_idx\[0, 1\]=-3"),
    (np.zeros((4, 2), np.int64), 0, "num_experts=0"),
])
def test_layout_rejects(buffer, topk_idx, num_experts, message):
    with pytest.raises(ValueError, match=message):
        buffer.get_dispatch_layout(topk_idx, num_experts)


def test_capacity_too_small(group, inputs):
    import xmoe

    small = xmoe.Buffer(group, 1024)
    with pytest.raises(ValueError, match=r"num_nvl_bytes=1024 is too small .* needs 2304 bytes \(Buffer.get_nvl_size_hint\)"):
        small.dispatch(**inputs)
    small.destroy()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_nvl_bytes=0), "num_nvl_bytes=0"),
    (dict(num_nvl_bytes=1024, num_rdma_bytes=1024), "num_rdma_bytes=1024"),
    (dict(num_nvl_bytes=1024, low_latency_mode=True), "low_latency_mode"),
])
def test_buffer_rejects(group, kwargs, message):
    import xmoe

    with pytest.raises(ValueError, match=message):
        xmoe.Buffer(group, **kwargs)


def test_buffer_rejects_a_foreign_group(group):
    import xmoe

    with pytest.raises(ValueError, match="group: expected the xmoe.Group"):
        xmoe.Buffer(object(), 1024)


def test_combine_and_cached_dispatch_reject(buffer, inputs):
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(**inputs)
    with pytest.raises(ValueError, match="x: expected shape"):
        buffer.combine(recv_x[1:], handle)
    with pytest.raises(ValueError, match="handle: expected the DispatchHandle"):
        buffer.combine(recv_x, tuple(handle))
    with pytest.raises(ValueError, match="topk_weights: expected shape"):
        buffer.combine(recv_x, handle, topk_weights=recv_w[1:])
    with pytest.raises(ValueError, match="topk_idx: not taken with handle="):
        buffer.dispatch(inputs["x"], handle=handle, topk_idx=inputs["topk_idx"])
    with pytest.raises(ValueError, match="num_worst_tokens: not taken with handle="):
        buffer.dispatch(inputs["x"], handle=handle, num_worst_tokens=64)
    with pytest.raises(ValueError, match="x: 11 tokens, but the handle routes 12"):
        buffer.dispatch(inputs["x"][1:], handle=handle)


def test_destroyed_buffer(group, inputs):
    import xmoe

    buf = xmoe.Buffer(group, 1 << 16)
    buf.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        buf.dispatch(**inputs)


def test_use_before_init_raises():
    code = ("import xmoe\n"
            "for call in (lambda: xmoe.Buffer, xmoe.get_group):\n"
            "    try:\n        call()\n    except RuntimeError as e:\n        print('RuntimeError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.count("RuntimeError: xmoe is not initialised: call xmoe.init() first") == 2


@pytest.mark.mpi(ranks=2)
def test_rank_count_and_expert_split_rejected(group):
    import xmoe

    buffer = xmoe.Buffer(group, 1 << 16)
    idx = make_routing(1, 2, 6, 4, 4, 2, np.float32).topk_idx[group.rank]
    with pytest.raises(ValueError, match="num_experts=3 is not divisible by the 2 ranks"):
        buffer.get_dispatch_layout(idx, 3)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    x = np.ones((6, 4), np.float32)
    with pytest.raises(ValueError, match=r"is_token_in_rank: expected shape \[6, 2\], got \[6, 3\]"):
        buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=np.ones((6, 3), np.bool_),
                        num_tokens_per_expert=per_expert)
    with pytest.raises(ValueError, match=r"num_tokens_per_rank: expected shape \[2\], got \[1\]"):
        buffer.dispatch(x, num_tokens_per_rank=per_rank[:1], is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert)
    with pytest.raises(ValueError, match="num_tokens_per_expert.* not divisible by the 2 ranks|num_experts=5"):
        buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                        num_tokens_per_expert=np.zeros(5, np.int32))
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_heap_sizes_must_match_on_every_rank(group):
    from xmoe.comm import get_heap

    with pytest.raises(ValueError, match=r"nbytes differ across ranks \[64, 128\]"):
        get_heap(group).alloc(64 * (group.rank + 1))
