"""Device functions for payload arithmetic: fp32 accumulation of float32 or bfloat16.

bfloat16 travels as its uint16 bits; widening shifts them into the top half of a
uint32 read back as float32, narrowing rounds to nearest even (as ml_dtypes does).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from xmoe.layout.symmetric import FP8_GROUP


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


# float8_e4m3fn: 1 sign, 4 exponent (bias 7) and 3 mantissa bits, no infinities, 0x7F / 0xFF NaN;
# largest 448 (0x7E), smallest normal 2^-6, subnormals m * 2^-9.
E4M3_MAX = 448.0
_F32_MIN_E4M3_NORMAL = 0x3C800000  # 2^-6 as float32 bits
_E4M3_REBIAS = (127 - 7) << 3  # float32 exponent bias minus e4m3's, in e4m3's exponent position


@cuda.jit(device=True, inline=True)
def f32_to_e4m3(value):
    """float32 -> float8_e4m3fn bits, rounded to nearest even (as ml_dtypes does), saturating at
    +-448 (the values xmoe casts are scaled into range); NaN stays NaN."""
    bits = f32_to_bits(value)
    sign = np.uint32((bits >> np.uint32(24)) & np.uint32(0x80))
    magnitude = bits & np.uint32(0x7FFFFFFF)
    if magnitude > np.uint32(0x7F800000):
        return np.uint8(sign | np.uint32(0x7F))
    if magnitude >= np.uint32(_F32_MIN_E4M3_NORMAL):
        rounded = magnitude + np.uint32(0x7FFFF) + ((magnitude >> np.uint32(20)) & np.uint32(1))
        code = (rounded >> np.uint32(20)) - np.uint32(_E4M3_REBIAS)
        if code > np.uint32(0x7E):
            code = np.uint32(0x7E)
    else:  # a subnormal (or 2^-6 after rounding): round(|value| * 2^9) to nearest even, exact in float32
        scaled = f32_from_bits(magnitude) * np.float32(512.0)
        whole = np.uint32(scaled)
        rest = scaled - np.float32(whole)
        if rest > np.float32(0.5) or (rest == np.float32(0.5) and (whole & np.uint32(1)) == np.uint32(1)):
            whole += np.uint32(1)
        code = whole
    return np.uint8(sign | code)


@cuda.jit(device=True, inline=True)
def e4m3_to_f32(bits):
    """float8_e4m3fn bits -> float32 (exact)."""
    code = np.uint32(bits)
    exponent = (code >> np.uint32(3)) & np.uint32(0xF)
    mantissa = code & np.uint32(0x7)
    if exponent == np.uint32(0xF) and mantissa == np.uint32(0x7):
        value = f32_from_bits(np.uint32(0x7FC00000))
    elif exponent == np.uint32(0):
        value = np.float32(mantissa) * np.float32(2.0 ** -9)
    else:
        value = f32_from_bits(((exponent + np.uint32(120)) << np.uint32(23)) | (mantissa << np.uint32(20)))
    return -value if code & np.uint32(0x80) else value


@cuda.jit(device=True, inline=True)
def power_of_two_above(value):
    """The least power of two >= the positive normal float32 ``value`` (2^ceil(log2 value))."""
    bits = f32_to_bits(value)
    if bits & np.uint32(0x7FFFFF):
        bits = (bits & np.uint32(0xFF800000)) + np.uint32(0x800000)
    return f32_from_bits(bits)


#: The smallest ``amax`` an FP8 scale is taken from (a group of zeros gets a finite scale).
AMAX_FLOOR = 1e-4


@cuda.jit(device=True, inline=True)
def largest_magnitude(row, first, count, amax):
    """The largest of ``amax`` and ``|row[c]|`` for ``count`` channels from ``first`` (bfloat16 bits)."""
    for c in range(first, first + count):
        amax = max(amax, abs(bf16_to_f32(row[c])))
    return amax


@cuda.jit(device=True, inline=True)
def fp8_scale(amax, round_scale):
    """A group's float32 scale: ``amax / 448``, rounded up to a power of two with ``round_scale``."""
    scale = amax / np.float32(E4M3_MAX)
    if round_scale:
        scale = power_of_two_above(scale)
    return scale


@cuda.jit(device=True, inline=True)
def cast_channels(row, first, count, scale, out_row):
    """``count`` channels of ``row`` from ``first`` (bfloat16 bits) times ``1 / scale`` as e4m3 bits."""
    inverse = np.float32(1.0) / scale
    for c in range(first, first + count):
        out_row[c] = f32_to_e4m3(bf16_to_f32(row[c]) * inverse)


@cuda.jit(device=True)
def quantize_group(row, group, round_scale, out_row):
    """One thread: channels ``[128 * group, 128 * (group + 1))`` of ``row`` (uint16, bfloat16 bits)
    as e4m3 bits into ``out_row`` (uint8); returns the group's float32 scale."""
    first = group * FP8_GROUP
    scale = fp8_scale(largest_magnitude(row, first, FP8_GROUP, np.float32(AMAX_FLOOR)), round_scale)
    cast_channels(row, first, FP8_GROUP, scale, out_row)
    return scale


@cuda.jit(device=True)
def quantize_row(row, round_scale, out_row, scales_row, partial):
    """Block-wide :func:`quantize_group` of every group of one row (``scales_row`` float32
    ``[hidden / 128]`` gets the scales), several threads a group: each finds the largest
    magnitude of its share, one pass through ``partial`` (shared float32, a slot a thread) gives
    the group's; bit for bit what :func:`quantize_group` computes."""
    num_threads, tid = cuda.blockDim.x, cuda.threadIdx.x
    groups = scales_row.shape[0]
    per = 1  # threads a group: the largest power of two that fits the block and divides 128
    while per * 2 <= num_threads // max(groups, 1) and per * 2 <= FP8_GROUP:
        per *= 2
    width = FP8_GROUP // per
    lane = tid % per
    working = tid < (num_threads // per) * per
    for base in range(0, groups, num_threads // per):
        group = base + tid // per
        first = group * FP8_GROUP + lane * width
        amax = np.float32(AMAX_FLOOR)
        if group < groups and working:
            amax = largest_magnitude(row, first, width, amax)
        partial[tid] = amax
        cuda.syncthreads()
        if group < groups and working:
            for j in range(tid - lane, tid - lane + per):
                amax = max(amax, partial[j])
            scale = fp8_scale(amax, round_scale)
            cast_channels(row, first, width, scale, out_row)
            if lane == 0:
                scales_row[group] = scale
        cuda.syncthreads()
