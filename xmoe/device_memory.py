"""The kernels' view of memory: which backend runs them, device arrays without a framework,
host words the GPU writes, and typed views of parts of a buffer.

On the GPU a :class:`DeviceArray` is what xmoe's launch path packs (a pointer, a shape,
byte strides); on the simulator the same functions hand out NumPy arrays.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np


@lru_cache(maxsize=1)
def on_gpu() -> bool:
    """Whether kernels run on the GPU (fixed by ``xmoe.init()`` before Numba loads, else the
    default backend is fixed now)."""
    from xmoe.runtime import ensure_backend

    ensure_backend()
    from numba.cuda.core import config

    return not config.ENABLE_CUDASIM


def xp() -> Any:
    """The array module of the backend: NumPy on the simulator, CuPy on the GPU."""
    if on_gpu():
        import cupy

        return cupy
    return np


class DeviceArray:
    """Device memory as the Buffer's kernels take it: pointer, shape, dtype, byte strides.

    Built from a PyTorch tensor without a framework call (a CuPy view of a tensor costs
    ~10 us of host time per argument). ``owner`` keeps the memory alive; ``strides`` None
    means C-contiguous.
    """

    __slots__ = ("ptr", "shape", "dtype", "owner", "_strides", "_abi")

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype, owner: Any,
                 strides: tuple[int, ...] | None = None) -> None:
        self.ptr, self.shape, self.dtype, self.owner = ptr, shape, dtype, owner
        self._strides = None if strides is None or tuple(strides) == _c_strides(shape, dtype.itemsize) else tuple(strides)
        self._abi: tuple[int, ...] | None = None

    @property
    def strides(self) -> tuple[int, ...]:
        """Byte strides (computed on demand for the common, C-contiguous, array: it is built on
        every call's path)."""
        return _c_strides(self.shape, self.dtype.itemsize) if self._strides is None else self._strides

    @property
    def c_contiguous(self) -> bool:
        return self._strides is None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    def abi(self) -> tuple[int, ...]:
        """The array in Numba's kernel ABI: meminfo, parent, size, itemsize, data, shape, strides."""
        if self._abi is None:
            self._abi = (0, 0, self.size, self.dtype.itemsize, self.ptr, *self.shape, *self.strides)
        return self._abi

    def get(self) -> np.ndarray:
        """A NumPy copy (as CuPy's ``get``)."""
        import cupy

        return cupy.asarray(self).get()

    def part(self, first: int, shape: tuple[int, ...]) -> "DeviceArray":
        """Elements ``first:first + prod(shape)`` of this (C-contiguous) array, flat, as an array of ``shape``."""
        return DeviceArray(self.ptr + first * self.dtype.itemsize, shape, self.dtype, self.owner)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False),
                "strides": None if self.c_contiguous else self.strides, "version": 3}


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides = [itemsize] * len(shape)
    for axis in range(len(shape) - 1, 0, -1):
        strides[axis - 1] = strides[axis] * shape[axis]
    return tuple(strides)


def part(array: Any, first: int, shape: tuple[int, ...]) -> Any:
    """Elements ``first:first + prod(shape)`` of the flat C-contiguous ``array`` (NumPy, CuPy or
    :class:`DeviceArray`), shaped ``shape``."""
    if type(array) is DeviceArray:
        return array.part(first, shape)
    return array[first : first + math.prod(shape)].reshape(shape)


def strided_view(block: Any, offset: int, shape: tuple[int, ...], dtype: np.dtype, strides: tuple[int, ...]) -> Any:
    """An array of ``shape``, ``dtype`` and byte ``strides`` at byte ``offset`` of the uint8
    ``block``, as the kernels take it: a NumPy view on the simulator, a :class:`DeviceArray`
    over a CuPy block on the GPU."""
    if isinstance(block, np.ndarray):
        return np.ndarray(shape, dtype, buffer=block, offset=offset, strides=strides)
    return DeviceArray(data_pointer(block) + offset, shape, np.dtype(dtype), block, strides)


def data_pointer(array: Any) -> int:
    """The address of the first element of a NumPy, CuPy or :class:`DeviceArray` array."""
    if type(array) is DeviceArray:
        return array.ptr
    return array.ctypes.data if isinstance(array, np.ndarray) else array.data.ptr


def kernel_view(array: Any) -> Any:
    """A backend array as the kernels take it cheapest: a :class:`DeviceArray` over a CuPy
    array's memory on the GPU (packing a CuPy array for a launch costs a few us), the array
    itself on the simulator; a :class:`DeviceArray` as it is."""
    if isinstance(array, np.ndarray) or type(array) is DeviceArray:
        return array
    return DeviceArray(array.data.ptr, tuple(array.shape), array.dtype, array)


@lru_cache(maxsize=64)
def empty(shape: tuple[int, ...], dtype: type) -> Any:
    """An empty kernel array of ``shape`` (a zero in it): the arguments a launch does not use,
    and the top-k arrays of a call without top-k (``[rows, 0]``)."""
    return kernel_view(xp().empty(shape, dtype))


class HostWords:
    """int32 words that kernels write and the host reads with no copy and no synchronisation:
    mapped pinned host memory on the GPU, a NumPy array on the simulator.

    Attributes:
        host: the words as a NumPy array (reads see the kernels' stores as they land).
        device: what a kernel takes for them (a :class:`DeviceArray` on the GPU).
    """

    def __init__(self, length: int) -> None:
        self._pointer = 0
        if on_gpu():
            import ctypes

            import cupy

            runtime = cupy.cuda.runtime
            self._pointer = runtime.hostAlloc(4 * length, runtime.hostAllocMapped)
            self.host = np.ctypeslib.as_array((ctypes.c_int32 * length).from_address(self._pointer))
            self.host[:] = 0
            # unified addressing (every 64-bit CUDA platform): mapped host memory has the same address on the device
            self.device = DeviceArray(self._pointer, (length,), np.dtype(np.int32), None)
        else:
            self.host = np.zeros(length, np.int32)
            self.device = self.host

    def part(self, first: int, shape: tuple[int, ...]) -> Any:
        """Words ``first:first + prod(shape)`` shaped ``shape``, as a kernel takes them."""
        return part(self.device, first, shape)

    def free(self) -> None:
        if self._pointer:
            import cupy

            cupy.cuda.runtime.freeHost(self._pointer)
            self._pointer = 0
