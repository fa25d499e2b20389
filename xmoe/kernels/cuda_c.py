"""CUDA C building blocks shared by the generated kernels (GEMM, router).

Each is a snippet of device code with no includes, so NVRTC needs no header search
path. bfloat16 moves as ``unsigned short`` bits, as elsewhere in xmoe.
"""

from __future__ import annotations

PRELUDE = r"""
typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ u32 smem_u32(const void* pointer) {
  return (u32)__cvta_generic_to_shared(pointer);
}

// Two floats as a pair of bfloat16 (round to nearest even), lo in the low half.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
  u32 packed;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
  return packed;
}

__device__ __forceinline__ float bf16_to_f32(bf16_t bits) {
  return __uint_as_float(((u32)bits) << 16);
}

// 16 bytes of bfloat16 (8 channels, the first in the low half of v.x) as floats, and back (rounded).
__device__ __forceinline__ void unpack8(uint4 v, float* f) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
  #pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ uint4 pack8(const float* f) {
  return make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]), pack_bf16x2(f[6], f[7]));
}

__device__ __forceinline__ float silu(float x) {
  return x / (1.0f + __expf(-x));
}

// 16 bytes global -> shared, asynchronously; src_bytes == 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}
"""

#: Tile scheduling over groups of rows (one expert's rows are contiguous): the work units
#: of group g are ceil(rows_g / (BLOCK_M * CLUSTER_M)) row units x ``n_tiles`` column tiles,
#: groups in order, row units fastest, so CTAs running together share a weight tile and one
#: group's rows. CTA ``rank`` of a cluster takes row tile ``rank`` of its cluster's unit
#: (empty when the group has no rows left: row_end <= row_start).
SCHEDULER = r"""
// prefix[g] = tiles of groups 0..g-1; offs[g] = end row of group g (cumulative), clamped to M.
__device__ void build_tile_prefix(const int* offs, int groups, int M, int n_tiles, int* prefix) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int carry = 0;
    if (lane == 0) prefix[0] = 0;
    for (int base = 0; base < groups; base += 32) {
      const int g = base + lane;
      int tiles = 0;
      if (g < groups) {
        const int start = g == 0 ? 0 : min(offs[g - 1], M);
        const int rows = max(min(offs[g], M) - start, 0);
        tiles = (rows + BLOCK_M * CLUSTER_M - 1) / (BLOCK_M * CLUSTER_M) * n_tiles;
      }
      int inclusive = tiles;
      #pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += up;
      }
      if (g < groups) prefix[g + 1] = carry + inclusive;
      carry += __shfl_sync(0xffffffffu, inclusive, 31);
    }
  }
  __syncthreads();
}

struct Tile { int group; int row_start; int row_end; int n0; };

__device__ __forceinline__ Tile locate_tile(int t, const int* prefix, int groups, const int* offs, int M,
                                            int rank = 0) {
  int lo = 0, hi = groups;  // prefix[lo] <= t < prefix[groups]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (prefix[mid] <= t) lo = mid; else hi = mid;
  }
  const int start = lo == 0 ? 0 : min(offs[lo - 1], M);
  const int end = min(offs[lo], M);
  const int m_units = (end - start + BLOCK_M * CLUSTER_M - 1) / (BLOCK_M * CLUSTER_M);
  const int local = t - prefix[lo];
  Tile tile;
  tile.group = lo;
  tile.row_start = start + ((local % m_units) * CLUSTER_M + rank) * BLOCK_M;
  tile.row_end = min(tile.row_start + BLOCK_M, end);
  tile.n0 = (local / m_units) * BLOCK_N;
  return tile;
}
"""
