"""FP8 cast kernels: bfloat16 rows to float8_e4m3fn with one float32 scale per 128 channels, and back.

One thread a (token, 128-channel group): it finds the group's largest magnitude ``amax``
(at least 1e-4), takes ``scale = amax / 448`` (rounded up to a power of two with
``round_scale``, as DeepSeek's UE8M0 scales are), and stores ``round(x / scale)`` as e4m3
(``x * (1 / scale)``, as DeepEP's ``per_token_cast_to_fp8`` computes it). The cast back is
``e4m3 * scale`` rounded to bfloat16. ``reference.quantize_fp8`` / ``dequantize_fp8`` are
the NumPy twins.
"""

from __future__ import annotations

from numba import cuda

from xmoe.layout.symmetric import FP8_GROUP
from xmoe.kernels.numerics import e4m3_to_f32, f32_to_bf16, quantize_group

GROUP = FP8_GROUP


@cuda.jit(cache=True)
def quantize_kernel(x, round_scale, out, scales):
    """``x`` uint16 (bfloat16 bits) ``[tokens, hidden]`` -> ``out`` uint8 (e4m3 bits) ``[tokens, hidden]``,
    ``scales`` float32 ``[tokens, hidden / 128]``; ``round_scale``: 1 for power-of-two scales."""
    i = cuda.grid(1)
    groups = scales.shape[1]
    if i < x.shape[0] * groups:
        t = i // groups
        scales[t, i % groups] = quantize_group(x[t], i % groups, round_scale, out[t])


@cuda.jit(cache=True)
def dequantize_kernel(x, scales, out):
    """``x`` uint8 (e4m3 bits) and ``scales`` float32 ``[tokens, hidden / 128]`` -> ``out`` uint16
    (bfloat16 bits) ``[tokens, hidden]``; one thread a (token, 128-channel group)."""
    i = cuda.grid(1)
    groups = scales.shape[1]
    if i < x.shape[0] * groups:
        t = i // groups
        first = (i % groups) * GROUP
        scale = scales[t, i % groups]
        for c in range(first, first + GROUP):
            out[t, c] = f32_to_bf16(e4m3_to_f32(x[t, c]) * scale)
