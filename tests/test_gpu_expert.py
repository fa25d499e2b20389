"""Router and grouped GEMM on the GPU: every generated configuration of every variant on
ragged groups (empty ones included), model-sized shapes through the autotuner, CuPy
inputs, and the selection kernel on every routing rule."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe.demo import torch_io
from xmoe.testing.expert import check_grouped_gemm, check_select_experts

pytestmark = pytest.mark.gpu

VARIANTS = {
    "plain": {},
    "swiglu": {"epilogue": "swiglu"},
    "row_weights": {"row_weights": True},
    "f32": {"out_dtype": "float32"},
    "kn-f32": {"w_layout": "kn", "out_dtype": "float32"},
}


def _candidates(variant: dict):
    from xmoe.kernels.build import current_device
    from xmoe.kernels.gemm import candidates
    from xmoe.kernels.gemm.spec import GemmVariant

    spec = GemmVariant("row_scale" if variant.get("row_weights") else variant.get("epilogue", "none"),
                       variant.get("w_layout", "nk"), "f32" if variant.get("out_dtype") == "float32" else "bf16")
    return candidates(spec, current_device().compute_capability)


@pytest.mark.parametrize("pattern", ["random", "one"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_gpu_grouped_gemm_every_config(name, pattern):
    """N and K not multiples of any tile, groups smaller and larger than a tile, empty groups."""
    variant = VARIANTS[name]
    for config in _candidates(variant):
        try:
            check_grouped_gemm(*torch_io(), seed=12, rows=1100, n=200, k=328, groups=9, pattern=pattern,
                               config=config, spare_rows=3, **variant)
        except AssertionError as error:
            raise AssertionError(f"{config.name}: {error}") from None


@pytest.mark.parametrize("shape", [(8192, 768, 2048, 128, "swiglu"), (8192, 2048, 768, 128, "row_weights"),
                                   (2048, 2048, 7168, 32, "swiglu")],
                         ids=["qwen3-up", "qwen3-down", "deepseek-up"])
def test_gpu_grouped_gemm_model_shapes(shape):
    rows, n, k, groups, name = shape
    check_grouped_gemm(*torch_io(), seed=13, rows=rows, n=n, k=k, groups=groups, pattern="zipf", **VARIANTS[name])


def test_gpu_select_experts_cupy_inputs():
    """CuPy has no bfloat16 (GEMM inputs come from PyTorch or JAX), but float32 logits work."""
    import cupy

    check_select_experts(cupy.asarray, lambda array: array.get(), seed=14, tokens=700, experts=64, num_topk=4,
                         n_group=4, topk_group=2)


@pytest.mark.parametrize("rule", [
    {},
    {"scoring": "sigmoid", "renormalize": True, "scaling": 2.5},
    {"n_group": 8, "topk_group": 4},
    {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "renormalize": True, "scaling": 2.5, "with_bias": True},
], ids=["softmax", "sigmoid-renorm", "groups", "deepseek-v3"])
@pytest.mark.parametrize("experts", [128, 256, 72])
def test_gpu_select_experts(experts, rule):
    if experts % rule.get("n_group", 1):
        pytest.skip("groups must divide the experts")
    check_select_experts(*torch_io(), seed=15, tokens=3000, experts=experts, num_topk=8, **rule)


def test_gpu_select_experts_ties():
    check_select_experts(*torch_io(), seed=16, tokens=500, experts=256, num_topk=8, ties=True)


def test_gpu_router_deepseek_shape():
    import torch

    import xmoe
    from xmoe import reference
    from xmoe.interop import BFLOAT16

    to_device, to_host = torch_io()
    rng = np.random.default_rng(17)
    x = rng.standard_normal((512, 7168)).astype(BFLOAT16)
    w = (rng.standard_normal((7168, 256)) / 85).astype(BFLOAT16)
    bias = (rng.standard_normal(256) * 0.01).astype(np.float32)
    logits = xmoe.router_logits(to_device(x), to_device(w))
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float32
    np.testing.assert_allclose(to_host(logits), x.astype(np.float32) @ w.astype(np.float32), rtol=1e-3, atol=1e-3)
    got = xmoe.router(to_device(x), to_device(w), 8, scoring="sigmoid", bias=to_device(bias), n_group=8,
                      topk_group=4, renormalize=True, scaling=2.5)
    want = reference.select_experts(to_host(logits), 8, "sigmoid", bias, 8, 4, True, 2.5)
    np.testing.assert_array_equal(to_host(got[0]), want[0])
    np.testing.assert_allclose(to_host(got[1]), want[1], rtol=1e-5)
    np.testing.assert_array_equal(to_host(got[2]), want[2])


def test_gpu_jax_inputs():
    """JAX device arrays in and out (DLPack): the grouped GEMM with SwiGLU and the selection."""
    import os

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to the others
    jnp = pytest.importorskip("jax.numpy")

    check_grouped_gemm(jnp.asarray, np.asarray, seed=18, rows=300, n=64, k=128, groups=4, epilogue="swiglu")
    check_select_experts(jnp.asarray, np.asarray, seed=19, tokens=200, experts=64, num_topk=4, n_group=4,
                         topk_group=2)
