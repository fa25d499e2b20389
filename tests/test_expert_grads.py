"""The experts' backward kernels (``kernels/expert_grads``) on this machine's backend against
float64 NumPy written out here (the derivative itself checked by central differences): every
element, on fresh random inputs, outputs poisoned first (XMOE_POISON, conftest)."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe.device_memory import on_gpu, xp
from xmoe.interop import BFLOAT16, to_host
from xmoe.kernels.expert_grads import pair_grads, swiglu_backward


def _stream():
    if not on_gpu():
        return None
    import cupy

    return cupy.cuda.get_current_stream()


def _bf16(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    """bfloat16 bits (uint16) of normal values."""
    return (rng.standard_normal(shape) * scale).astype(BFLOAT16).view(np.uint16)


def _values(bits: np.ndarray) -> np.ndarray:
    return bits.view(BFLOAT16).astype(np.float64)


@pytest.mark.parametrize("rows, pairs, hidden", [(37, 111, 72), (5, 2, 8), (3, 0, 16), (64, 512, 2048)])
def test_pair_grads(rows, pairs, hidden):
    rng = np.random.default_rng(rows + pairs)
    grad = _bf16(rng, rows, hidden)
    row_of = rng.integers(0, rows, pairs).astype(np.int32)
    weights = rng.random(pairs, dtype=np.float32)
    got_rows, got_weighted = (to_host(a) for a in pair_grads(xp().asarray(grad), xp().asarray(row_of),
                                                               xp().asarray(weights), _stream()))
    np.testing.assert_array_equal(got_rows, grad[row_of])
    # one float32 product of two values exact in float32, rounded once to bfloat16 (nearest even)
    want = (grad[row_of].view(BFLOAT16).astype(np.float32) * weights[:, None]).astype(BFLOAT16).view(np.uint16)
    np.testing.assert_array_equal(got_weighted, want)


def _swiglu_grads(g: np.ndarray, gu: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """float64 ``d/d(gu)`` of ``sum(weights[:, None] * g * silu(gate) * up)``."""
    ffn = g.shape[1]
    gate, up = _values(gu[:, :ffn]), _values(gu[:, ffn:])
    sigma = 1.0 / (1.0 + np.exp(-gate))
    dh = g.astype(np.float64) * weights[:, None]
    return np.concatenate([dh * up * (sigma + gate * sigma * (1.0 - sigma)), dh * gate * sigma], axis=1)


def test_swiglu_derivative_by_central_differences():
    """The float64 formula the kernel is checked against is the derivative of the weighted SwiGLU."""
    rng = np.random.default_rng(5)
    g, gu, weights = rng.standard_normal((4, 8)), _bf16(rng, 4, 16, scale=3.0), rng.random(4)
    values = _values(gu)

    def loss(v: np.ndarray) -> float:
        gate, up = v[:, :8], v[:, 8:]
        return float((weights[:, None] * g * gate / (1.0 + np.exp(-gate)) * up).sum())

    step = 1e-6
    numeric = np.zeros_like(values)
    for index in np.ndindex(values.shape):
        plus, minus = values.copy(), values.copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (loss(plus) - loss(minus)) / (2 * step)
    np.testing.assert_allclose(_swiglu_grads(g, gu, weights), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("pairs, ffn", [(97, 24), (1, 8), (0, 16), (300, 768)])
def test_swiglu_backward(pairs, ffn):
    rng = np.random.default_rng(pairs + ffn)
    g = rng.standard_normal((pairs, ffn)).astype(np.float32)
    gu = _bf16(rng, pairs, 2 * ffn, scale=3.0)  # gates far into both tails of the sigmoid
    h = _bf16(rng, pairs, ffn)
    weights = rng.random(pairs, dtype=np.float32)
    got_gu, got_weights = (to_host(a) for a in swiglu_backward(*(xp().asarray(a) for a in (g, gu, h, weights)),
                                                               _stream()))
    assert got_gu.dtype == np.uint16 and got_gu.shape == (pairs, 2 * ffn)
    want = _swiglu_grads(g, gu, weights)
    # float32 arithmetic then one bfloat16 rounding: within 2^-8 of each value (and float32 noise)
    np.testing.assert_allclose(_values(got_gu), want, rtol=2 ** -8, atol=1e-6)
    np.testing.assert_allclose(got_weights, (g.astype(np.float64) * _values(h)).sum(axis=1), rtol=1e-5, atol=1e-4)


def test_bad_shapes_are_named():
    arrays = dict(g=np.zeros((2, 12), np.float32), gu=np.zeros((2, 24), np.uint16), h=np.zeros((2, 12), np.uint16),
                  weights=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="g: 12 channels"):
        swiglu_backward(*(xp().asarray(a) for a in arrays.values()), _stream())
    arrays.update(g=np.zeros((2, 16), np.float32))
    with pytest.raises(ValueError, match=r"gu \(2, 24\)"):
        swiglu_backward(*(xp().asarray(a) for a in arrays.values()), _stream())
    arrays.update(gu=np.zeros((2, 32), np.uint16), h=np.zeros((2, 16), np.uint16), weights=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"weights \(3,\)"):
        swiglu_backward(*(xp().asarray(a) for a in arrays.values()), _stream())
    with pytest.raises(ValueError, match=r"row_of \(2,\) / weights \(3,\)"):
        pair_grads(xp().zeros((3, 16), np.uint16), xp().zeros(2, np.int32), xp().zeros(3, np.float32), _stream())
    with pytest.raises(ValueError, match="grad: 12 channels"):
        pair_grads(xp().zeros((3, 12), np.uint16), xp().zeros(2, np.int32), xp().zeros(2, np.float32), _stream())
