"""The launch path shared by every Numba kernel of xmoe.

Simulator: a NumPy argument is copied in and written back after the kernel, which would
hide stores into shared memory from the other ranks while a kernel runs; wrapping it as
a simulated device array passes it by reference, as a device pointer is on the GPU.

GPU: Numba's dispatcher costs 35-120 us of host time per launch (it types and converts
every argument), and ``cuda.core``'s launch converts every parameter in Python (~40-80 us
for the ~200 parameters of a kernel that takes the peers' views). A kernel is compiled
through Numba's dispatcher once per argument signature; later launches pack the arguments
straight into Numba's kernel ABI (an array is meminfo, parent, size, itemsize, data
pointer, shape, strides, all 8-byte; a tuple is its elements in order) as bytes, copy
them into a parameter block kept per compiled kernel, and call the driver's
``cuLaunchKernel`` through ctypes. Arguments that never change (the peers' views
of a symmetric buffer) are packed once, as a :class:`StaticArg`.
"""

from __future__ import annotations

import ctypes
import struct
from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda

from xmoe.comm.device import SIMULATOR

from xmoe.interop import DeviceArray, data_pointer

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray


def kernel_arg(value: Any) -> Any:
    """``value`` as Numba's dispatcher takes it: arrays by reference, tuples element-wise."""
    if isinstance(value, StaticArg):
        return value.converted
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
    if kind is StaticArg:
        parts.append(value.packed)
        return value.signature
    if kind is DeviceArray:
        parts.append(_ARRAY[len(value.shape)].pack(*value.abi()))
        return (value.dtype.char, len(value.shape))
    if kind is int or isinstance(value, np.integer):
        parts.append(_INT.pack(value))
        return "i"
    if kind is tuple:
        return tuple(_pack(item, parts) for item in value)
    parts.append(_ARRAY[value.ndim].pack(0, 0, value.size, value.itemsize, value.data.ptr, *value.shape,
                                         *value.strides))  # a CuPy array
    return (value.dtype.char, value.ndim)


#: Signatures of static arguments, each stood for by a small int: a launch hashes its
#: signature tuple every call, and a peer tuple's signature is a tuple of tuples.
_STATIC_SIGNATURES: dict[Any, int] = {}


class StaticArg:
    """An argument packed once (GPU) for every launch that passes it (e.g. a tuple of peer views)."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.converted = kernel_arg(value)
        parts: list = []
        self.signature = None if SIMULATOR else _STATIC_SIGNATURES.setdefault(_pack(value, parts),
                                                                               len(_STATIC_SIGNATURES))
        self.packed = b"".join(parts)


def static_arg(value: Any) -> Any:
    """``value`` packed once where that saves work (GPU); as is on the simulator."""
    return value if SIMULATOR else StaticArg(value)


@lru_cache(maxsize=64)
def numba_stream(pointer: int) -> Any:
    """Numba's handle on the CUDA stream at ``pointer`` (0: the legacy default stream)."""
    return cuda.external_stream(pointer) if pointer else cuda.default_stream()


@lru_cache(maxsize=1)
def _cu_launch_kernel() -> Any:
    """The driver's ``cuLaunchKernel`` through ctypes (a Python call of ~1 us)."""
    function = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
    function.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    function.restype = ctypes.c_int
    return function


class _Parameters:
    """A kernel's parameter block (all parameters are 8 bytes) and the pointer array the driver reads."""

    def __init__(self, num_bytes: int) -> None:
        count = num_bytes // 8
        self.num_bytes = num_bytes
        self.values = (ctypes.c_int64 * count)()
        self.values_address = ctypes.addressof(self.values)
        self.pointers = (ctypes.c_void_p * count)(*(self.values_address + 8 * i for i in range(count)))
        self.pointers_address = ctypes.addressof(self.pointers) if count else None

    def launch(self, handle: int, blocks: int, threads: int, stream: int) -> None:
        result = _cu_launch_kernel()(handle, blocks, 1, 1, threads, 1, 1, 0, stream, self.pointers_address, None)
        if result != 0:
            raise RuntimeError(f"cuLaunchKernel failed (CUresult {result}) for {blocks} x {threads} threads")


class _Compiled(_Parameters):
    """A compiled kernel (``handle``) and the parameter block its launches fill."""

    def __init__(self, handle: int, num_bytes: int) -> None:
        super().__init__(num_bytes)
        self.handle = handle

    def launch_packed(self, blocks: int, threads: int, stream: int, packed: bytes) -> None:
        ctypes.memmove(self.values_address, packed, self.num_bytes)
        self.launch(self.handle, blocks, threads, stream)


class _Prepared(_Parameters):
    """One call site's launch with every parameter packed once; a later launch rewrites only
    the arguments at the positions ``changing``: an int's value, an array's data pointer
    (its shape must be the one prepared)."""

    def __init__(self, compiled: _Compiled, blocks: int, threads: int, args: tuple, changing: tuple[int, ...]) -> None:
        parts: list = []
        self.slots: list[tuple[int, tuple[int, ...] | None]] = []
        offset = 0
        for position, arg in enumerate(args):
            first = len(parts)
            _pack(arg, parts)
            if position in changing:
                is_int = type(arg) is int or isinstance(arg, np.integer)
                self.slots.append((offset, None) if is_int else (offset + 32, tuple(arg.shape)))  # 32: data pointer
            offset += sum(len(part) for part in parts[first:])
        super().__init__(offset)
        ctypes.memmove(self.values_address, b"".join(parts), offset)
        self.handle, self.blocks, self.threads, self.changing = compiled.handle, blocks, threads, changing

    def relaunch(self, stream: int, values: tuple) -> None:
        for (offset, shape), value in zip(self.slots, values):
            if shape is None:
                _INT.pack_into(self.values, offset, value)
                continue
            if tuple(value.shape) != shape:
                raise ValueError(f"prepared launch: an array of shape {tuple(value.shape)} where {shape} was prepared")
            _INT.pack_into(self.values, offset, data_pointer(value))
        self.launch(self.handle, self.blocks, self.threads, stream)


_compiled: dict[tuple, _Compiled] = {}


def launch(kernel: Any, blocks: int, threads: int, *args: Any, stream: int = 0,
           keep: tuple[dict, Any, tuple[int, ...]] | None = None) -> None:
    """Launch ``kernel`` on ``blocks`` x ``threads`` with ``args`` by reference, on ``stream`` (a pointer).

    ``keep=(cache, key, changing)``: the packed parameters are kept in ``cache[key]`` and a
    later launch with the same key repacks only the arguments at the positions ``changing``
    (the caller's key must fix everything else: the other arguments, the launch shape and
    the shapes of the changing arrays). Ignored on the simulator.
    """
    blocks, threads = max(int(blocks), 1), int(threads)
    if SIMULATOR:
        kernel[blocks, threads](*(kernel_arg(a) for a in args))
        return
    if keep is not None:
        cache, key, changing = keep
        prepared = cache.get(key)
        if prepared is not None and prepared.changing == changing:
            prepared.relaunch(stream, tuple(args[i] for i in changing))
            return
    parts: list = []
    signature_key = (kernel, tuple([_pack(arg, parts) for arg in args]))
    compiled = _compiled.get(signature_key)
    if compiled is not None:
        compiled.launch_packed(blocks, threads, stream, b"".join(parts))
    else:
        # first launch of this signature: Numba compiles (or loads from its disk cache) and launches
        converted = [kernel_arg(a) for a in args]
        kernel[blocks, threads, numba_stream(stream)](*converted)
        signature = tuple(kernel.typeof_pyval(a) for a in converted)
        handle = kernel.overloads[signature]._codelibrary.get_cufunc().handle
        address = handle.value if isinstance(handle, ctypes.c_void_p) else int(handle)
        compiled = _compiled[signature_key] = _Compiled(address, sum(len(part) for part in parts))
    if keep is not None:
        cache[key] = _Prepared(compiled, blocks, threads, args, changing)
