"""Generator of the Hopper grouped GEMM (sm_90a): warp-specialised, persistent, TMA-fed.

Warpgroup 0 loads: one thread issues the tensor-memory-accelerator copies of each stage
(A rows of the tile, B rows of the weight tile) into ``stages`` shared-memory buffers,
128-byte swizzled as ``wgmma`` reads them, completing on the stage's "full" mbarrier.
Warpgroups 1 and 2 each own 64 rows of the tile: they wait for a stage, issue ``wgmma``
m64nNk16 on shared-memory descriptors, keep one batch in flight, and release the stage
on its "empty" mbarrier. With ``cluster_m`` = 2 the two CTAs of a cluster take consecutive
row tiles of one group and share the weight tile: each loads half of it and multicasts
it to both, which halves the weight traffic from L2; a stage is refilled only when the
consumers of every CTA of the cluster have released it.

The A and B tensor maps (``tma.py``) are encoded on the host and passed by value.
"""

from __future__ import annotations

from xmoe.kernels.cuda_c import PRELUDE, SCHEDULER
from xmoe.kernels.gemm import codegen
from xmoe.kernels.gemm.spec import GemmConfig, GemmVariant, KernelSource

SMEM_LIMIT = 227 * 1024
_ALIGN = 1024  # a 128-byte swizzle atom is 8 rows x 128 bytes and must start 1024-aligned
OPERANDS = "const __grid_constant__ TensorMap a_map, const __grid_constant__ TensorMap b_map"

_HELPERS = r"""
struct __align__(64) TensorMap { u64 words[16]; };

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile("{\n.reg .pred done;\nWAIT:\n"
               "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               "@!done bra WAIT;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void mbar_expect_bytes(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
// Arrive on the mbarrier at shared address ``bar`` of CTA ``cta`` of this cluster. The default
// (release, CTA scope) orders this thread's finished reads of the stage, which is all a
// peer's refill needs; a cluster-scope release would add a GPU-wide memory barrier.
__device__ __forceinline__ void mbar_arrive_cluster(u32 bar, u32 cta) {
  asm volatile("{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
               "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n"
               :: "r"(bar), "r"(cta) : "memory");
}
__device__ __forceinline__ u32 cluster_rank() {
  u32 rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void tma_load_2d(u32 dst, const TensorMap* map, u32 bar, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n"
               :: "r"(dst), "l"(map), "r"(bar), "r"(c0), "r"(c1) : "memory");
}
// The same box into the same shared address of every CTA in ``mask``, completing on each one's ``bar``.
__device__ __forceinline__ void tma_load_3d(u32 dst, const TensorMap* map, u32 bar, int c0, int c1, int c2,
                                            unsigned short mask) {
  if (CLUSTER_M == 1) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n"
                 :: "r"(dst), "l"(map), "r"(bar), "r"(c0), "r"(c1), "r"(c2) : "memory");
  } else {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
                 " [%0], [%1, {%3, %4, %5}], [%2], %6;\n"
                 :: "r"(dst), "l"(map), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "h"(mask) : "memory");
  }
}
// ``bytes`` from shared ``src`` to global ``dst`` by the copy engine, in this thread's bulk group.
__device__ __forceinline__ void bulk_store(void* dst, u32 src, u32 bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" :: "l"(dst), "r"(src), "r"(bytes) : "memory");
}
// Four 8x8 bfloat16 matrices into shared memory; lanes 8i..8i+7 give matrix i's row addresses.
__device__ __forceinline__ void stmatrix_x4(u32 address, const u32* r) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n"
               :: "r"(address), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}
__device__ __forceinline__ void warpgroup_barrier(int id) {
  asm volatile("bar.sync %0, 128;\n" :: "r"(id) : "memory");
}
// K-major operand, 128-byte swizzle: rows of 128 bytes, 8-row groups 1024 bytes apart.
__device__ __forceinline__ u64 smem_desc(u32 address) {
  return (u64)((address & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// One arrival per math warp on the stage's "empty" mbarrier of every CTA that writes into it.
__device__ __forceinline__ void release(u32 bar, int lane) {
  __syncwarp();
  if (lane == 0) {
    if (CLUSTER_M == 1) {
      mbar_arrive(bar);
    } else {
      for (int cta = 0; cta < CLUSTER_M; ++cta) mbar_arrive_cluster(bar, cta);
    }
  }
}
"""

_BODY = r"""
#define A_STAGE_BYTES (BLOCK_M * 128)
#define B_STAGE_BYTES (B_SUBTILES * BLOCK_N * 128)
#define B_PART_ROWS (BLOCK_N / CLUSTER_M)  // weight rows each CTA of a cluster loads and multicasts
#define ACC (BLOCK_N / 2)
// Output staging, per math warpgroup: 64 rows, padded by 16 bytes so that the 8 rows a warp
// writes at once fall in different banks.
#define OUT_ROW_BYTES (BLOCK_N * (int)sizeof(out_t) + 16)
#define OUT_STAGE_BYTES (64 * OUT_ROW_BYTES)

SIGNATURE {
  extern __shared__ unsigned char smem_raw[];
  const u32 raw = smem_u32(smem_raw);
  const u32 base = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const u32 a_smem = base;
  const u32 b_smem = base + STAGES * A_STAGE_BYTES;
  const u32 out_smem = b_smem + STAGES * B_STAGE_BYTES;
  const u32 full_bar = out_smem + 2 * OUT_STAGE_BYTES;
  const u32 empty_bar = full_bar + 8 * STAGES;
  int* prefix = reinterpret_cast<int*>(smem + (empty_bar + 8 * STAGES - base));
  const u32 rank = CLUSTER_M > 1 ? cluster_rank() : 0;

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full_bar + 8 * s, 1);                 // the loader's expect-bytes arrival
      mbar_init(empty_bar + 8 * s, 8 * CLUSTER_M);    // every math warp of the cluster
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  const int n_tiles = (N + BLOCK_N - 1) / BLOCK_N;
  build_tile_prefix(offs, groups, M, n_tiles, prefix);  // ends with __syncthreads
  if (CLUSTER_M > 1) cluster_sync();  // the peers' barriers exist before anything lands in them
  const int total = prefix[groups];
  const int k_tiles = (K + BLOCK_K - 1) / BLOCK_K;
  const int warpgroup = threadIdx.x / 128;
  const int first = blockIdx.x / CLUSTER_M, stride = gridDim.x / CLUSTER_M;
  int stage = 0;
  u32 phase = 0;

  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      for (int t = first; t < total; t += stride) {
        const Tile tile = locate_tile(t, prefix, groups, offs, M, rank);
        for (int kt = 0; kt < k_tiles; ++kt) {
          mbar_wait(empty_bar + 8 * stage, phase ^ 1);
          const u32 full = full_bar + 8 * stage;
          mbar_expect_bytes(full, A_STAGE_BYTES + B_STAGE_BYTES);
          tma_load_2d(a_smem + stage * A_STAGE_BYTES, &a_map, full, kt * BLOCK_K, tile.row_start);
          #pragma unroll
          for (int s = 0; s < B_SUBTILES; ++s)
            tma_load_3d(b_smem + stage * B_STAGE_BYTES + (s * BLOCK_N + rank * B_PART_ROWS) * 128, &b_map, full,
                        kt * BLOCK_K, s * N + tile.n0 + rank * B_PART_ROWS, tile.group, (1 << CLUSTER_M) - 1);
          if (++stage == STAGES) { stage = 0; phase ^= 1; }
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int math = warpgroup - 1;  // rows 64 * math .. of the tile
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    float acc[B_SUBTILES][ACC];
    #pragma unroll
    for (int s = 0; s < B_SUBTILES; ++s)
      #pragma unroll
      for (int j = 0; j < ACC; ++j) acc[s][j] = 0.0f;
    for (int t = first; t < total; t += stride) {
      const Tile tile = locate_tile(t, prefix, groups, offs, M, rank);
      int previous = -1;  // the stage whose wgmma batch is still in flight
      for (int kt = 0; kt < k_tiles; ++kt) {
        mbar_wait(full_bar + 8 * stage, phase);
        wgmma_fence();
        #pragma unroll
        for (int kk = 0; kk < BLOCK_K / 16; ++kk) {
          const u64 a_desc = smem_desc(a_smem + stage * A_STAGE_BYTES + math * 64 * 128 + kk * 32);
          #pragma unroll
          for (int s = 0; s < B_SUBTILES; ++s)
            wgmma_bf16(acc[s], a_desc, smem_desc(b_smem + stage * B_STAGE_BYTES + s * BLOCK_N * 128 + kk * 32),
                       kt > 0 || kk > 0);
        }
        wgmma_commit();
        // Keep this batch in flight (the tensor cores stay fed) and free the previous one's stage.
        wgmma_wait<1>();
        if (previous >= 0) release(empty_bar + 8 * previous, lane);
        previous = stage;
        if (++stage == STAGES) { stage = 0; phase ^= 1; }
      }
      wgmma_wait<0>();
      #pragma unroll
      for (int s = 0; s < B_SUBTILES; ++s) fence_accumulators(acc[s]);
      release(empty_bar + 8 * previous, lane);
      // Epilogue: the warpgroup's 64 rows go through shared memory and out as one bulk copy
      // per row, asynchronously: the next tile's wgmma starts while the copies run.
      const int wg_thread = threadIdx.x % 128;
      const u32 staging = out_smem + math * OUT_STAGE_BYTES;
      if (wg_thread < 64) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
      warpgroup_barrier(1 + math);  // the previous tile's copies have read the staging rows
STAGE_TILE
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // st.shared before the copy engine reads
      warpgroup_barrier(1 + math);
      if (wg_thread < 64) {
        const int row = tile.row_start + math * 64 + wg_thread, columns = min(BLOCK_N, N - tile.n0);
        if (row < tile.row_end && columns > 0)
          bulk_store(C + (size_t)row * N + tile.n0, staging + wg_thread * OUT_ROW_BYTES, columns * (int)sizeof(out_t));
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
      }
    }
    if (threadIdx.x % 128 < 64) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  }
  if (CLUSTER_M > 1) cluster_sync();  // no CTA leaves while a peer may still write into it
}
"""


def _stage_tile(variant: GemmVariant) -> str:
    """The epilogue's writes of a warpgroup's accumulators into its staging rows: bfloat16 by
    ``stmatrix`` (8-column chunks j and j+1 of the warp's 16 rows per instruction), fp32 by pairs."""
    if variant.out_dtype == "bf16":
        packs = "\n".join(
            f"          packed[{q}] = "
            + codegen.pack_call(variant, f"rows + {8 * (q % 2)}",
                                [(f"acc[{s}][4 * (j + {q // 2}) + {2 * (q % 2)}]",
                                  f"acc[{s}][4 * (j + {q // 2}) + {2 * (q % 2) + 1}]")
                                 for s in range(variant.b_subtiles)]) + ";"
            for q in range(4))
        return f"""      #pragma unroll
      for (int j = 0; j < BLOCK_N / 8; j += 2) {{
        const int rows = tile.row_start + math * 64 + warp * 16 + lane / 4;  // and rows + 8
        u32 packed[4];
{packs}
        const int matrix = lane / 8;
        stmatrix_x4(staging + (warp * 16 + (matrix % 2) * 8 + lane % 8) * OUT_ROW_BYTES + (j + matrix / 2) * 16,
                    packed);
      }}
"""
    subtiles = [(f"acc[{s}][4 * i + 2 * h]", f"acc[{s}][4 * i + 2 * h + 1]") for s in range(variant.b_subtiles)]
    return f"""      #pragma unroll
      for (int i = 0; i < BLOCK_N / 8; ++i)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {{
          const int r = warp * 16 + lane / 4 + 8 * h;
          const int row = tile.row_start + math * 64 + r;
          const u32 address = staging + r * OUT_ROW_BYTES + (i * 8 + (lane % 4) * 2) * (int)sizeof(out_t);
          {codegen.stage_call(variant, "address", "row", subtiles)}
        }}
"""


def _wgmma_function(n: int) -> str:
    """``wgmma_bf16``: D[64 x n] (+)= A[64 x 16] B[16 x n], both K-major in shared memory."""
    regs = n // 2
    outputs = ", ".join(f"%{i}" for i in range(regs))
    operands = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    return (
        "__device__ __forceinline__ void wgmma_bf16(float* d, u64 desc_a, u64 desc_b, int accumulate) {\n"
        '  asm volatile("{\\n.reg .pred p;\\n"\n'
        f'               "setp.ne.b32 p, %{regs + 2}, 0;\\n"\n'
        f'               "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 "\n'
        f'               "{{{outputs}}}, %{regs}, %{regs + 1}, p, 1, 1, 0, 0;\\n}}\\n"\n'
        f"               : {operands}\n"
        '               : "l"(desc_a), "l"(desc_b), "r"(accumulate));\n'
        "}\n"
        "// Keeps reads of the accumulators after the wgmma_wait<0>() that completes them.\n"
        "__device__ __forceinline__ void fence_accumulators(float* d) {\n"
        f'  asm volatile("" : {operands} :: "memory");\n'
        "}\n"
    )


def staging_bytes(block_n: int, variant: GemmVariant) -> int:
    """Shared memory of the output rows staged by the two math warpgroups."""
    return 2 * 64 * (block_n * (2 if variant.out_dtype == "bf16" else 4) + 16)


def smem_bytes(config: GemmConfig, variant: GemmVariant) -> int:
    """Shared memory of the tiles, the output staging and the barriers, with the slack for
    1024-byte alignment."""
    stage = 128 * (config.block_m + variant.b_subtiles * config.block_n)
    return _ALIGN + config.stages * stage + staging_bytes(config.block_n, variant) + 16 * config.stages


def generate(config: GemmConfig, variant: GemmVariant) -> KernelSource:
    """CUDA C of one "wgmma" kernel."""
    if variant.b_layout != "nk":
        raise ValueError("the wgmma kernel reads B K-major only (b_layout 'nk')")
    if config.block_m != 128 or config.block_k != 64 or config.block_n % 16 or config.block_n * variant.b_subtiles > 256:
        raise ValueError(f"{config.name}: wgmma tiles are 128 x N x 64, N a multiple of 16 and at most 256 "
                         "columns of B (the accumulators of one thread)")
    if config.cluster_m not in (1, 2) or (config.block_n // config.cluster_m) % 8:
        raise ValueError(f"{config.name}: clusters of 1 or 2 CTAs, each loading a multiple of 8 weight rows")
    if smem_bytes(config, variant) > SMEM_LIMIT:
        raise ValueError(f"{config.name}: {smem_bytes(config, variant)} bytes of shared memory, more than {SMEM_LIMIT}")
    entry = f"grouped_gemm_{config.name}_{variant.name}"
    cluster = f"__cluster_dims__({config.cluster_m}, 1, 1) " if config.cluster_m > 1 else ""
    body = (_BODY.replace("SIGNATURE", codegen.signature(entry, variant, OPERANDS, cluster))
            .replace("STAGE_TILE\n", _stage_tile(variant)))
    code = "\n".join([
        codegen.constants(config, variant, threads=384, min_blocks=1),
        PRELUDE, _HELPERS, _wgmma_function(config.block_n), SCHEDULER, codegen.stage_function(variant), body,
    ])
    return KernelSource(code, entry, 384, smem_bytes(config, variant), "sm_90a")
