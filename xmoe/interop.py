"""DLPack in and out: tensors enter as arrays the kernels use and leave as the caller's type.

NumPy in, NumPy out; PyTorch in, PyTorch out; JAX and CuPy likewise. bfloat16 has no
DLPack code that NumPy understands, so it crosses as its 16-bit pattern and is viewed
as ``ml_dtypes.bfloat16`` on this side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class Origin:
    """Which framework a tensor came from, so that results go back as that type."""

    framework: str  # "numpy", "torch", "jax" or "cupy"


def framework_of(value: Any) -> str:
    module = type(value).__module__.split(".")[0]
    if module in ("jaxlib", "jax"):
        return "jax"
    if module in ("numpy", "torch", "cupy"):
        return module
    raise ValueError(f"unsupported tensor type {type(value).__module__}.{type(value).__name__}: pass a NumPy, PyTorch, JAX or CuPy array")


def _torch_to_numpy(value: Any) -> np.ndarray:
    import torch

    if value.is_cuda:
        raise ValueError("a CUDA tensor was passed to the CPU simulation backend")
    if value.dtype == torch.bfloat16:
        return np.from_dlpack(value.detach().contiguous().view(torch.int16)).view(BFLOAT16)
    return np.from_dlpack(value.detach().contiguous())


def as_array(value: Any, name: str) -> tuple[np.ndarray, Origin]:
    """``value`` as a NumPy array (zero-copy where the framework allows) and its origin."""
    if value is None:
        raise ValueError(f"{name}: expected a tensor, got None")
    framework = framework_of(value)
    if framework == "numpy":
        array = value
    elif framework == "torch":
        array = _torch_to_numpy(value)
    elif framework == "jax":
        array = np.asarray(value)
    else:
        raise ValueError(f"{name}: a CuPy array was passed to the CPU simulation backend")
    return np.ascontiguousarray(array), Origin(framework)


def to_origin(array: np.ndarray | None, origin: Origin) -> Any:
    """``array`` as the framework ``origin`` names (None stays None)."""
    if array is None or origin.framework == "numpy":
        return array
    if origin.framework == "torch":
        import torch

        if array.dtype == BFLOAT16:
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    if origin.framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(array)
    raise ValueError(f"cannot return an array to {origin.framework}")
