"""Grouped GEMM: ``out[rows of g] = epilogue(a[rows of g] @ w[g]^T)`` for the experts of a layer.

The rows of one group (expert) are contiguous, as dispatch delivers them; ``offs`` holds
each group's cumulative end row, as for ``torch._grouped_mm``. On the GPU the kernel is
generated from Python (``wgmma.py`` on sm_90, ``mma.py`` elsewhere and for "kn" weights)
and its tile shape chosen per shape by :mod:`autotune`; on the simulator backend the NumPy
reference runs.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from xmoe import reference
from xmoe.event import current_stream
from xmoe.device_memory import on_gpu, xp
from xmoe.interop import as_array, new_output
from xmoe.kernels.gemm import mma, wgmma
from xmoe.kernels.gemm.autotune import Autotuner, row_bucket, shape_key
from xmoe.kernels.gemm.spec import GemmConfig, GemmVariant, KernelSource
from xmoe.kernels.gemm.tma import tensor_map

__all__ = ["GemmConfig", "GemmVariant", "Problem", "candidates", "gemm_into", "grouped_gemm"]

_AUTOTUNER = Autotuner()
_MAX_STAGES = 8
_PREFIX_RESERVE = 4096  # bytes of shared memory left for the per-group tile table (1023 groups)


class Problem(NamedTuple):
    """One call's arrays (backend arrays) and sizes."""

    a: Any
    w: Any
    out: Any
    offs: Any
    row_weights: Any
    rows: int
    n: int
    k: int
    groups: int


def _wgmma_config(block_n: int, cluster_m: int, variant: GemmVariant) -> GemmConfig:
    stage = 128 * (128 + variant.b_subtiles * block_n) + 16
    room = wgmma.SMEM_LIMIT - 1024 - _PREFIX_RESERVE - wgmma.staging_bytes(block_n, variant)
    return GemmConfig("wgmma", 128, block_n, 64, min(_MAX_STAGES, room // stage), cluster_m=cluster_m)


@lru_cache(maxsize=None)
def candidates(variant: GemmVariant, compute_capability: int) -> tuple[GemmConfig, ...]:
    """The tile configurations the autotuner times for ``variant`` on a device, best guess first."""
    if compute_capability == 90 and variant.b_layout == "nk":
        widths = (128, 64) if variant.b_subtiles == 2 else (256, 128, 192) if variant.out_dtype == "bf16" else (128,)
        return tuple(_wgmma_config(n, cluster, variant) for n in widths for cluster in (2, 1))
    if variant.b_subtiles == 1:
        return (GemmConfig("mma", 128, 128, 32, 4, 2, 4), GemmConfig("mma", 64, 128, 32, 4, 2, 4),
                GemmConfig("mma", 64, 64, 32, 4, 2, 2))
    return (GemmConfig("mma", 128, 64, 32, 4, 2, 4), GemmConfig("mma", 64, 64, 32, 4, 2, 4))


@lru_cache(maxsize=None)
def kernel_source(config: GemmConfig, variant: GemmVariant) -> KernelSource:
    """The generated CUDA C of one configuration of ``variant``."""
    return (wgmma if config.kernel == "wgmma" else mma).generate(config, variant)


@lru_cache(maxsize=None)
def _prepared(config: GemmConfig, variant: GemmVariant, device_index: int) -> tuple[Any, KernelSource, Any]:
    """(compiled kernel, its source, the device) for one config on one device."""
    from xmoe.kernels.build import compile_kernel, device

    target = device(device_index)
    source = kernel_source(config, variant)
    arch = source.arch if source.arch == "sm_90a" else f"sm_{target.compute_capability}"
    return compile_kernel(source.code, source.entry, arch), source, target


def _launch(config: GemmConfig, variant: GemmVariant, problem: Problem, stream: Any) -> None:
    import cupy

    kernel, source, device = _prepared(config, variant, cupy.cuda.runtime.getDevice())
    smem = source.smem_bytes(problem.groups)
    if smem > device.max_smem_per_block:
        raise ValueError(f"offs: {problem.groups} groups need {smem} bytes of shared memory, more than the "
                         f"{device.max_smem_per_block} a block gets")
    rows_per_unit = config.block_m * config.cluster_m
    ctas = (-(-problem.rows // rows_per_unit) + problem.groups) * -(-problem.n // config.block_n) * config.cluster_m
    per_sm = 1 if smem > device.max_smem_per_block // 2 else 2
    grid = min(ctas, device.multiprocessors * per_sm)
    grid -= grid % config.cluster_m
    if config.kernel == "wgmma":
        a_map = tensor_map(problem.a.data.ptr, (problem.k, problem.rows), (config.block_k, config.block_m))
        b_map = tensor_map(problem.w.data.ptr, (problem.k, problem.w.shape[1], problem.groups),
                           (config.block_k, config.block_n // config.cluster_m, 1))
        operands: tuple = (a_map, b_map)
    else:
        operands = (problem.a, problem.w)
    args = operands + (problem.out, problem.offs, np.int32(problem.groups), np.int32(problem.rows),
                       np.int32(problem.n), np.int32(problem.k))
    if problem.row_weights is not None:
        args += (problem.row_weights,)
    with stream:
        kernel((grid,), (source.threads,), args, shared_mem=smem)


def _checked(a: Any, w: Any, offs: Any, epilogue: str, row_weights: Any, w_layout: str, out_dtype: str) -> tuple:
    """The arguments of :func:`grouped_gemm` as backend arrays and sizes, checked."""
    if epilogue not in ("none", "swiglu"):
        raise ValueError(f"epilogue={epilogue!r}: expected 'none' or 'swiglu'")
    if w_layout not in ("nk", "kn"):
        raise ValueError(f"w_layout={w_layout!r}: expected 'nk' ([groups, N, K]) or 'kn' ([groups, K, N])")
    if out_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"out_dtype={out_dtype!r}: expected 'bfloat16' or 'float32'")
    if row_weights is not None and epilogue == "swiglu":
        raise ValueError("row_weights: the row-weight epilogue belongs to the down projection, not to SwiGLU")
    a_array, origin = as_array(a, "a")
    w_array, w_origin = as_array(w, "w")
    for name, array, arr_origin, rank in (("a", a_array, origin, 2), ("w", w_array, w_origin, 3)):
        if arr_origin.dtype != "bfloat16":
            raise ValueError(f"{name}: expected bfloat16, got {arr_origin.dtype}")
        if array.ndim != rank:
            raise ValueError(f"{name}: expected {rank} dimensions, got shape {tuple(array.shape)}")
    rows, k = a_array.shape
    groups = w_array.shape[0]
    w_k, w_n = (w_array.shape[2], w_array.shape[1]) if w_layout == "nk" else w_array.shape[1:]
    if w_k != k:
        raise ValueError(f"w: K is {w_k} ({w_layout} layout, shape {tuple(w_array.shape)}), a has K={k}")
    if epilogue == "swiglu" and w_n % 2:
        raise ValueError(f"w: SwiGLU needs gate and up rows, an even N, got {w_n}")
    n = w_n // 2 if epilogue == "swiglu" else w_n
    if k == 0 or n == 0 or k % 8 or n % 8:
        raise ValueError(f"w: K={k} and N={n} must be positive multiples of 8 (16-byte rows)")
    offs_array = _offsets(offs, groups)
    weights_array = None
    if row_weights is not None:
        weights_array, weights_origin = as_array(row_weights, "row_weights")
        if weights_origin.dtype != "float32" or weights_array.shape != (rows,):
            raise ValueError(f"row_weights: expected float32 [{rows}], got {weights_origin.dtype} "
                             f"{tuple(weights_array.shape)}")
    variant = GemmVariant("row_scale" if row_weights is not None else epilogue, w_layout,
                          "bf16" if out_dtype == "bfloat16" else "f32")
    return a_array, w_array, offs_array, weights_array, origin, variant, rows, n, k, groups


def _offsets(offs: Any, groups: int) -> Any:
    if isinstance(offs, (list, tuple)):
        offs = xp().asarray(np.asarray(offs, dtype=np.int32))
    array, origin = as_array(offs, "offs")
    if origin.dtype != "int32" or array.shape != (groups,):
        raise ValueError(f"offs: expected int32 [{groups}] (one cumulative end row per group of w), got "
                         f"{origin.dtype} {tuple(array.shape)}")
    return array


def grouped_gemm(
    a: Any,
    w: Any,
    offs: Any,
    *,
    epilogue: str = "none",
    row_weights: Any = None,
    w_layout: str = "nk",
    out_dtype: str = "bfloat16",
    config: GemmConfig | None = None,
) -> Any:
    """Grouped matrix product with an optional fused epilogue (bf16 in, fp32 accumulation).

    Args:
        a: bfloat16 ``[M, K]``; rows ``offs[g-1]:offs[g]`` (from 0 for g = 0) belong to group g.
        w: bfloat16 weights ``[G, N_w, K]`` (``w_layout="nk"``, ``nn.Linear``'s and vLLM's
            ``w1``/``w2`` layout) or ``[G, K, N_w]`` ("kn"). With SwiGLU, ``N_w = 2 N``: the gate
            rows, then the up rows.
        offs: int32 ``[G]`` (device array, or a host list), the cumulative end row of each group,
            as ``torch._grouped_mm`` takes it; empty groups repeat the previous end.
        epilogue: "none", or "swiglu": ``out = silu(a @ gate^T) * (a @ up^T)``.
        row_weights: float32 ``[M]``, multiplied into each output row (the top-k weight of a
            down projection), or None.
        w_layout: "nk" or "kn", see ``w``.
        out_dtype: "bfloat16" or "float32".
        config: a tile configuration to use (one of :func:`candidates`), or None to let the
            autotuner choose (GPU only; ignored by the simulator).

    Returns:
        ``[M, N]`` of ``out_dtype``, the caller's tensor type. Rows at or past ``offs[-1]``
        are not written.

    K and N must be multiples of 8; ``offs`` must be non-decreasing (rows past M are cut).
    """
    a_array, w_array, offs_array, weights_array, origin, variant, rows, n, k, groups = _checked(
        a, w, offs, epilogue, row_weights, w_layout, out_dtype)
    bf16_out = variant.out_dtype == "bf16"
    out, finish = new_output((rows, n), np.uint16 if bf16_out else np.float32, origin,
                              "bfloat16" if bf16_out else None)
    problem = Problem(a_array, w_array, out, offs_array, weights_array, rows, n, k, groups)
    gemm_into(problem, variant, current_stream(origin.framework) if on_gpu() else None, config)
    return finish()


def gemm_into(problem: Problem, variant: GemmVariant, stream: Any, config: GemmConfig | None = None) -> None:
    """The grouped GEMM on checked backend arrays (``problem.out`` written), on ``stream``.

    For callers inside xmoe that already hold backend arrays (the router); the public entry
    is :func:`grouped_gemm`.
    """
    if not on_gpu():
        _reference_into(problem, variant)
    elif problem.rows and problem.groups:
        _launch(config or _choose(variant, problem, stream), variant, problem, stream)


_CHOSEN: dict[tuple, GemmConfig] = {}


def _choose(variant: GemmVariant, problem: Problem, stream: Any) -> GemmConfig:
    """The autotuner's config for this shape (remembered in-process: this is on every call's path)."""
    import cupy

    device_index = cupy.cuda.runtime.getDevice()
    memo = (variant, row_bucket(problem.rows), problem.n, problem.k, problem.groups, device_index)
    if memo in _CHOSEN:
        return _CHOSEN[memo]
    from xmoe.kernels.build import device

    target = device(device_index)

    def time_ms(config: GemmConfig, runs: int) -> float:
        _launch(config, variant, problem, stream)  # compiles, warms up
        start = stream.record()
        for _ in range(runs):
            _launch(config, variant, problem, stream)
        end = stream.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / runs

    key = shape_key(target.name, variant.name, problem.rows, problem.n, problem.k, problem.groups)
    _CHOSEN[memo] = _AUTOTUNER.choose(key, candidates(variant, target.compute_capability), time_ms)
    return _CHOSEN[memo]


def _reference_into(problem: Problem, variant: GemmVariant) -> None:
    """The simulator's path: the NumPy reference, rounded to the output dtype."""
    from xmoe.interop import BFLOAT16

    a, offs, out = problem.a, problem.offs, problem.out
    result = reference.grouped_gemm(a.view(BFLOAT16), problem.w.view(BFLOAT16), offs, variant.epilogue,
                                    problem.row_weights, variant.b_layout)
    end = int(np.clip(offs[-1], 0, a.shape[0])) if len(offs) else 0
    if variant.out_dtype == "bf16":
        out[:end] = result[:end].astype(BFLOAT16).view(np.uint16)
    else:
        out[:end] = result[:end]
