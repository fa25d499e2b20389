"""Router and grouped GEMM through the public API on this machine's backend (the NumPy
reference on the simulator, the generated kernels on a GPU), checked against the
reference; bad input; and the reference itself against independent formulations."""

from __future__ import annotations

import numpy as np
import pytest

import xmoe
from xmoe import reference
from xmoe.interop import BFLOAT16
from xmoe.testing.checks import backend_io
from xmoe.testing.expert import check_grouped_gemm, check_select_experts, group_sizes


@pytest.mark.parametrize("epilogue, row_weights", [("none", False), ("swiglu", False), ("none", True)],
                         ids=["plain", "swiglu", "row_weights"])
@pytest.mark.parametrize("pattern", ["random", "zipf", "one"])
def test_grouped_gemm(pattern, epilogue, row_weights):
    check_grouped_gemm(*backend_io(), seed=3, rows=300, n=40, k=72, groups=6, pattern=pattern,
                       epilogue=epilogue, row_weights=row_weights, spare_rows=5)


def test_grouped_gemm_without_groups_or_rows():
    to_device, to_host = backend_io()
    out = xmoe.grouped_gemm(to_device(np.ones((0, 16), BFLOAT16)), to_device(np.ones((2, 8, 16), BFLOAT16)), [0, 0])
    assert to_host(out).shape == (0, 8)
    out = xmoe.grouped_gemm(to_device(np.ones((4, 16), BFLOAT16)), to_device(np.ones((0, 8, 16), BFLOAT16)),
                            to_device(np.zeros(0, np.int32)))
    assert to_host(out).shape == (4, 8)


def test_grouped_gemm_kn_float32_out():
    check_grouped_gemm(*backend_io(), seed=4, rows=70, n=24, k=48, groups=1, w_layout="kn", out_dtype="float32")


@pytest.mark.parametrize("rule", [
    {},
    {"scoring": "sigmoid", "renormalize": True, "scaling": 2.5},
    {"n_group": 4, "topk_group": 2},
    {"scoring": "sigmoid", "n_group": 8, "topk_group": 3, "renormalize": True, "with_bias": True},
], ids=["softmax", "sigmoid-renorm", "groups", "deepseek-v3"])
def test_select_experts(rule):
    check_select_experts(*backend_io(), seed=5, tokens=37, experts=64, num_topk=6, **rule)


def test_select_experts_ties_go_to_the_lower_expert():
    check_select_experts(*backend_io(), seed=6, tokens=9, experts=32, num_topk=5, ties=True)
    logits = np.zeros((1, 8), np.float32)
    idx, weights, counts = reference.select_experts(logits, 3)
    assert idx.tolist() == [[0, 1, 2]] and counts.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_router_end_to_end():
    to_device, to_host = backend_io()
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 64)).astype(BFLOAT16)
    w = (rng.standard_normal((64, 32)) / 8).astype(BFLOAT16)
    logits = to_host(xmoe.router_logits(to_device(x), to_device(w)))
    want = x.astype(np.float32) @ w.astype(np.float32)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    idx, weights, counts = (to_host(v) for v in xmoe.router(to_device(x), to_device(w), 4, renormalize=True))
    want_idx, want_weights, want_counts = reference.select_experts(logits, 4, renormalize=True)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-5)


def test_group_sizes_sum_and_include_empty_groups():
    rng = np.random.default_rng(0)
    for pattern in ("random", "zipf", "balanced", "one"):
        sizes = group_sizes(rng, 1000, 16, pattern)
        assert sizes.sum() == 1000 and (sizes >= 0).all()
    assert (group_sizes(np.random.default_rng(1), 1000, 64, "random") == 0).any()


def test_reference_grouped_gemm_is_a_per_group_product():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((9, 8)).astype(np.float32)
    w = rng.standard_normal((3, 4, 8)).astype(np.float32)
    offs = np.array([2, 2, 7], np.int32)
    out = reference.grouped_gemm(a, w, offs)
    for g, (start, end) in enumerate([(0, 2), (2, 2), (2, 7)]):
        for r in range(start, end):
            np.testing.assert_allclose(out[r], [sum(a[r, i] * w[g, j, i] for i in range(8)) for j in range(4)],
                                       rtol=1e-5)
    assert not out[7:].any()
    both = reference.grouped_gemm(a, np.concatenate([w, w], axis=1), offs, "swiglu")
    np.testing.assert_allclose(both, out / (1 + np.exp(-out)) * out, rtol=1e-5)


def test_reference_select_experts_matches_vllm_grouped_topk():
    """vLLM's ``grouped_topk`` in PyTorch (written out here) picks the same experts and weights."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((20, 64)).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32) * 0.1
    gating = torch.from_numpy(logits)
    scores = gating.sigmoid()
    original = scores
    scores = scores + torch.from_numpy(bias)[None]
    group_scores = scores.view(20, 8, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=3, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(20, 8, 8).reshape(20, -1)
    topk_ids = torch.topk(scores.masked_fill(~score_mask.bool(), float("-inf")), k=6, dim=-1)[1]
    topk_weights = original.gather(1, topk_ids)
    topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True) * 2.5
    idx, weights, _ = reference.select_experts(logits, 6, "sigmoid", bias, 8, 3, True, 2.5)
    np.testing.assert_array_equal(idx, topk_ids.numpy())
    np.testing.assert_allclose(weights, topk_weights.numpy(), rtol=1e-6)


def _bf16(shape, rng=np.random.default_rng(0)):
    return _device(rng.standard_normal(shape).astype(BFLOAT16))


def _f32(shape):
    return _device(np.zeros(shape, np.float32))


def _device(array):
    return backend_io()[0](array)


@pytest.mark.parametrize("call, match", [
    (lambda: xmoe.grouped_gemm(_f32((8, 16)), _bf16((1, 8, 16)), [8]), "a: expected bfloat16"),
    (lambda: xmoe.grouped_gemm(_bf16((8, 16)), _bf16((1, 8, 24)), [8]), "w: K is 24"),
    (lambda: xmoe.grouped_gemm(_bf16((8, 16)), _bf16((8, 16)), [8]), "w: expected 3 dimensions"),
    (lambda: xmoe.grouped_gemm(_bf16((8, 16)), _bf16((2, 8, 16)), [8]), r"offs: expected int32 \[2\]"),
    (lambda: xmoe.grouped_gemm(_bf16((8, 16)), _bf16((1, 8, 16)), _device(np.array([8], np.int64))), "offs: expected int32"),
    (lambda: xmoe.grouped_gemm(_bf16((8, 12)), _bf16((1, 8, 12)), [8]), "multiples of 8"),
    (lambda: xmoe.grouped_gemm(_bf16((8, 16)), _bf16((1, 0, 16)), [8]), "N=0 must be positive"),
    (lambda: xmoe.grouped_gemm(_bf16((8, 16)), _bf16((1, 8, 16)), [8], epilogue="gelu"), "epilogue='gelu'"),
    (lambda: xmoe.grouped_gemm(_bf16((8, 16)), _bf16((1, 24, 16)), [8], epilogue="swiglu"), "multiples of 8"),
    (lambda: xmoe.grouped_gemm(_bf16((8, 16)), _bf16((1, 8, 16)), [8], row_weights=_device(np.ones(7, np.float32))),
     r"row_weights: expected float32 \[8\]"),
    (lambda: xmoe.grouped_gemm(_bf16((8, 16)), _bf16((1, 16, 16)), [8], epilogue="swiglu",
                               row_weights=_device(np.ones(8, np.float32))), "row_weights: the row-weight epilogue"),
    (lambda: xmoe.grouped_gemm(_bf16((8, 16)), _bf16((1, 8, 16)), [8], w_layout="mn"), "w_layout='mn'"),
    (lambda: xmoe.select_experts(_device(np.zeros((2, 8), np.float64)), 2), "logits: expected float32"),
    (lambda: xmoe.select_experts(_f32((2, 8)), 9), "num_topk=9"),
    (lambda: xmoe.select_experts(_f32((2, 8)), 2, n_group=3, topk_group=1), "n_group=3"),
    (lambda: xmoe.select_experts(_f32((2, 8)), 2, n_group=4), "give both"),
    (lambda: xmoe.select_experts(_f32((2, 8)), 2, n_group=4, topk_group=5), "topk_group=5"),
    (lambda: xmoe.select_experts(_f32((2, 8)), 5, n_group=4, topk_group=2), "num_topk=5"),
    (lambda: xmoe.select_experts(_f32((2, 8)), 2, n_group=8, topk_group=2,
                                 bias=_f32(8)), "two best experts"),
    (lambda: xmoe.select_experts(_f32((2, 8)), 2, bias=_f32(7)), r"bias: expected"),
    (lambda: xmoe.select_experts(_f32((2, 8)), 2, scoring="relu"), "scoring='relu'"),
    (lambda: xmoe.router(_bf16((4, 16)), _bf16((8, 8)), 2), r"x: expected bfloat16 \[tokens, 8\]"),
    (lambda: xmoe.router(_bf16((4, 16)), _f32((16, 8)), 2), "w_router: expected bfloat16"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
