"""FP8 payloads: bfloat16 ``[tokens, hidden]`` to ``(float8_e4m3fn [tokens, hidden], float32 scales
[tokens, hidden / 128])`` and back, as DeepEP's FP8 dispatch takes them.

Each token's 128-channel group gets the scale ``max(amax, 1e-4) / 448`` (448: the largest
e4m3 value), or that scale rounded up to a power of two with ``round_scale=True`` (what
UE8M0 scales hold); the group is stored as ``x * (1 / scale)`` rounded to nearest e4m3.
NumPy callers get ``ml_dtypes.float8_e4m3fn`` arrays, PyTorch callers ``torch.float8_e4m3fn``
tensors. No ``xmoe.init()`` needed. On the GPU the Numba kernels of ``kernels/quant.py`` run;
on the simulator backend their NumPy twins in ``reference.py`` do (as for the router and the
grouped GEMM): every device-function call of a simulated thread takes one lock, and a cast of
a few thousand groups took minutes under that lock's convoy. ``tests/test_quant.py`` runs the
kernels themselves on the simulator, on small shapes, against the same reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xmoe import reference
from xmoe.device_memory import kernel_view, on_gpu
from xmoe.interop import BFLOAT16, FLOAT8_E4M3, as_array, new_output

_THREADS = 256


def _launch_shape(framework: str, work: int) -> tuple[int, int, int]:
    """Blocks and threads for ``work`` threads, and the caller's current stream."""
    from xmoe.event import current_stream

    return -(-work // _THREADS), _THREADS, current_stream(framework).ptr


def quantize_fp8(x: Any, round_scale: bool = False) -> tuple[Any, Any]:
    """Cast ``x`` to FP8 with one scale per token per 128 channels.

    Args:
        x: bfloat16 ``[tokens, hidden]``, hidden a multiple of 128.
        round_scale: round every scale up to a power of two.

    Returns:
        ``(x_fp8, scales)``: float8_e4m3fn ``[tokens, hidden]`` and float32 ``[tokens, hidden / 128]``,
        the caller's tensor type.
    """
    from xmoe.kernels.launch import launch
    from xmoe.kernels.quant import GROUP, quantize_kernel

    array, origin = as_array(x, "x", raw=True)
    if origin.dtype != "bfloat16" or array.ndim != 2:
        raise ValueError(f"x: expected bfloat16 [tokens, hidden], got {origin.dtype} {list(array.shape)}")
    tokens, hidden = array.shape
    if hidden % GROUP:
        raise ValueError(f"x: hidden {hidden} is not a multiple of {GROUP} (one scale per {GROUP} channels)")
    out, out_finish = new_output((tokens, hidden), np.uint8, origin, "float8_e4m3fn", raw=True)
    scales, scales_finish = new_output((tokens, hidden // GROUP), np.float32, origin, raw=True)
    work = tokens * (hidden // GROUP)
    if not on_gpu():
        want_out, want_scales = reference.quantize_fp8(array.view(BFLOAT16), round_scale)
        out[...], scales[...] = want_out.view(np.uint8), want_scales
    elif work:
        launch(quantize_kernel, *_launch_shape(origin.framework, work), x=kernel_view(array),
               round_scale=int(bool(round_scale)), out=out, scales=scales)
    return out_finish(), scales_finish()


def dequantize_fp8(x_fp8: Any, scales: Any) -> Any:
    """Cast FP8 rows and their scales back to bfloat16.

    Args:
        x_fp8: float8_e4m3fn ``[tokens, hidden]``, hidden a multiple of 128.
        scales: float32 ``[tokens, hidden / 128]``.

    Returns:
        bfloat16 ``[tokens, hidden]``: ``x_fp8 * scale`` rounded to nearest, the caller's tensor type.
    """
    from xmoe.kernels.launch import launch
    from xmoe.kernels.quant import GROUP, dequantize_kernel

    array, origin = as_array(x_fp8, "x_fp8", raw=True)
    if origin.dtype != "float8_e4m3fn" or array.ndim != 2 or array.shape[1] % GROUP:
        raise ValueError(f"x_fp8: expected float8_e4m3fn [tokens, hidden] with hidden a multiple of {GROUP}, got "
                         f"{origin.dtype} {list(array.shape)}")
    tokens, hidden = array.shape
    scale_array, scale_origin = as_array(scales, "scales", raw=True)
    if scale_origin.dtype != "float32" or tuple(scale_array.shape) != (tokens, hidden // GROUP):
        raise ValueError(f"scales: expected float32 [{tokens}, {hidden // GROUP}], got {scale_origin.dtype} "
                         f"{list(scale_array.shape)}")
    out, out_finish = new_output((tokens, hidden), np.uint16, origin, "bfloat16", raw=True)
    work = tokens * (hidden // GROUP)
    if not on_gpu():
        out[...] = reference.dequantize_fp8(array.view(FLOAT8_E4M3), scale_array).view(np.uint16)
    elif work:
        launch(dequantize_kernel, *_launch_shape(origin.framework, work),
               x=kernel_view(array), scales=kernel_view(scale_array), out=out)
    return out_finish()
