"""The launch path shared by every Numba kernel of xmoe: arguments by name, packed once.

A kernel's parameters are declared once, by the Python signature of its ``@cuda.jit``
function: every launch here takes its arguments by name (:func:`parameters` orders them
and names the missing and unknown ones), so the host never matches arguments by
position, and the per-call arguments of a :class:`Prepared` launch are named too.

Simulator: a NumPy argument is copied in and written back after the kernel, which would
hide stores into shared memory from the other ranks while a kernel runs; wrapping it as
a simulated device array passes it by reference, as a device pointer is on the GPU.

GPU: Numba's dispatcher costs 35-120 us of host time per launch (it types and converts
every argument). A kernel is compiled by Numba's dispatcher once per argument signature
(``Dispatcher.compile``, or loaded from its disk cache); every launch packs the arguments
straight into Numba's kernel ABI (an array is meminfo, parent, size, itemsize, data
pointer, shape, strides, all 8-byte; an int is 8 bytes; a tuple is its elements in order)
as bytes into one parameter buffer, and calls the driver's ``cuLaunchKernel`` through
``cuda.bindings``. Two things come from Numba's internals, as no public API gives them:
the loaded kernel's handle (``_codelibrary.get_cufunc()``) and that ABI;
``tests/test_gpu.py::test_gpu_packed_arguments_match_numba`` compares the packed bytes
with what Numba's own dispatcher passes, so that an upgrade that changes either fails a test.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import inspect
import os
import struct
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numba import cuda

from xmoe.comm.device import SIMULATOR
from xmoe.device_memory import DeviceArray

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
else:
    from cuda.bindings import driver
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

#: For kernels that keep many values live: 64 registers a thread give two blocks of 512
#: threads per SM, not one (1x H100 under MPS, 4096 tokens: at 4 PEs cached dispatch 1344 us
#: against 1869 us without the cap; at 2 PEs combine 758 us uncapped, ~500 us capped).
#: The simulator's jit takes no such option.
CAPPED_REGISTERS: dict = {} if SIMULATOR else {"max_registers": 64}


@lru_cache(maxsize=None)
def parameters(kernel: Any) -> tuple[str, ...]:
    """The names of ``kernel``'s parameters, in order: its one declaration."""
    return tuple(inspect.signature(kernel.py_func).parameters)


def ordered(kernel: Any, args: dict[str, Any]) -> tuple:
    """``args`` (name -> value) in the order of ``kernel``'s parameters; ``TypeError`` naming any
    parameter missing or unknown."""
    names = parameters(kernel)
    if len(args) != len(names) or any(name not in args for name in names):
        missing = [name for name in names if name not in args]
        unknown = [name for name in args if name not in names]
        raise TypeError(f"{kernel.py_func.__name__}: missing arguments {missing}, unknown arguments {unknown}")
    return tuple(args[name] for name in names)


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
#: Numba's ABI of an array of each rank: meminfo, parent, size, itemsize, data, shape, strides.
_ARRAY = {ndim: struct.Struct(f"{5 + 2 * ndim}q") for ndim in range(8)}


def _pack(value: Any, parts: list) -> Any:
    """Append ``value`` in Numba's kernel ABI (8 bytes a parameter) to ``parts``; return its
    signature: what decides the compiled kernel (dtype, rank and contiguity of arrays, whether a
    strided one is empty, tuple structure)."""
    kind = type(value)
    if kind is int or isinstance(value, np.integer):
        parts.append(_INT.pack(value))
        return "i"
    if kind is tuple:
        return tuple(_pack(item, parts) for item in value)
    parts.append(_ARRAY[value.ndim].pack(*_abi(value)))  # a DeviceArray or a CuPy array
    return _array_signature(value)


def _array_signature(array: Any) -> tuple:
    """What of an array decides the compiled kernel: dtype, rank, C-contiguity, and whether a
    strided array is empty. Numba may type an empty strided view 'C' (an empty array counts as
    contiguous), and code compiled so indexes a later, non-empty view of the same signature by
    its shape, ignoring its strides (measured on the H200: a dispatch with top-k after one
    without wrote its top-k weights over the rows of another source)."""
    contiguous = _c_contiguous(array)
    return (array.dtype.char, array.ndim, contiguous, not contiguous and array.size == 0)


def _c_contiguous(array: Any) -> bool:
    return array.c_contiguous if type(array) is DeviceArray else array.flags.c_contiguous


def _abi(array: Any) -> tuple[int, ...]:
    """A :class:`DeviceArray` or CuPy array in Numba's kernel ABI (see ``_ARRAY``)."""
    if type(array) is DeviceArray:
        return array.abi()
    return (0, 0, array.size, array.itemsize, array.data.ptr, *array.shape, *array.strides)


def pack(args: tuple) -> tuple[tuple, list[bytes]]:
    """The signature of ``args`` (see :func:`_pack`) and each of them packed in Numba's ABI."""
    packed: list[bytes] = []
    signature = []
    for arg in args:
        parts: list = []
        signature.append(_pack(arg, parts))
        packed.append(b"".join(parts))
    return tuple(signature), packed


def _ranks_on_device() -> int:
    from xmoe import runtime

    return runtime.get_group().ranks_on_device if runtime.is_initialized() else 1


def check_driver(result: Any, what: str) -> Any:
    """The values after ``result``'s error code (a ``cuda.bindings`` call's tuple); RuntimeError on failure."""
    if result[0] != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{what} failed: {result[0]!r}")
    return result[1] if len(result) == 2 else result[1:]


#: ``cuLaunchKernel``'s ``extra`` keys: the parameter buffer, its size, the end of the list.
_PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE, _PARAM_END = 1, 2, 0


class ParameterBuffer:
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

    def launch(self, function: Any, blocks: int, threads: int, stream: int) -> None:
        result = driver.cuLaunchKernel(function, blocks, 1, 1, threads, 1, 1, 0, stream, 0, self.extra_address)
        if result[0] != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuLaunchKernel failed ({result[0]!r}) for {blocks} x {threads} threads")


#: Held (``flock``) while a process compiles a kernel that Numba caches on disk; one per user and machine.
COMPILE_LOCK = os.path.join(tempfile.gettempdir(), f"xmoe-numba-cache-{os.getuid()}.lock")


def compile_cached(kernel: Any, signature: tuple) -> Any:
    """``kernel.compile(signature)`` (a Numba CUDA dispatcher), loaded from Numba's disk cache or
    compiled and saved there, holding :data:`COMPILE_LOCK` when the kernel caches. Numba's
    cache is not safe across processes: two that save different signatures of one kernel at
    once both take its first free data file, and the index can end up pointing one signature
    at the other's code (``IndexDataCacheFile.save``), which a later process then runs."""
    from numba.cuda.core.caching import NullCache

    if isinstance(kernel._cache, NullCache):
        return kernel.compile(signature)
    with open(COMPILE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        _forget_if_stale(kernel)
        return kernel.compile(signature)


@lru_cache(maxsize=1)
def device_sources_hash() -> str:
    """sha256 of xmoe's device-side sources (``comm/``, ``kernels/``, ``layout/``)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for folder in ("comm", "kernels", "layout") for p in (root / folder).rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _forget_if_stale(kernel: Any) -> None:
    """Empty ``kernel``'s cache index when xmoe's device sources changed since it was filled:
    Numba's key covers the kernel's own file and closure, not the module-level device
    functions it calls from other files (``comm/protocol.py``'s ``claim``, say), so an edit
    there would otherwise leave the old code in the cache. The stamp lies beside the index."""
    func = kernel.py_func
    folder = Path(kernel._cache.cache_path)
    stamp = folder / f"{func.__qualname__}-{func.__code__.co_firstlineno}.xmoe-sources"
    current = device_sources_hash()
    if not stamp.exists() or stamp.read_text() != current:
        folder.mkdir(parents=True, exist_ok=True)
        kernel._cache.flush()
        stamp.write_text(current)


class _Compiled:
    """A kernel compiled for one signature and loaded on the current GPU."""

    def __init__(self, kernel: Any, args: tuple, num_bytes: int) -> None:
        signature = tuple(kernel.typeof_pyval(kernel_arg(a)) for a in args)
        compiled = compile_cached(kernel, signature)
        compiled.bind()  # loads it here, running the setup of linked device libraries (NVSHMEM's)
        handle = compiled._codelibrary.get_cufunc().handle
        self.function = driver.CUfunction(handle.value if isinstance(handle, ctypes.c_void_p) else int(handle))
        self.num_bytes = num_bytes
        self._spinning: dict[int, int] = {}

    def spinning_blocks(self, threads: int) -> int:
        """:func:`spinning_blocks` of this kernel (remembered per block size)."""
        blocks = self._spinning.get(threads)
        if blocks is None:
            blocks = self._spinning[threads] = spinning_blocks(self.function, threads)
        return blocks


def spinning_blocks(function: Any, threads: int) -> int:
    """The most blocks of ``threads`` of ``function`` (a ``CUfunction``) that this process lets
    spin on the GPU at once: the occupancy API's blocks per SM times the SMs it may use,
    divided among the ranks that share the GPU (one rank's spinning blocks must leave room
    for the blocks another's progress needs). Under MPS with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``
    the driver reports this process's share of the SMs already."""
    per_sm = check_driver(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(function, threads, 0),
                          "cuOccupancyMaxActiveBlocksPerMultiprocessor")
    if per_sm < 1:
        raise RuntimeError(f"the kernel does not fit {threads} threads a block on this GPU")
    blocks = per_sm * cuda.get_current_device().MULTIPROCESSOR_COUNT
    if not os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
        blocks = max(blocks // _ranks_on_device(), 1)
    return blocks


_compiled: dict[tuple, _Compiled] = {}


def _packed(kernel: Any, blocks: int, threads: int, args: tuple, spins: bool) -> tuple[_Compiled, int, list[bytes]]:
    """The compiled kernel for ``args``' signature, the grid to launch, and each of ``args`` packed."""
    signature, packed = pack(args)
    key = (kernel, signature)
    compiled = _compiled.get(key)
    if compiled is None:
        compiled = _compiled[key] = _Compiled(kernel, args, sum(len(arg) for arg in packed))
    if spins:
        blocks = min(blocks, compiled.spinning_blocks(threads))
    return compiled, blocks, packed


def launch(kernel: Any, blocks: int, threads: int, stream: int = 0, spins: bool = False, **args: Any) -> None:
    """Launch ``kernel`` on ``blocks`` x ``threads`` with ``args`` (by name, arrays by reference)
    on ``stream`` (a pointer).

    ``spins``: the kernel's blocks wait for peers; where ranks share the GPU the grid is cut
    to :meth:`_Compiled.spinning_blocks` (the kernel must finish with any number of its
    blocks on the GPU: xmoe's take their work as they come).
    """
    Prepared(kernel, blocks, threads, args, (), spins)(stream)


class Prepared:
    """A launch of ``kernel`` with ``args`` (name -> value) fixed but for those named in
    ``per_call`` (ints, and arrays of the signature prepared, else ``TypeError``);
    ``prepared(stream, name=value, ...)`` launches it with those values. The caller keeps one
    per call site and argument set.

    GPU: every parameter is packed once; a call repacks only the per-call arguments and
    calls the driver. Simulator: the values are put in place and the kernel launched as usual.
    """

    def __init__(self, kernel: Any, blocks: int, threads: int, args: dict[str, Any], per_call: tuple[str, ...],
                 spins: bool = False) -> None:
        values = ordered(kernel, args)
        names = parameters(kernel)
        unknown = [name for name in per_call if name not in names]
        if unknown:
            raise TypeError(f"{kernel.py_func.__name__}: per-call arguments {unknown} are not parameters")
        self.kernel, self.spins, self.per_call = kernel, spins, frozenset(per_call)
        self.blocks, self.threads = max(int(blocks), 1), int(threads)
        if SIMULATOR:
            self.args = dict(args)
            return
        compiled, self.blocks, packed = _packed(kernel, self.blocks, self.threads, values, spins)
        # The packed bytes hold raw pointers: the launch owns the arrays behind them, or a
        # scratch array made for it alone would be freed and its memory handed to another
        # (seen on the H200: a low-latency dispatch's count scratch, freed, became the next
        # combine's call-shape words, which the dispatch then overwrote with its counts).
        self._held = tuple(value for name, value in zip(names, values) if name not in per_call)
        self.slots: dict[str, tuple[int, Any]] = {}  # name -> byte offset, how to pack (None: an int)
        offset = 0
        for name, arg, arg_bytes in zip(names, values, packed):
            if name in per_call:
                is_int = type(arg) is int or isinstance(arg, np.integer)
                self.slots[name] = (offset, None, None) if is_int else (offset, _ARRAY[len(arg.shape)],
                                                                         _array_signature(arg))
            offset += len(arg_bytes)
        self.function = compiled.function
        self.parameters = ParameterBuffer(compiled.num_bytes)
        ctypes.memmove(self.parameters.values_address, b"".join(packed), compiled.num_bytes)

    def __call__(self, stream: int, **values: Any) -> None:
        if len(values) != len(self.per_call) or not self.per_call.issuperset(values):
            raise TypeError(f"this launch takes the per-call arguments {sorted(self.per_call)}, got {sorted(values)}")
        if SIMULATOR:
            args = dict(self.args, **values)
            self.kernel[self.blocks, self.threads](*(kernel_arg(a) for a in ordered(self.kernel, args)))
            return
        parameters = self.parameters
        for name, value in values.items():
            offset, array, signature = self.slots[name]
            if array is None:
                _INT.pack_into(parameters.values, offset, value)
            else:
                if _array_signature(value) != signature:  # the compiled kernel would misread it
                    raise TypeError(f"{name}: prepared for arrays of {signature}, got {_array_signature(value)}")
                array.pack_into(parameters.values, offset, *_abi(value))
        parameters.launch(self.function, self.blocks, self.threads, stream)
