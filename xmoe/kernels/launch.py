"""The launch path shared by every Numba kernel of xmoe.

Under Numba's CUDA simulator a NumPy argument is copied in and written back after the
kernel, which would hide stores into shared memory from the other ranks while a
kernel runs; wrapping it as a simulated device array passes it by reference, as a
device pointer is on the GPU. On the GPU, CuPy arrays become Numba device arrays
(zero-copy) and kernels go on the stream they are given.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda

from xmoe.comm.device import SIMULATOR

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray


def kernel_arg(value: Any) -> Any:
    """``value`` as a kernel receives it: arrays by reference, tuples element-wise."""
    if isinstance(value, tuple):
        return tuple(kernel_arg(v) for v in value)
    if SIMULATOR:
        return FakeCUDAArray(value) if isinstance(value, np.ndarray) else value
    if hasattr(value, "__cuda_array_interface__") and not isinstance(value, DeviceNDArray):
        return cuda.as_cuda_array(value)  # CuPy and other device arrays: a zero-copy Numba view
    return value


@lru_cache(maxsize=64)
def numba_stream(pointer: int) -> Any:
    """Numba's handle on the CUDA stream at ``pointer`` (0: the legacy default stream)."""
    return cuda.external_stream(pointer) if pointer else cuda.default_stream()


def launch(kernel: Any, blocks: int, threads: int, *args: Any, stream: int = 0) -> None:
    """Launch ``kernel`` on ``blocks`` x ``threads`` with ``args`` by reference, on ``stream`` (a pointer)."""
    converted = [kernel_arg(a) for a in args]
    if SIMULATOR:
        kernel[max(int(blocks), 1), int(threads)](*converted)
    else:
        kernel[max(int(blocks), 1), int(threads), numba_stream(stream)](*converted)
