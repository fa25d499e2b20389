"""Pieces of generated grouped-GEMM source common to the "mma" and "wgmma" kernels:
the entry signature, the epilogue and the constants a kernel is specialised on."""

from __future__ import annotations

from xmoe.kernels.gemm.spec import GemmConfig, GemmVariant

OUT_TYPES = {"bf16": "bf16_t", "f32": "float"}


def constants(config: GemmConfig, variant: GemmVariant, threads: int, min_blocks: int) -> str:
    """``#define``s of the tile shape; ``min_blocks``: CTAs per SM the register budget must allow;
    ``CLUSTER_M``: CTAs of a cluster, on consecutive row tiles of one group."""
    return "\n".join([
        f"#define BLOCK_M {config.block_m}",
        f"#define BLOCK_N {config.block_n}",
        f"#define BLOCK_K {config.block_k}",
        f"#define STAGES {config.stages}",
        f"#define CLUSTER_M {config.cluster_m}",
        f"#define THREADS {threads}",
        f"#define MIN_BLOCKS {min_blocks}",
        f"#define B_SUBTILES {variant.b_subtiles}",
    ])


POINTER_OPERANDS = "const bf16_t* __restrict__ A, const bf16_t* __restrict__ B"


def signature(entry: str, variant: GemmVariant, operands: str = POINTER_OPERANDS, attributes: str = "") -> str:
    """``A`` bf16 [M, K]; ``B`` bf16 [groups, B_SUBTILES * N, K] ("nk") or [groups, K, B_SUBTILES * N]
    ("kn"), as pointers or as ``operands`` (tensor maps); ``C`` [M, N]; ``offs`` int32 [groups],
    the cumulative end row of each group."""
    weights = ", const float* __restrict__ row_weights" if variant.epilogue == "row_scale" else ""
    return (f'extern "C" __global__ void {attributes}__launch_bounds__(THREADS, MIN_BLOCKS) {entry}(\n'
            f"    {operands}, out_t* __restrict__ C,\n"
            f"    const int* __restrict__ offs, int groups, int M, int N, int K{weights})")


def store_function(variant: GemmVariant) -> str:
    """``store_pair``: two adjacent output columns of one row, guarded, after the epilogue."""
    weights = ", const float* __restrict__ row_weights" if variant.epilogue == "row_scale" else ""
    scale = "  const float w = row_weights[row]; v0 *= w; v1 *= w;\n" if variant.epilogue == "row_scale" else ""
    if variant.out_dtype == "bf16":
        store = "  *reinterpret_cast<u32*>(C + (size_t)row * N + col) = pack_bf16x2(v0, v1);\n"
    else:
        store = "  *reinterpret_cast<float2*>(C + (size_t)row * N + col) = make_float2(v0, v1);\n"
    return (f"typedef {OUT_TYPES[variant.out_dtype]} out_t;\n"
            "__device__ __forceinline__ void store_pair(out_t* __restrict__ C, int N, int row, int row_end, int col,\n"
            f"                                           float v0, float v1{weights}) {{\n"
            "  if (row >= row_end || col >= N) return;\n" + scale + store + "}\n")


def store_call(variant: GemmVariant, row: str, col: str, subtile_values: list[tuple[str, str]]) -> str:
    """One ``store_pair`` call; ``subtile_values`` holds the (v0, v1) accumulators of each B subtile."""
    if variant.epilogue == "swiglu":
        (g0, g1), (u0, u1) = subtile_values
        v0, v1 = f"silu({g0}) * {u0}", f"silu({g1}) * {u1}"
    else:
        (v0, v1), = subtile_values
    weights = ", row_weights" if variant.epilogue == "row_scale" else ""
    return f"store_pair(C, N, {row}, tile.row_end, {col}, {v0}, {v1}{weights});"
