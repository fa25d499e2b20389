"""The launch path shared by every Numba kernel of xmoe.

Simulator: a NumPy argument is copied in and written back after the kernel, which would
hide stores into shared memory from the other ranks while a kernel runs; wrapping it as
a simulated device array passes it by reference, as a device pointer is on the GPU.

GPU: Numba's dispatcher costs 35-120 us of host time per launch (it types and converts
every argument), and ``cuda.core``'s launch converts every parameter in Python (~40-80 us
for the ~200 parameters the dispatch kernel had when it took every peer's views). A kernel is compiled
by Numba's dispatcher once per argument signature (or loaded from its disk cache); every
launch packs the arguments straight into Numba's kernel ABI (an array is meminfo,
parent, size, itemsize, data pointer, shape, strides, all 8-byte; a tuple is its
elements in order) as bytes into one parameter buffer and calls the driver's
``cuLaunchKernel`` through ctypes. A :class:`Prepared` launch packs everything once and
repacks only the arguments that change.
"""

from __future__ import annotations

import ctypes
import os
import struct
from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda

from xmoe.comm.device import SIMULATOR

from xmoe.interop import DeviceArray

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray


def kernel_arg(value: Any) -> Any:
    """``value`` as Numba's dispatcher takes it: arrays by reference, tuples element-wise."""
    if isinstance(value, tuple):
        return tuple(kernel_arg(v) for v in value)
    if SIMULATOR:
        return FakeCUDAArray(value) if isinstance(value, np.ndarray) else value
    if hasattr(value, "__cuda_array_interface__") and not isinstance(value, DeviceNDArray):
        return cuda.as_cuda_array(value)  # CuPy and other device arrays: a zero-copy Numba view
    return value


_INT = struct.Struct("q")
#: Numba's ABI of a C-contiguous array of each rank: meminfo, parent, size, itemsize, data, shape, strides.
_ARRAY = {ndim: struct.Struct(f"{5 + 2 * ndim}q") for ndim in range(8)}


def _pack(value: Any, parts: list) -> Any:
    """Append ``value`` in Numba's kernel ABI (8 bytes a parameter) to ``parts``; return its
    signature: what decides the compiled kernel (dtype and rank of arrays, tuple structure).
    Arrays reach the kernels C-contiguous (``as_array`` and fresh outputs), so their layout
    is not part of it."""
    kind = type(value)
    if kind is int or isinstance(value, np.integer):
        parts.append(_INT.pack(value))
        return "i"
    if kind is tuple:
        return tuple(_pack(item, parts) for item in value)
    parts.append(_ARRAY[value.ndim].pack(*_abi(value)))  # a DeviceArray or a CuPy array
    return (value.dtype.char, value.ndim)


def _abi(array: Any) -> tuple[int, ...]:
    """A :class:`DeviceArray` or CuPy array in Numba's kernel ABI (see ``_ARRAY``)."""
    if type(array) is DeviceArray:
        return array.abi()
    return (0, 0, array.size, array.itemsize, array.data.ptr, *array.shape, *array.strides)


def _ranks_on_device() -> int:
    from xmoe import runtime

    return runtime.get_group().ranks_on_device if runtime.is_initialized() else 1


#: ``cuLaunchKernel``'s ``extra`` keys: the parameter buffer, its size, the end of the list.
_PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE, _PARAM_END = 1, 2, 0


@lru_cache(maxsize=1)
def _cuda_driver() -> Any:
    return ctypes.CDLL("libcuda.so.1")


@lru_cache(maxsize=1)
def _cu_launch_kernel() -> Any:
    """The driver's ``cuLaunchKernel`` through ctypes (a Python call of ~1 us)."""
    function = _cuda_driver().cuLaunchKernel
    function.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    function.restype = ctypes.c_int
    return function


class _Parameters:
    """A kernel's parameter block, passed to the driver whole (``CU_LAUNCH_PARAM_BUFFER_POINTER``):
    Numba's ABI makes every parameter 8 bytes, so the packed bytes are the kernel's parameter
    layout. One buffer cost the driver 2-4 us less per launch than ~350 separate parameter
    pointers (when the kernels took every peer's views), measured on an H100 host."""

    def __init__(self, num_bytes: int) -> None:
        self.num_bytes = num_bytes
        self.values = (ctypes.c_int64 * max(num_bytes // 8, 1))()
        self.values_address = ctypes.addressof(self.values)
        self._size = ctypes.c_size_t(num_bytes)
        self._extra = (ctypes.c_void_p * 5)(_PARAM_BUFFER_POINTER, self.values_address, _PARAM_BUFFER_SIZE,
                                            ctypes.addressof(self._size), _PARAM_END)
        self.extra_address = ctypes.addressof(self._extra)

    def launch(self, handle: int, blocks: int, threads: int, stream: int) -> None:
        result = _cu_launch_kernel()(handle, blocks, 1, 1, threads, 1, 1, 0, stream, None, self.extra_address)
        if result != 0:
            raise RuntimeError(f"cuLaunchKernel failed (CUresult {result}) for {blocks} x {threads} threads")


class _Compiled(_Parameters):
    """A compiled kernel (``handle``) and the parameter block its launches fill."""

    def __init__(self, handle: int, num_bytes: int) -> None:
        super().__init__(num_bytes)
        self.handle = handle
        self._spinning: dict[int, int] = {}

    def launch_packed(self, blocks: int, threads: int, stream: int, packed: bytes) -> None:
        ctypes.memmove(self.values_address, packed, self.num_bytes)
        self.launch(self.handle, blocks, threads, stream)

    def spinning_blocks(self, threads: int) -> int:
        """The most blocks of ``threads`` that this process lets spin on the GPU at once: the
        occupancy API's blocks per SM times the SMs it may use, divided among the ranks that
        share the GPU (one rank's spinning blocks must leave room for the blocks another's
        progress needs). Under MPS with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` the driver
        reports this process's share of the SMs already."""
        blocks = self._spinning.get(threads)
        if blocks is None:
            per_sm = ctypes.c_int()
            result = _cuda_driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(
                ctypes.byref(per_sm), ctypes.c_void_p(self.handle), threads, ctypes.c_size_t(0))
            if result != 0 or per_sm.value < 1:
                raise RuntimeError(f"the kernel does not fit {threads} threads a block on this GPU (CUresult {result})")
            blocks = per_sm.value * cuda.get_current_device().MULTIPROCESSOR_COUNT
            if not os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
                blocks = max(blocks // _ranks_on_device(), 1)
            self._spinning[threads] = blocks
        return blocks


_compiled: dict[tuple, _Compiled] = {}


def _compile(kernel: Any, args: tuple, num_bytes: int) -> _Compiled:
    """Compile ``kernel`` for the types of ``args`` (or load it from Numba's disk cache) and
    load it on the current GPU (which runs the setup of linked device libraries: NVSHMEM's)."""
    signature = tuple(kernel.typeof_pyval(kernel_arg(a)) for a in args)
    handle = kernel.compile(signature)._codelibrary.get_cufunc().handle
    return _Compiled(handle.value if isinstance(handle, ctypes.c_void_p) else int(handle), num_bytes)


def _packed(kernel: Any, blocks: int, threads: int, args: tuple, spins: bool) -> tuple[_Compiled, int, list[bytes]]:
    """The compiled kernel for ``args``' signature, the grid to launch, and each of ``args`` packed."""
    packed: list[bytes] = []
    signature = []
    for arg in args:
        parts: list = []
        signature.append(_pack(arg, parts))
        packed.append(b"".join(parts))
    signature_key = (kernel, tuple(signature))
    compiled = _compiled.get(signature_key)
    if compiled is None:
        compiled = _compiled[signature_key] = _compile(kernel, args, sum(len(arg) for arg in packed))
    if spins:
        blocks = min(blocks, compiled.spinning_blocks(threads))
    return compiled, blocks, packed


def launch(kernel: Any, blocks: int, threads: int, *args: Any, stream: int = 0, spins: bool = False) -> None:
    """Launch ``kernel`` on ``blocks`` x ``threads`` with ``args`` by reference, on ``stream`` (a pointer).

    ``spins``: the kernel's blocks wait for peers; where ranks share the GPU the grid is cut
    to :meth:`_Compiled.spinning_blocks` (the kernel must finish with any number of its
    blocks on the GPU: xmoe's take their work as they come).
    """
    blocks, threads = max(int(blocks), 1), int(threads)
    if SIMULATOR:
        kernel[blocks, threads](*(kernel_arg(a) for a in args))
        return
    compiled, blocks, packed = _packed(kernel, blocks, threads, args, spins)
    compiled.launch_packed(blocks, threads, stream, b"".join(packed))


class Prepared:
    """A launch of ``kernel`` (as :func:`launch` takes it) whose arguments are fixed but for
    those at the positions ``changing`` (ints, and arrays of the same dtype and rank as
    prepared); ``prepared(stream, *values)`` launches it with ``values`` there. The caller
    keeps one per call site and argument set (a cached dispatch keeps its own in the handle).

    GPU: every parameter is packed once; a call repacks only the changing arguments and
    calls the driver. Simulator: the values are put in place and the kernel launched as usual.
    """

    def __init__(self, kernel: Any, blocks: int, threads: int, args: tuple, changing: tuple[int, ...],
                 spins: bool = False) -> None:
        self.kernel, self.changing, self.spins = kernel, changing, spins
        self.blocks, self.threads = max(int(blocks), 1), int(threads)
        if SIMULATOR:
            self.args = args
            return
        compiled, self.blocks, packed = _packed(kernel, self.blocks, self.threads, args, spins)
        self.slots: list[tuple[int, Any]] = []  # byte offset, how to pack (an array's struct; None: an int)
        offset = 0
        for position, (arg, arg_bytes) in enumerate(zip(args, packed)):
            if position in changing:
                is_int = type(arg) is int or isinstance(arg, np.integer)
                self.slots.append((offset, None if is_int else _ARRAY[len(arg.shape)]))
            offset += len(arg_bytes)
        self.handle = compiled.handle
        self.parameters = _Parameters(compiled.num_bytes)
        ctypes.memmove(self.parameters.values_address, b"".join(packed), compiled.num_bytes)

    def __call__(self, stream: int, *values: Any) -> None:
        if SIMULATOR:
            args = list(self.args)
            for position, value in zip(self.changing, values):
                args[position] = value
            launch(self.kernel, self.blocks, self.threads, *args, spins=self.spins)
            return
        parameters = self.parameters
        for (offset, array), value in zip(self.slots, values):
            if array is None:
                _INT.pack_into(parameters.values, offset, value)
            else:
                array.pack_into(parameters.values, offset, *_abi(value))
        parameters.launch(self.handle, self.blocks, self.threads, stream)
