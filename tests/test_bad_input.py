"""Bad input raises a clear ValueError/RuntimeError naming the argument."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from xmoe.testing.routing import make_routing

pytestmark = pytest.mark.sim  # NumPy arguments; the checks are the same host code on every backend

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
    with pytest.raises(ValueError, match=r"num_nvl_bytes=1024 is too small .* needs 10496 bytes \(Buffer.get_nvl_size_hint\)"):
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
    """Creating a Buffer needs xmoe.init(); the class, its help and its static size hint do not."""
    code = ("import xmoe\n"
            "for call in (lambda: xmoe.Buffer(None, 1 << 20), xmoe.get_group):\n"
            "    try:\n        call()\n    except RuntimeError as e:\n        print('RuntimeError:', e)\n"
            "help(xmoe.Buffer)\n"
            "print('hint', xmoe.Buffer.get_nvl_size_hint(16, 32, 2, 8, 2))\n"
            "print('listed', 'Buffer' in dir(xmoe), 'DispatchHandle' in dir(xmoe))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.count("RuntimeError: xmoe is not initialised: call xmoe.init() first") == 2
    assert "get_dispatch_layout(self, topk_idx" in out and "listed True True" in out
    assert int(out.split("hint ")[1].split()[0]) > 0


@pytest.mark.parametrize("args, message", [
    (dict(num_max_tokens=-5), "num_max_tokens=-5: must be an int >= 0"),
    (dict(hidden=0), "hidden=0: must be an int >= 1"),
    (dict(num_ranks=0), "num_ranks=0: must be an int >= 1"),
    (dict(num_experts=7), "num_experts=7 is not divisible by num_ranks=2"),
    (dict(num_topk=-1), "num_topk=-1: must be an int >= 0"),
    (dict(dtype=np.float64), "dtype=float64: expected float32, bfloat16 or float8_e4m3fn"),
])
def test_size_hint_rejects_bad_arguments(args, message):
    import xmoe

    call = dict(num_max_tokens=16, hidden=32, num_ranks=2, num_experts=8, num_topk=2) | args
    with pytest.raises(ValueError, match=message):
        xmoe.Buffer.get_nvl_size_hint(**call)


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


def _retired(buffer):
    """The Buffer refuses every later call after a failure."""
    with pytest.raises(RuntimeError, match="unusable after an earlier failure"):
        buffer.get_dispatch_layout(np.zeros((1, TOPK), np.int64), EXPERTS)


def test_dispatch_checks_layout_against_topk(buffer, inputs):
    """is_token_in_rank that disagrees with topk_idx is caught by the kernel, not sent silently."""
    in_rank = inputs["is_token_in_rank"].copy()
    token = int(np.flatnonzero(in_rank.any(axis=1))[0])
    in_rank[token, :] = False
    args = dispatch_args(inputs, is_token_in_rank=in_rank, num_tokens_per_rank=in_rank.sum(axis=0, dtype=np.int32))
    with pytest.raises(RuntimeError, match=rf"is_token_in_rank\[{token}, 0\] disagrees with topk_idx\[{token}\]"):
        buffer.dispatch(**args)
    _retired(buffer)


def test_dispatch_counts_the_layout_itself(buffer, inputs):
    """num_tokens_per_rank is not read past its shape: the kernel counts is_token_in_rank's
    columns itself, so a wrong count changes nothing."""
    want = buffer.dispatch(**inputs)
    got = buffer.dispatch(**dispatch_args(inputs, num_tokens_per_rank=inputs["num_tokens_per_rank"] + 3))
    for mine, theirs in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(got[4][0], want[4][0])


def test_layout_rejects_an_expert_named_twice(buffer):
    idx = np.array([[0, 1], [2, 2], [3, -1]], np.int64)
    with pytest.raises(ValueError, match=r"topk_idx\[1\] names one expert twice"):
        buffer.get_dispatch_layout(idx, EXPERTS)
    buffer.get_dispatch_layout(idx[[0, 2]], EXPERTS)  # an argument error: the Buffer stays usable


def test_async_layout_error_raised_by_the_next_call(buffer):
    """With async_finish nothing waits for the layout kernel: its error retires the Buffer at
    the next call."""
    buffer.get_dispatch_layout(np.array([[0, 7]], np.int64), EXPERTS, async_finish=True)
    with pytest.raises(RuntimeError, match=r"topk_idx: entry 1 \(flat index t \* k \+ j\)"):
        buffer.get_dispatch_layout(np.array([[0, 1]], np.int64), EXPERTS)


@pytest.mark.parametrize("columns", [1, TOPK + 3])
def test_combine_weights_must_have_the_dispatch_topk(buffer, inputs, columns):
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(**inputs)
    weights = np.ones((recv_x.shape[0], columns), np.float32)
    with pytest.raises(ValueError, match=rf"topk_weights: expected shape \[{recv_x.shape[0]}, {TOPK}\]"):
        buffer.combine(recv_x, handle, topk_weights=weights)


def test_topk_rows_named_against_x(buffer, inputs):
    with pytest.raises(ValueError, match=rf"topk_idx: expected shape \[{TOKENS}, \*\], got \[{TOKENS - 1}, {TOPK}\] "
                                         rf"\(x's {TOKENS} tokens\)"):
        buffer.dispatch(**dispatch_args(inputs, topk_idx=inputs["topk_idx"][1:]))


def test_deepep_names(group, inputs):
    """What a DeepEP script calls: positional Config, set_num_sms, the recommended configs, capture,
    allocate_on_comm_stream; the grid set by set_num_sms is the default config's."""
    import xmoe

    config = xmoe.Config(24, 6, 256, 6, 128)
    assert (config.num_sms, config.nvl_chunk_size, config.nvl_buffer_size, config.rdma_chunk_size,
            config.rdma_buffer_size) == (24, 6, 256, 6, 128)
    with pytest.raises(TypeError):
        xmoe.Config(24, 6, 256, 6, 128, 512)  # xmoe's own fields are keywords
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(TOKENS, HIDDEN, 1, EXPERTS, TOPK, np.float32))
    try:
        xmoe.Buffer.set_num_sms(3)
        assert buffer._config(None).num_sms == 3
        assert xmoe.Buffer.get_dispatch_config(1).num_sms == 3 and xmoe.Buffer.get_combine_config(1).num_sms == 3
        event = buffer.capture()
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(**inputs, config=config, previous_event=event,
                                                          allocate_on_comm_stream=True)
        buffer.combine(recv_x, handle, topk_weights=recv_w, allocate_on_comm_stream=True)
        buffer.get_dispatch_layout(inputs["topk_idx"], EXPERTS, allocate_on_comm_stream=True)
        with pytest.raises(ValueError, match="new_num_sms=0"):
            xmoe.Buffer.set_num_sms(0)
    finally:
        xmoe.Buffer.num_sms = None
        buffer.destroy()


def test_buffer_takes_a_torch_process_group(group):
    dist = pytest.importorskip("torch.distributed")
    import xmoe

    if not dist.is_available():
        pytest.skip("torch.distributed is not built")
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29512", rank=0, world_size=1)
    buffer = xmoe.Buffer(dist.group.WORLD, 1 << 16)
    assert buffer.group is xmoe.get_group()
    buffer.destroy()
