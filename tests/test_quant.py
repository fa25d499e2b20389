"""FP8 cast and cast back against the NumPy reference, bit for bit, on fresh random rows of many
magnitudes (outputs poisoned first), and every e4m3 value through the device conversions."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from numba import cuda

from xmoe import reference
from xmoe.demo import backend_io
from xmoe.interop import BFLOAT16
from xmoe.kernels.launch import launch
from xmoe.kernels.numerics import e4m3_to_f32, f32_to_e4m3


@cuda.jit
def _convert(codes, widened, values, narrowed):
    i = cuda.grid(1)
    if i < codes.shape[0]:
        widened[i] = e4m3_to_f32(codes[i])
    if i < values.shape[0]:
        narrowed[i] = f32_to_e4m3(values[i])


def _rows(seed: int, tokens: int, hidden: int) -> np.ndarray:
    """bfloat16 rows whose 128-channel groups span magnitudes from 1e-7 to 1e4, with zeros,
    one all-zero group and ties of rounding."""
    rng = np.random.default_rng(seed)
    groups = hidden // 128
    scale = np.exp(rng.uniform(np.log(1e-7), np.log(1e4), (tokens, groups, 1)))
    x = (rng.standard_normal((tokens, groups, 128)) * scale).reshape(tokens, hidden)
    x[rng.random(x.shape) < 0.05] = 0.0
    if tokens:
        x[0, :128] = 0.0
    return x.astype(BFLOAT16)


@pytest.mark.parametrize("round_scale", [False, True])
@pytest.mark.parametrize("tokens, hidden", [(0, 128), (1, 128), (37, 512), (5, 7168)])
def test_quantize_and_back_match_reference(tokens, hidden, round_scale):
    import xmoe

    to_device, to_host = backend_io()
    x = _rows(tokens * 7 + hidden, tokens, hidden)
    x_fp8, scales = xmoe.quantize_fp8(to_device(x), round_scale=round_scale)
    want_fp8, want_scales = reference.quantize_fp8(x, round_scale)
    got_fp8, got_scales = to_host(x_fp8), to_host(scales)
    assert got_fp8.dtype == np.dtype(ml_dtypes.float8_e4m3fn) and got_scales.dtype == np.float32
    np.testing.assert_array_equal(got_fp8.view(np.uint8), want_fp8.view(np.uint8))
    np.testing.assert_array_equal(got_scales.view(np.uint32), want_scales.view(np.uint32))
    if round_scale and tokens:
        mantissas = want_scales.view(np.uint32) & 0x7FFFFF
        assert not mantissas.any()  # powers of two
    back = to_host(xmoe.dequantize_fp8(x_fp8, scales))
    assert back.dtype == BFLOAT16
    np.testing.assert_array_equal(back.view(np.uint16), reference.dequantize_fp8(want_fp8, want_scales).view(np.uint16))
    # the round trip is within e4m3's half step (2^-4 relative) of each group's scale
    if tokens:
        error = np.abs(back.astype(np.float32) - x.astype(np.float32))
        bound = np.repeat(want_scales, 128, axis=1) * 448.0 / 16 + 1e-30
        assert (error <= bound).all()


@pytest.mark.sim
@pytest.mark.parametrize("round_scale", [0, 1])
@pytest.mark.parametrize("tokens, hidden", [(1, 128), (3, 384)])
def test_kernels_match_reference(tokens, hidden, round_scale):
    """The Numba kernels themselves, on shapes small enough for the simulator (``xmoe.quantize_fp8``
    runs the reference there), outputs poisoned first."""
    from xmoe.kernels.quant import dequantize_kernel, quantize_kernel

    x = _rows(tokens + hidden + round_scale, tokens, hidden)
    out = np.full((tokens, hidden), 0xEE, np.uint8)
    scales = np.full((tokens, hidden // 128), np.nan, np.float32)
    launch(quantize_kernel, 1, 32, x=x.view(np.uint16), round_scale=round_scale, out=out, scales=scales)
    want_out, want_scales = reference.quantize_fp8(x, bool(round_scale))
    np.testing.assert_array_equal(out, want_out.view(np.uint8))
    np.testing.assert_array_equal(scales.view(np.uint32), want_scales.view(np.uint32))
    back = np.full((tokens, hidden), 0xFEFE, np.uint16)
    launch(dequantize_kernel, 1, 32, x=out, scales=scales, out=back)
    np.testing.assert_array_equal(back, reference.dequantize_fp8(want_out, want_scales).view(np.uint16))


@pytest.mark.sim
def test_every_e4m3_value_and_rounding_ties():
    """The device conversions on every e4m3 code, and float32 values on and between them (the
    midpoints round to even), against ml_dtypes."""
    codes = np.arange(256, dtype=np.uint8)
    finite = codes[(codes & 0x7F) != 0x7F]
    exact = finite.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    ordered = np.unique(exact)
    midpoints = ((ordered[1:].astype(np.float64) + ordered[:-1]) / 2).astype(np.float32)
    rng = np.random.default_rng(1)
    values = np.concatenate([exact, midpoints, rng.uniform(-448, 448, 500).astype(np.float32),
                             np.float32([np.nan, 1e-30, -1e-30])])
    widened = np.full(256, -1.0, np.float32)
    narrowed = np.full(values.shape, 0xEE, np.uint8)
    launch(_convert, -(-values.shape[0] // 64), 64, codes=codes, widened=widened, values=values, narrowed=narrowed)
    want = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(widened, want)  # NaN codes compare equal as NaN
    np.testing.assert_array_equal(narrowed, values.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))


@pytest.mark.parametrize("make, message", [
    (lambda: np.zeros((4, 100), BFLOAT16), "x: hidden 100 is not a multiple of 128"),
    (lambda: np.zeros((4, 128), np.float32), "x: expected bfloat16"),
    (lambda: np.zeros(128, BFLOAT16), "x: expected bfloat16 \\[tokens, hidden\\]"),
])
def test_quantize_rejects(make, message):
    import xmoe

    with pytest.raises(ValueError, match=message):
        xmoe.quantize_fp8(backend_io()[0](make()))


def test_dequantize_rejects_wrong_scales():
    import xmoe

    to_device = backend_io()[0]
    x_fp8, scales = xmoe.quantize_fp8(to_device(_rows(1, 4, 256)))
    with pytest.raises(ValueError, match=r"scales: expected float32 \[4, 2\]"):
        xmoe.dequantize_fp8(x_fp8, to_device(np.ones((4, 3), np.float32)))
