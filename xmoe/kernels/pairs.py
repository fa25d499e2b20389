"""(row, expert) pairs laid out expert by expert for the grouped GEMMs, and summed back per row.

A row routed to k experts is k pairs. ``gather_pairs`` copies each pair's row to its expert's
part of one array (expert 0's pairs first: the grouped GEMM's ``offs`` layout) with the pair's
weight, and records where each (row, slot) went; ``sum_pairs`` adds each row's pair outputs
back together in float32 (plus an optional float32 term, the shared experts) and rounds to
bfloat16 once. On the GPU each is one generated kernel, a warp per row, 16-byte vectors; on
the simulator the NumPy reference (``reference.gather_pairs`` / ``reference.sum_pairs``) runs.

Within an expert the GPU orders pairs by atomic arrival (the reference: by row); every pair's
own result does not depend on its place, so neither does a row's sum.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from xmoe import reference
from xmoe.device_memory import on_gpu, xp
from xmoe.interop import poisoned
from xmoe.kernels.build import warp_per_row_launch
from xmoe.kernels.cuda_c import PRELUDE

_SOURCE = r"""
// Warp 0 of every block: start[g] = pairs of groups before g; block 0 also writes offs[g], the
// cumulative end of group g.
__device__ void group_starts(const int* counts, int groups, int* start, int* offs) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int carry = 0;
    for (int base = 0; base < groups; base += 32) {
      const int g = base + lane;
      const int count = g < groups ? counts[g] : 0;
      int inclusive = count;
      #pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += up;
      }
      if (g < groups) {
        start[g] = carry + inclusive - count;
        if (blockIdx.x == 0) offs[g] = carry + inclusive;
      }
      carry += __shfl_sync(0xffffffffu, inclusive, 31);
    }
  }
  __syncthreads();
}

// A warp per row: lane j < TOPK claims slot j's place in its expert (fill[e] counts arrivals),
// then the warp copies the row to each of its places. A slot whose expert is -1 (or outside
// [0, groups), or past counts[e]: counts that do not match topk_idx) gets no place.
extern "C" __global__ void gather_pairs(const uint4* __restrict__ rows, const long long* __restrict__ topk_idx,
                                        const float* __restrict__ topk_weights, const int* __restrict__ counts,
                                        int* __restrict__ fill, uint4* __restrict__ pair_rows,
                                        float* __restrict__ pair_weights, int* __restrict__ slot,
                                        int* __restrict__ row_of, int* __restrict__ offs, int num_rows, int groups,
                                        int vecs) {
  extern __shared__ int start[];
  group_starts(counts, groups, start, offs);
  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  for (int r = blockIdx.x * warps + threadIdx.x / 32; r < num_rows; r += gridDim.x * warps) {
    int place = -1;
    if (lane < TOPK) {
      const long long e = topk_idx[(size_t)r * TOPK + lane];
      if (e >= 0 && e < groups) {
        const int arrival = atomicAdd(fill + e, 1);
        if (arrival < counts[e]) place = start[e] + arrival;
      }
      slot[(size_t)r * TOPK + lane] = place;
      if (place >= 0) {
        pair_weights[place] = topk_weights[(size_t)r * TOPK + lane];
        row_of[place] = r;
      }
    }
    int places[TOPK];
    #pragma unroll
    for (int j = 0; j < TOPK; ++j) places[j] = __shfl_sync(0xffffffffu, place, j);
    const uint4* src = rows + (size_t)r * vecs;
    for (int v = lane; v < vecs; v += 32) {
      const uint4 value = __ldg(src + v);
      #pragma unroll
      for (int j = 0; j < TOPK; ++j)
        if (places[j] >= 0) pair_rows[(size_t)places[j] * vecs + v] = value;
    }
  }
}

// A warp per row: out[r] = bf16(sum over slots j with slot[r, j] >= 0 of pair_out[slot[r, j]]
// (+ extra[r])), each lane 8 channels (16 bytes) at a time.
extern "C" __global__ void sum_pairs(const uint4* __restrict__ pair_out, const int* __restrict__ slot,
                                     const float4* __restrict__ extra, uint4* __restrict__ out, int num_rows,
                                     int vecs) {
  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  for (int r = blockIdx.x * warps + threadIdx.x / 32; r < num_rows; r += gridDim.x * warps) {
    const int mine = lane < TOPK ? slot[(size_t)r * TOPK + lane] : -1;
    int places[TOPK];
    #pragma unroll
    for (int j = 0; j < TOPK; ++j) places[j] = __shfl_sync(0xffffffffu, mine, j);
    for (int v = lane; v < vecs; v += 32) {
      float acc[8];
      if (extra != nullptr) {
        const float4 lo = extra[((size_t)r * vecs + v) * 2], hi = extra[((size_t)r * vecs + v) * 2 + 1];
        acc[0] = lo.x; acc[1] = lo.y; acc[2] = lo.z; acc[3] = lo.w;
        acc[4] = hi.x; acc[5] = hi.y; acc[6] = hi.z; acc[7] = hi.w;
      } else {
        #pragma unroll
        for (int c = 0; c < 8; ++c) acc[c] = 0.0f;
      }
      #pragma unroll
      for (int j = 0; j < TOPK; ++j) {
        if (places[j] < 0) continue;
        float value[8];
        unpack8(__ldg(pair_out + (size_t)places[j] * vecs + v), value);
        #pragma unroll
        for (int c = 0; c < 8; ++c) acc[c] += value[c];
      }
      out[(size_t)r * vecs + v] = pack8(acc);
    }
  }
}
"""


class Pairs(NamedTuple):
    """The pairs of ``rows`` rows routed ``k`` ways, laid out expert by expert (backend arrays).

    rows: uint16 (bfloat16 bits) ``[pairs, hidden]``, each pair's row; weights: float32
    ``[pairs]``, its top-k weight; row_of: int32 ``[pairs]``, its row; slot: int32 ``[rows, k]``,
    the pair of (row, j), -1 where j names no expert; offs: int32 ``[groups]``, each expert's
    cumulative end pair (the grouped GEMM's ``offs``).
    """

    rows: Any
    weights: Any
    row_of: Any
    slot: Any
    offs: Any


def pairs_source(top_k: int) -> str:
    """CUDA C of both kernels for rows routed ``top_k`` ways."""
    return f"#define TOPK {top_k}\n" + PRELUDE + _SOURCE


@lru_cache(maxsize=None)
def _kernels(top_k: int) -> tuple[Any, Any]:
    from xmoe.kernels.build import compile_kernel, current_device

    code, arch = pairs_source(top_k), f"sm_{current_device().compute_capability}"
    return compile_kernel(code, "gather_pairs", arch), compile_kernel(code, "sum_pairs", arch)


def gather_pairs(rows: Any, topk_idx: Any, topk_weights: Any, counts: Any, num_pairs: int, stream: Any) -> Pairs:
    """Lay out the (row, expert) pairs of ``rows`` expert by expert.

    Args:
        rows: uint16 (bfloat16 bits) ``[rows, hidden]``, hidden a multiple of 8.
        topk_idx: int64 ``[rows, k]`` (k <= 32), each row's experts in ``[0, groups)``, -1: none.
        topk_weights: float32 ``[rows, k]``.
        counts: int32 ``[groups]``, the pairs of each expert; they must be those of ``topk_idx``
            (the router's or dispatch's counts are: they count the same ids).
        num_pairs: ``counts.sum()``, which the caller knows without reading the device.
        stream: the CuPy stream to run on (None on the simulator).

    Returns:
        :class:`Pairs`, backend arrays.
    """
    num_rows, hidden = rows.shape
    top_k, groups = topk_idx.shape[1], counts.shape[0]
    if not on_gpu():
        return Pairs(*reference.gather_pairs(rows, topk_idx, topk_weights, groups))
    import cupy

    xpm = xp()
    pair_rows = poisoned(xpm.empty((num_pairs, hidden), np.uint16))
    pair_weights = poisoned(xpm.empty(num_pairs, np.float32))
    row_of = poisoned(xpm.empty(num_pairs, np.int32))
    slot = poisoned(xpm.empty((num_rows, top_k), np.int32))
    offs = poisoned(xpm.empty(groups, np.int32))

    fill = xpm.empty(groups, np.int32)
    cupy.cuda.runtime.memsetAsync(fill.data.ptr, 0, fill.nbytes, stream.ptr)
    gather, _ = _kernels(top_k)
    with stream:
        gather(*warp_per_row_launch(num_rows),
               (rows, topk_idx, topk_weights, counts, fill, pair_rows, pair_weights, slot, row_of, offs,
                np.int32(num_rows), np.int32(groups), np.int32(hidden // 8)), shared_mem=4 * groups)
    return Pairs(pair_rows, pair_weights, row_of, slot, offs)


def sum_pairs(pair_out: Any, slot: Any, extra: Any, stream: Any) -> Any:
    """uint16 (bfloat16 bits) ``[rows, hidden]``: row r's pair outputs summed in float32, plus
    ``extra[r]``, rounded to bfloat16 once.

    Args:
        pair_out: uint16 (bfloat16 bits) ``[pairs, hidden]``, hidden a multiple of 8.
        slot: int32 ``[rows, k]``, :class:`Pairs`' ``slot``.
        extra: float32 ``[rows, hidden]`` added to every row, or None.
        stream: the CuPy stream to run on (None on the simulator).
    """
    num_rows, top_k = slot.shape
    hidden = pair_out.shape[1]
    if not on_gpu():
        return reference.sum_pairs(pair_out, slot, extra)
    out = poisoned(xp().empty((num_rows, hidden), np.uint16))
    _, add = _kernels(top_k)
    with stream:
        add(*warp_per_row_launch(num_rows),
            (pair_out, slot, np.uint64(0) if extra is None else extra, out, np.int32(num_rows),
             np.int32(hidden // 8)))  # a 0 of pointer size: no extra
    return out
