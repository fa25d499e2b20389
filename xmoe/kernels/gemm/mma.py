"""Generator of the portable grouped GEMM (sm_80 and newer): ``mma.sync`` m16n8k16 fed
by ``ldmatrix`` from a ``cp.async`` pipeline of ``stages`` shared-memory buffers, each
warp owning a (block_m / warps_m) x (block_n / warps_n) piece of the tile. Persistent:
each CTA walks the tile list (``SCHEDULER``) with a stride of the grid size."""

from __future__ import annotations

from xmoe.kernels.cuda_c import PRELUDE, SCHEDULER
from xmoe.kernels.gemm import codegen
from xmoe.kernels.gemm.spec import GemmConfig, GemmVariant, KernelSource

_HELPERS = r"""
__device__ __forceinline__ void ldmatrix_x4(u32* r, u32 address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, u32 address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}
__device__ __forceinline__ void mma_bf16(float* d, const u32* a, const u32* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
"""

# Rows of shared memory are padded by 16 bytes so that ldmatrix's 8 row addresses fall in
# distinct banks.
_LAYOUT = {
    "nk": """#define B_ROWS (B_SUBTILES * BLOCK_N)
#define B_STRIDE (BLOCK_K + 8)""",
    "kn": """#define B_ROWS BLOCK_K
#define B_STRIDE (B_SUBTILES * BLOCK_N + 8)""",
}

_LOAD_B = {
    # B[g] is [B_SUBTILES * N, K]: subtile s of the tile is rows s * N + n0 ...
    "nk": r"""
  #pragma unroll
  for (int i = 0; i < (B_ROWS * BLOCK_K / 8 + THREADS - 1) / THREADS; ++i) {
    const int chunk = threadIdx.x + i * THREADS;
    if (chunk < B_ROWS * BLOCK_K / 8) {
      const int r = chunk / (BLOCK_K / 8), c = chunk % (BLOCK_K / 8);
      const int n = tile.n0 + r % BLOCK_N, k = k0 + c * 8;
      const bool ok = n < N && k < K;
      const bf16_t* src = Bg + (size_t)((r / BLOCK_N) * N + n) * K + k;
      cp_async16(smem_u32(sB + r * B_STRIDE + c * 8), ok ? src : Bg, ok ? 16 : 0);
    }
  }""",
    # B[g] is [K, B_SUBTILES * N]: subtile s of the tile is columns s * N + n0 ...
    "kn": r"""
  #pragma unroll
  for (int i = 0; i < (BLOCK_K * B_SUBTILES * BLOCK_N / 8 + THREADS - 1) / THREADS; ++i) {
    const int chunk = threadIdx.x + i * THREADS;
    if (chunk < BLOCK_K * B_SUBTILES * BLOCK_N / 8) {
      const int r = chunk / (B_SUBTILES * BLOCK_N / 8), col = (chunk % (B_SUBTILES * BLOCK_N / 8)) * 8;
      const int n = tile.n0 + col % BLOCK_N, k = k0 + r;
      const bool ok = n < N && k < K;
      const bf16_t* src = Bg + (size_t)k * (B_SUBTILES * N) + (col / BLOCK_N) * N + n;
      cp_async16(smem_u32(sB + r * B_STRIDE + col), ok ? src : Bg, ok ? 16 : 0);
    }
  }""",
}

_LOAD_B_FRAGMENTS = {
    "nk": "ldmatrix_x4(pair, smem_u32(b_tile + (s * BLOCK_N + wn * TILE_N + ni * 8 + (lane / 16) * 8 + lane % 8) * B_STRIDE"
          " + kk * 16 + ((lane / 8) % 2) * 8));",
    "kn": "ldmatrix_x4_trans(pair, smem_u32(b_tile + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * B_STRIDE"
          " + s * BLOCK_N + wn * TILE_N + ni * 8 + (lane / 16) * 8));",
}

_BODY = r"""
#define TILE_M (BLOCK_M / WARPS_M)
#define TILE_N (BLOCK_N / WARPS_N)
#define MI (TILE_M / 16)
#define NI (TILE_N / 8)
#define A_STRIDE (BLOCK_K + 8)
#define A_STAGE (BLOCK_M * A_STRIDE)
#define B_STAGE (B_ROWS * B_STRIDE)

__device__ __forceinline__ void load_stage(bf16_t* sA, bf16_t* sB, const bf16_t* __restrict__ A,
                                           const bf16_t* __restrict__ Bg, const Tile& tile, int k0, int N, int K) {
  #pragma unroll
  for (int i = 0; i < (BLOCK_M * BLOCK_K / 8 + THREADS - 1) / THREADS; ++i) {
    const int chunk = threadIdx.x + i * THREADS;
    if (chunk < BLOCK_M * BLOCK_K / 8) {
      const int r = chunk / (BLOCK_K / 8), c = chunk % (BLOCK_K / 8);
      const int row = tile.row_start + r, k = k0 + c * 8;
      const bool ok = row < tile.row_end && k < K;
      cp_async16(smem_u32(sA + r * A_STRIDE + c * 8), ok ? A + (size_t)row * K + k : A, ok ? 16 : 0);
    }
  }
LOAD_B
}

SIGNATURE {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16_t* sA = reinterpret_cast<bf16_t*>(smem);
  bf16_t* sB = sA + STAGES * A_STAGE;
  int* prefix = reinterpret_cast<int*>(sB + STAGES * B_STAGE);
  const int n_tiles = (N + BLOCK_N - 1) / BLOCK_N;
  build_tile_prefix(offs, groups, M, n_tiles, prefix);
  const int total = prefix[groups];
  const int k_tiles = (K + BLOCK_K - 1) / BLOCK_K;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;

  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const Tile tile = locate_tile(t, prefix, groups, offs, M);
    const bf16_t* Bg = B + (size_t)tile.group * B_SUBTILES * N * K;
    float acc[B_SUBTILES][MI][NI][4];
    #pragma unroll
    for (int s = 0; s < B_SUBTILES; ++s)
      #pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        #pragma unroll
        for (int ni = 0; ni < NI; ++ni)
          #pragma unroll
          for (int j = 0; j < 4; ++j) acc[s][mi][ni][j] = 0.0f;

    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < k_tiles) load_stage(sA + s * A_STAGE, sB + s * B_STAGE, A, Bg, tile, s * BLOCK_K, N, K);
      cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // stage kt is in, and every warp is done with the stage refilled next
      const int next = kt + STAGES - 1;
      if (next < k_tiles)
        load_stage(sA + (next % STAGES) * A_STAGE, sB + (next % STAGES) * B_STAGE, A, Bg, tile, next * BLOCK_K, N, K);
      cp_async_commit();
      const bf16_t* a_tile = sA + (kt % STAGES) * A_STAGE;
      const bf16_t* b_tile = sB + (kt % STAGES) * B_STAGE;
      #pragma unroll
      for (int kk = 0; kk < BLOCK_K / 16; ++kk) {
        u32 a[MI][4];
        u32 b[B_SUBTILES][NI][2];
        #pragma unroll
        for (int mi = 0; mi < MI; ++mi)
          ldmatrix_x4(a[mi], smem_u32(a_tile + (wm * TILE_M + mi * 16 + lane % 16) * A_STRIDE + kk * 16 + (lane / 16) * 8));
        #pragma unroll
        for (int s = 0; s < B_SUBTILES; ++s)
          #pragma unroll
          for (int ni = 0; ni < NI; ni += 2) {
            u32 pair[4];
            LOAD_B_FRAGMENTS
            b[s][ni][0] = pair[0]; b[s][ni][1] = pair[1]; b[s][ni + 1][0] = pair[2]; b[s][ni + 1][1] = pair[3];
          }
        #pragma unroll
        for (int s = 0; s < B_SUBTILES; ++s)
          #pragma unroll
          for (int mi = 0; mi < MI; ++mi)
            #pragma unroll
            for (int ni = 0; ni < NI; ++ni) mma_bf16(acc[s][mi][ni], a[mi], b[s][ni]);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the next tile's first loads reuse every stage

    #pragma unroll
    for (int mi = 0; mi < MI; ++mi)
      #pragma unroll
      for (int ni = 0; ni < NI; ++ni)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = tile.row_start + wm * TILE_M + mi * 16 + lane / 4 + 8 * h;
          const int col = tile.n0 + wn * TILE_N + ni * 8 + (lane % 4) * 2;
          STORE
        }
  }
}
"""


def generate(config: GemmConfig, variant: GemmVariant) -> KernelSource:
    """CUDA C of one "mma" kernel."""
    threads = 32 * config.warps_m * config.warps_n
    tile_n = config.block_n // config.warps_n
    if config.block_m % (16 * config.warps_m) or tile_n % 16 or config.block_k % 16:
        raise ValueError(f"{config.name}: warp tiles must be multiples of 16 rows and 16 columns")
    entry = f"grouped_gemm_{config.name}_{variant.name}"
    subtiles = [(f"acc[{s}][mi][ni][2 * h]", f"acc[{s}][mi][ni][2 * h + 1]") for s in range(variant.b_subtiles)]
    body = (_BODY.replace("LOAD_B_FRAGMENTS", _LOAD_B_FRAGMENTS[variant.b_layout])
            .replace("LOAD_B", _LOAD_B[variant.b_layout])
            .replace("SIGNATURE", codegen.signature(entry, variant))
            .replace("STORE", codegen.store_call(variant, "row", "col", subtiles)))
    code = "\n".join([
        codegen.constants(config, variant, threads, min_blocks=2 if variant.b_subtiles == 1 else 1),
        f"#define WARPS_M {config.warps_m}",
        f"#define WARPS_N {config.warps_n}",
        _LAYOUT[variant.b_layout],
        PRELUDE, _HELPERS, SCHEDULER, codegen.store_function(variant), body,
    ])
    a_stage = config.block_m * (config.block_k + 8)
    if variant.b_layout == "nk":
        b_stage = variant.b_subtiles * config.block_n * (config.block_k + 8)
    else:
        b_stage = config.block_k * (variant.b_subtiles * config.block_n + 8)
    smem = 2 * config.stages * (a_stage + b_stage)
    return KernelSource(code, entry, threads, smem, "sm_80")
