"""Device functions for payload arithmetic: fp32 accumulation of float32 or bfloat16.

bfloat16 travels as its uint16 bits; widening shifts them into the top half of a
uint32 read back as float32, narrowing rounds to nearest even (as ml_dtypes does).
"""

from __future__ import annotations

import numpy as np
from numba import cuda


@cuda.jit(device=True, inline=True)
def bf16_to_f32(bits):
    word = cuda.local.array(1, np.uint32)
    word[0] = np.uint32(bits) << np.uint32(16)
    return word.view(np.float32)[0]


@cuda.jit(device=True, inline=True)
def f32_to_bf16(value):
    word = cuda.local.array(1, np.float32)
    word[0] = value
    bits = word.view(np.uint32)[0]
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(0x7FC0)  # a quiet NaN
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return np.uint16(rounded >> np.uint32(16))


@cuda.jit(device=True, inline=True)
def f32_from_bits(bits):
    word = cuda.local.array(1, np.uint32)
    word[0] = np.uint32(bits)
    return word.view(np.float32)[0]


@cuda.jit(device=True, inline=True)
def f32_to_bits(value):
    word = cuda.local.array(1, np.float32)
    word[0] = value
    return word.view(np.uint32)[0]
