"""Compiling generated CUDA C with CuPy (NVRTC), once per kernel and process.

CuPy keeps the compiled binaries in its disk cache (``~/.cupy/kernel_cache``), so a
kernel is compiled once per machine, not once per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class Device:
    """What the generated kernels are specialised or sized for."""

    name: str
    compute_capability: int  # 90 for sm_90
    multiprocessors: int
    max_smem_per_block: int  # bytes, after opting in


@lru_cache(maxsize=None)
def device(index: int) -> Device:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(index)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return Device(name, props["major"] * 10 + props["minor"], props["multiProcessorCount"],
                  props["sharedMemPerBlockOptin"])


def current_device() -> Device:
    import cupy

    return device(cupy.cuda.runtime.getDevice())


#: Warps a block of the kernels that give each row a warp (the router's selection, the pair layout).
WARPS_PER_BLOCK = 8
#: Blocks an SM of those kernels at most: they loop over their rows.
BLOCKS_PER_SM = 8


def warp_per_row_launch(num_rows: int) -> tuple[tuple[int], tuple[int]]:
    """``(grid, block)`` of a kernel whose warps take rows in a grid-stride loop: enough blocks for
    a warp a row, at most :data:`BLOCKS_PER_SM` an SM, at least one."""
    blocks = min(-(-num_rows // WARPS_PER_BLOCK), BLOCKS_PER_SM * current_device().multiprocessors)
    return (max(1, blocks),), (32 * WARPS_PER_BLOCK,)


@lru_cache(maxsize=None)
def compile_kernel(code: str, entry: str, arch: str) -> Any:
    """The CuPy ``RawKernel`` ``entry`` (a C or C++ name) of ``code`` built for ``arch`` (e.g. "sm_90a"), allowed
    as much dynamic shared memory as the current device gives a block beside its static one."""
    import cupy

    # a C++ name (with "::") is looked up through NVRTC's name expressions, unmangled names directly
    names = (entry,) if "::" in entry else None
    module = cupy.RawModule(code=code, options=("-std=c++17", f"-arch={arch}"), name_expressions=names)
    kernel = module.get_function(entry)
    kernel.max_dynamic_shared_size_bytes = current_device().max_smem_per_block - kernel.shared_size_bytes
    return kernel
