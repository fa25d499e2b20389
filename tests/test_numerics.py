"""bfloat16 widening/narrowing device functions against ml_dtypes, every element."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from xmoe.interop import BFLOAT16
from xmoe.kernels.launch import launch
from xmoe.kernels.numerics import bf16_to_f32, f32_to_bf16

pytestmark = pytest.mark.sim  # a kernel launched on NumPy arrays


@cuda.jit
def _round_trip(bits_in, widened, values, narrowed):
    i = cuda.grid(1)
    if i < bits_in.shape[0]:
        widened[i] = bf16_to_f32(bits_in[i])
        narrowed[i] = f32_to_bf16(values[i])


def test_bf16_conversions_match_ml_dtypes():
    rng = np.random.default_rng(5)
    n = 300
    bits_in = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bits_in[(bits_in & 0x7F80) == 0x7F80] = 0x3F80  # finite values only; NaN payloads are not kept
    values = (rng.standard_normal(n) * np.exp(rng.uniform(-30, 30, n))).astype(np.float32)
    values[:4] = [np.float32(1 + 2**-8), np.float32(1 + 3 * 2**-8), np.float32(-0.0), np.float32(np.inf)]
    widened = np.full(n, np.nan, np.float32)
    narrowed = np.full(n, 0xFFFF, np.uint16)
    launch(_round_trip, (n + 63) // 64, 64, bits_in=bits_in, widened=widened, values=values, narrowed=narrowed)
    np.testing.assert_array_equal(widened, bits_in.view(BFLOAT16).astype(np.float32))
    np.testing.assert_array_equal(narrowed, values.astype(BFLOAT16).view(np.uint16))
