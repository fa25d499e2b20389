"""The launch path shared by every Numba kernel of xmoe.

Under Numba's CUDA simulator a NumPy argument is copied in and written back after the
kernel, which would hide stores into shared memory from the other ranks while a
kernel runs; wrapping it as a simulated device array passes it by reference, as a
device pointer is on the GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xmoe.comm.device import SIMULATOR

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray


def kernel_arg(value: Any) -> Any:
    """``value`` as a kernel receives it: arrays by reference, tuples element-wise."""
    if isinstance(value, tuple):
        return tuple(kernel_arg(v) for v in value)
    if SIMULATOR and isinstance(value, np.ndarray):
        return FakeCUDAArray(value)
    return value


def launch(kernel: Any, blocks: int, threads: int, *args: Any) -> None:
    """Launch ``kernel`` on ``blocks`` x ``threads`` with ``args`` passed by reference."""
    kernel[max(int(blocks), 1), int(threads)](*(kernel_arg(a) for a in args))
