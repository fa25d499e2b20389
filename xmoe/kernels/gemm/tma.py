"""Tensor maps for the Hopper kernel's TMA loads, encoded on the host.

A map holds only a base address, sizes, strides and the box shape, so it is cached by
those: a tensor at the same address with the same shape reuses its map.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np

#: The kernel's ``TensorMap`` parameter: CUDA's 128-byte ``CUtensorMap``, passed by value.
TENSOR_MAP = np.dtype([("words", np.uint64, (16,))])


@lru_cache(maxsize=256)
def tensor_map(address: int, sizes: tuple[int, ...], box: tuple[int, ...]) -> np.void:
    """The map of a dense bfloat16 tensor at ``address`` with ``sizes`` (innermost first),
    loaded in ``box``es of 128-byte-swizzled rows (``box[0]`` = 64 elements)."""
    from cuda.bindings import driver

    strides = [driver.cuuint64_t(2 * int(np.prod(sizes[: i + 1]))) for i in range(len(sizes) - 1)]
    error, encoded = driver.cuTensorMapEncodeTiled(
        driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, len(sizes), address,
        [driver.cuuint64_t(s) for s in sizes], strides, [driver.cuuint32_t(b) for b in box],
        [driver.cuuint32_t(1)] * len(sizes), driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    if error != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled(sizes={sizes}, box={box}) failed: {error}")
    return np.frombuffer(ctypes.string_at(encoded.getPtr(), TENSOR_MAP.itemsize), dtype=TENSOR_MAP)[0]
