"""DLPack in and out: tensors enter as arrays the kernels use and leave as the caller's type.

NumPy in, NumPy out; PyTorch in, PyTorch out; JAX and CuPy likewise. Inside xmoe the
arrays are NumPy on the simulator and CuPy on the GPU (zero-copy views of the
caller's memory). bfloat16 and float8_e4m3fn have no type NumPy or CuPy compute with, so
they travel as their bit patterns (uint16, uint8: :data:`BIT_DTYPES`) and the
:class:`Origin` remembers what they were.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import ml_dtypes
import numpy as np

from xmoe.device_memory import DeviceArray, data_pointer, on_gpu, xp

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT8_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
#: Dtypes NumPy and CuPy do not compute with, carried as their bit patterns: name -> (the
#: storage dtype of the bits, the ml_dtypes dtype NumPy callers see).
BIT_DTYPES = {"bfloat16": (np.dtype(np.uint16), BFLOAT16), "float8_e4m3fn": (np.dtype(np.uint8), FLOAT8_E4M3)}


@dataclass(frozen=True)
class Origin:
    """Where a tensor came from: its framework, and its dtype's name as the caller sees it."""

    framework: str  # "numpy", "torch", "jax" or "cupy"
    dtype: str  # e.g. "float32", "bfloat16", "int64"


def to_host(array: Any) -> np.ndarray:
    """A NumPy copy (or the array itself, on the simulator)."""
    return array.get() if hasattr(array, "get") and not isinstance(array, np.ndarray) else array


@lru_cache(maxsize=None)
def dtype_name(dtype: Any) -> str:
    """``np.dtype(dtype).name`` (cached: it builds the name in Python every time)."""
    return np.dtype(dtype).name


def framework_of(value: Any) -> str:
    module = type(value).__module__.split(".")[0]
    if module in ("jaxlib", "jax"):
        return "jax"
    if module in ("numpy", "torch", "cupy"):
        return module
    raise ValueError(f"unsupported tensor type {type(value).__module__}.{type(value).__name__}: "
                     "pass a NumPy, PyTorch, JAX or CuPy array")


@lru_cache(maxsize=1)
def _torch_dtypes() -> dict[Any, np.dtype]:
    """PyTorch dtype -> the NumPy dtype of its storage here (bfloat16 as uint16 bits)."""
    import torch

    return {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
            torch.float16: np.dtype(np.float16), torch.bfloat16: np.dtype(np.uint16),
            torch.int64: np.dtype(np.int64), torch.int32: np.dtype(np.int32), torch.int16: np.dtype(np.int16),
            torch.int8: np.dtype(np.int8), torch.uint8: np.dtype(np.uint8), torch.bool: np.dtype(np.bool_),
            torch.float8_e4m3fn: np.dtype(np.uint8)}


@lru_cache(maxsize=1)
def _storage_to_torch() -> dict[np.dtype, Any]:
    """The inverse of :func:`_torch_dtypes` for every dtype not carried as bits (:data:`BIT_DTYPES`)."""
    return {storage: dtype for dtype, storage in _torch_dtypes().items() if _torch_names()[dtype] not in BIT_DTYPES}


def _raw_view(tensor: Any, dtype: np.dtype) -> DeviceArray:
    """A :class:`DeviceArray` over a contiguous CUDA tensor's memory, keeping the tensor alive."""
    return DeviceArray(tensor.data_ptr(), tuple(tensor.shape), dtype, tensor)


def _cupy_view(tensor: Any, dtype: np.dtype) -> Any:
    """A CuPy array over a contiguous CUDA tensor's memory, keeping the tensor alive.

    Cheaper than DLPack (no capsule, no stream hand-shake): the kernels run on the
    tensor's own current stream anyway.
    """
    import cupy

    shape = tuple(tensor.shape)
    if tensor.numel() == 0:
        return cupy.empty(shape, dtype)
    memory = cupy.cuda.UnownedMemory(tensor.data_ptr(), tensor.numel() * tensor.element_size(), tensor,
                                     tensor.device.index)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))


@lru_cache(maxsize=1)
def _torch_names() -> dict[Any, str]:
    """PyTorch dtype -> its name as :class:`Origin` holds it ("bfloat16", "int64", ...)."""
    import torch

    dtypes = [value for value in vars(torch).values() if isinstance(value, torch.dtype)]
    return {dtype: str(dtype).removeprefix("torch.") for dtype in dtypes}


def _from_torch(value: Any, name: str, raw: bool) -> tuple[Any, str]:
    import torch

    if value.is_cuda != on_gpu():
        where = "a CUDA tensor to the CPU simulation backend" if value.is_cuda else "a CPU tensor to the cuda backend"
        raise ValueError(f"{name}: {where}")
    dtype = _torch_names()[value.dtype]
    storage = _torch_dtypes().get(value.dtype)
    if on_gpu() and storage is not None:
        if not value.is_contiguous():
            value = value.detach().contiguous()
        return (_raw_view(value, storage) if raw else _cupy_view(value.detach(), storage)), dtype
    value = value.detach()
    bits = BIT_DTYPES.get(dtype)
    if bits is not None:  # DLPack takes integers of the same size
        value = value.view(torch.int16 if bits[0].itemsize == 2 else torch.uint8)
    value = value.contiguous()
    array = xp().from_dlpack(value) if on_gpu() else np.from_dlpack(value)
    return (array.view(bits[0]) if bits is not None else array), dtype


def _from_jax(value: Any, name: str) -> tuple[Any, str]:
    dtype = str(value.dtype)
    bits = BIT_DTYPES.get(dtype)
    if on_gpu():
        import jax

        if bits is not None:
            value = jax.lax.bitcast_convert_type(value, bits[0])
        return xp().from_dlpack(value), dtype
    array = np.asarray(value)
    return (array.view(bits[0]) if bits is not None else array), dtype


def as_array(value: Any, name: str, raw: bool = False) -> tuple[Any, Origin]:
    """``value`` as a C-contiguous backend array (zero-copy where possible) and its origin.

    A bfloat16 (float8_e4m3fn) tensor comes back as a uint16 (uint8) view of its bits with
    ``Origin.dtype`` naming it.
    ``raw``: a CUDA PyTorch tensor comes back as a :class:`DeviceArray` (for the Numba kernels'
    launch path) instead of a CuPy array.
    """
    if value is None:
        raise ValueError(f"{name}: expected a tensor, got None")
    framework = framework_of(value)
    if framework == "torch":
        array, dtype = _from_torch(value, name, raw)
    elif framework == "jax":
        array, dtype = _from_jax(value, name)
    elif framework == "cupy":
        if not on_gpu():
            raise ValueError(f"{name}: a CuPy array was passed to the CPU simulation backend")
        array, dtype = value, dtype_name(value.dtype)
    else:
        if on_gpu():
            raise ValueError(f"{name}: a NumPy array was passed to the cuda backend; pass a device tensor")
        array, dtype = value, dtype_name(value.dtype)
        if dtype in BIT_DTYPES:
            array = value.view(BIT_DTYPES[dtype][0])
    if type(array) is not DeviceArray and not array.flags.c_contiguous:
        array = xp().ascontiguousarray(array)
    return array, _origin(framework, dtype)


@lru_cache(maxsize=None)
def _origin(framework: str, dtype: str) -> Origin:
    """One :class:`Origin` per value (frozen, so shared: building one costs ~1 us on every call's path)."""
    return Origin(framework, dtype)


def bits_of(origin: Origin) -> str | None:
    """The name of ``origin``'s dtype when xmoe carries it as bit patterns (:data:`BIT_DTYPES`), else None."""
    return origin.dtype if origin.dtype in BIT_DTYPES else None


def to_origin(array: Any, origin: Origin, bits: str | None = None) -> Any:
    """``array`` as the framework ``origin`` names; ``bits``: ``array`` holds the bit patterns of
    that dtype (a name of :data:`BIT_DTYPES`)."""
    if array is None:
        return None
    framework = origin.framework
    if framework == "numpy":
        return array.view(BIT_DTYPES[bits][1]) if bits else array
    if framework == "cupy":
        return array
    if framework == "torch":
        import torch

        if not bits:
            return torch.from_dlpack(array)
        signed = array.view(np.int16) if array.itemsize == 2 else array  # DLPack has no uint16
        return torch.from_dlpack(signed).view(getattr(torch, bits))
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        if on_gpu():
            result = jax.dlpack.from_dlpack(array)
            return jax.lax.bitcast_convert_type(result, getattr(jnp, bits)) if bits else result
        return jnp.asarray(array.view(BIT_DTYPES[bits][1]) if bits else array)
    raise ValueError(f"cannot return an array to {framework}")


@lru_cache(maxsize=1)
def _poison() -> bool:
    """``XMOE_POISON=1`` in the environment at the first output (read once: it is on every call's path)."""
    return os.environ.get("XMOE_POISON") == "1"


#: The byte a poisoned output is filled with: -1.7e38 as float32 and bfloat16 (far outside any
#: tolerance), -16843010 as int32; not 0xFF, whose -1 is a value kernels write (padding, ids
#: of experts on other ranks), so an unwritten -1 would pass.
POISON_BYTE = 0xFE


def poisoned(array: Any, stream: int | None = None) -> Any:
    """``array`` filled with :data:`POISON_BYTE` under ``XMOE_POISON=1``, so that a test sees
    any element a kernel failed to write; untouched otherwise. ``stream``: the pointer of the
    CUDA stream whose kernels will write ``array`` (the fill is queued there, ordered before
    them); None: CuPy's current stream, or a synchronous memset for a :class:`DeviceArray`."""
    if _poison():
        if stream is not None and on_gpu():
            import cupy

            cupy.cuda.runtime.memsetAsync(data_pointer(array), POISON_BYTE, array.nbytes, stream)
        elif type(array) is DeviceArray:
            import cupy

            cupy.cuda.runtime.memset(array.ptr, POISON_BYTE, array.nbytes)
        else:
            array.view(np.uint8).fill(POISON_BYTE)
    return array


@lru_cache(maxsize=1)
def _current_cuda() -> Any:
    """``torch.device("cuda")`` (the current GPU), built once: parsing "cuda" costs a few us a call."""
    import torch

    return torch.device("cuda")


def new_output(shape: tuple[int, ...] | int, dtype: Any, origin: Origin, bits: str | None = None,
               raw: bool = False, stream: int | None = None) -> tuple[Any, Any]:
    """A fresh output: ``(array the kernels write, function returning it as the caller's type)``.

    For CUDA PyTorch callers the memory comes from PyTorch's allocator, so the result is
    a plain tensor with no conversion afterwards; ``bits``: ``dtype`` holds the bit patterns of
    that dtype (a name of :data:`BIT_DTYPES`, e.g. "bfloat16" in uint16);
    ``raw``: the kernels get a :class:`DeviceArray` of it, not a CuPy array.
    Poisoned under ``XMOE_POISON=1`` (:func:`poisoned`, on ``stream``: the pointer of the stream
    the kernels write it on, where that is not CuPy's current one), except while a CUDA graph is
    captured.
    """
    if origin.framework == "torch" and on_gpu():
        import torch

        dtype = np.dtype(dtype)
        tensor = torch.empty(shape, dtype=_torch_dtype(dtype, bits), device=_current_cuda())
        array = _raw_view(tensor, dtype) if raw else _cupy_view(tensor, dtype)
        return _poisoned_unless_captured(array, stream), lambda: tensor
    array = poisoned(xp().empty(shape, dtype), stream)
    return array, lambda: to_origin(array, origin, bits)


#: Byte alignment of each output :func:`new_outputs` carves out of its one allocation (the
#: CUDA C kernels' 16-byte vector accesses need 16; PyTorch's allocator gives 512).
OUTPUT_ALIGNMENT = 256


class OutputPlan:
    """Where each of several outputs lies in one allocation, worked out once per call shape.

    Args:
        specs: name -> (shape, storage dtype, bits) as :func:`new_output` takes them.
    """

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], Any, str | None]]) -> None:
        self.specs = specs
        #: name -> (first byte, shape, storage dtype, bits, C-contiguous strides in elements)
        self.places: dict[str, tuple[int, tuple[int, ...], np.dtype, str | None, tuple[int, ...]]] = {}
        total = 0
        for name, (shape, dtype, bits) in specs.items():
            dtype = np.dtype(dtype)
            strides = tuple(math.prod(shape[axis + 1:]) for axis in range(len(shape)))
            self.places[name] = (total, tuple(shape), dtype, bits, strides)
            total += -(-math.prod(shape) * dtype.itemsize // OUTPUT_ALIGNMENT) * OUTPUT_ALIGNMENT
        self.nbytes = max(total, OUTPUT_ALIGNMENT)


def new_outputs(plan: OutputPlan, origin: Origin, stream: int | None = None) -> tuple[dict[str, Any],
                                                                                   Callable[[], dict[str, Any]]]:
    """The outputs of ``plan``, fresh: ``(name -> array the kernels write, as :func:`new_output`
    gives it with ``raw=True``; function returning name -> the caller's tensor)``. For CUDA
    PyTorch callers they are views of one allocation (one allocator call for a call's outputs
    instead of one each, ~3.6 us of host time each on the H200 machine), which they then free
    together."""
    if not (origin.framework == "torch" and on_gpu()):
        made = {name: new_output(shape, dtype, origin, bits, raw=True, stream=stream)
                for name, (shape, dtype, bits) in plan.specs.items()}
        return {name: array for name, (array, _) in made.items()}, lambda: {name: out() for name, (_, out) in made.items()}
    import torch

    flat = torch.empty(plan.nbytes, dtype=torch.uint8, device=_current_cuda())
    _poisoned_unless_captured(_raw_view(flat, np.dtype(np.uint8)), stream)
    base = flat.data_ptr()
    arrays = {name: DeviceArray(base + first, shape, dtype, flat) for name, (first, shape, dtype, _, _) in plan.places.items()}

    def tensors() -> dict[str, Any]:
        typed: dict[Any, Any] = {}  # flat as each dtype, made once: as_strided then places each output
        out = {}
        for name, (first, shape, dtype, bits, strides) in plan.places.items():
            torch_dtype = _torch_dtype(dtype, bits)
            view = typed.get(torch_dtype)
            if view is None:
                view = typed[torch_dtype] = flat.view(torch_dtype)
            out[name] = view.as_strided(shape, strides, first // dtype.itemsize)
        return out

    return arrays, tensors


def _torch_dtype(dtype: np.dtype, bits: str | None) -> Any:
    """The PyTorch dtype of an output of storage ``dtype`` holding the bit patterns of ``bits`` (or not)."""
    import torch

    return getattr(torch, bits) if bits else _storage_to_torch()[dtype]


def _poisoned_unless_captured(array: Any, stream: int | None) -> Any:
    """:func:`poisoned`, except while PyTorch captures a CUDA graph on the current stream (a
    capture takes no synchronous memset, and a replay would poison only once)."""
    import torch

    return array if torch.cuda.is_current_stream_capturing() else poisoned(array, stream)
