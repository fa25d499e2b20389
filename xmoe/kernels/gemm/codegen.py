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
    return (f'extern "C" __global__ void {attributes}__launch_bounds__(THREADS, MIN_BLOCKS) {entry}(\n'
            f"    {operands}, out_t* __restrict__ C,\n"
            f"    const int* __restrict__ offs, int groups, int M, int N, int K{_weights_parameter(variant)})")


def _weights_parameter(variant: GemmVariant) -> str:
    return ", const float* __restrict__ row_weights" if variant.epilogue == "row_scale" else ""


def _weights_argument(variant: GemmVariant) -> str:
    return ", row_weights" if variant.epilogue == "row_scale" else ""


def _row_scale(variant: GemmVariant) -> str:
    """Device code multiplying ``v0``/``v1`` by their row's weight (rows past the tile's end,
    whose values are never written out, read no weight)."""
    if variant.epilogue != "row_scale":
        return ""
    return "  const float w = row < row_end ? row_weights[row] : 0.0f;\n  v0 *= w; v1 *= w;\n"


def store_function(variant: GemmVariant) -> str:
    """``store_pair``: two adjacent output columns of one row after the epilogue, written to C
    (guarded by the row range and N)."""
    if variant.out_dtype == "bf16":
        store = "  *reinterpret_cast<u32*>(C + (size_t)row * N + col) = pack_bf16x2(v0, v1);\n"
    else:
        store = "  *reinterpret_cast<float2*>(C + (size_t)row * N + col) = make_float2(v0, v1);\n"
    return (f"typedef {OUT_TYPES[variant.out_dtype]} out_t;\n"
            "__device__ __forceinline__ void store_pair(out_t* __restrict__ C, int N, int row, int row_end, int col,\n"
            f"                                           float v0, float v1{_weights_parameter(variant)}) {{\n"
            "  if (row >= row_end || col >= N) return;\n" + _row_scale(variant) + store + "}\n")


def stage_function(variant: GemmVariant) -> str:
    """Two adjacent output columns after the epilogue, for staging in shared memory: bfloat16
    as ``pack_pair`` (a u32 for ``stmatrix``), fp32 as ``stage_pair`` (stored at an address)."""
    weights = _weights_parameter(variant)
    if variant.out_dtype == "bf16":
        function = ("__device__ __forceinline__ u32 pack_pair(int row, int row_end, float v0, float v1"
                    f"{weights}) {{\n" + _row_scale(variant) + "  return pack_bf16x2(v0, v1);\n}\n")
    else:
        function = ("__device__ __forceinline__ void stage_pair(u32 address, int row, int row_end, float v0, "
                    f"float v1{weights}) {{\n" + _row_scale(variant)
                    + '  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\\n" :: "r"(address), "f"(v0), "f"(v1));\n}\n')
    return f"typedef {OUT_TYPES[variant.out_dtype]} out_t;\n" + function


def _values(variant: GemmVariant, subtile_values: list[tuple[str, str]]) -> tuple[str, str]:
    if variant.epilogue == "swiglu":
        (g0, g1), (u0, u1) = subtile_values
        return f"silu({g0}) * {u0}", f"silu({g1}) * {u1}"
    (v0, v1), = subtile_values
    return v0, v1


def store_call(variant: GemmVariant, row: str, col: str, subtile_values: list[tuple[str, str]]) -> str:
    """One ``store_pair`` call; ``subtile_values`` holds the (v0, v1) accumulators of each B subtile."""
    v0, v1 = _values(variant, subtile_values)
    return f"store_pair(C, N, {row}, tile.row_end, {col}, {v0}, {v1}{_weights_argument(variant)});"


def pack_call(variant: GemmVariant, row: str, subtile_values: list[tuple[str, str]]) -> str:
    """A ``pack_pair`` expression: the pair after the epilogue, as two bfloat16 in a u32."""
    v0, v1 = _values(variant, subtile_values)
    return f"pack_pair({row}, tile.row_end, {v0}, {v1}{_weights_argument(variant)})"


def stage_call(variant: GemmVariant, address: str, row: str, subtile_values: list[tuple[str, str]]) -> str:
    """One ``stage_pair`` call, as :func:`store_call` but into shared memory at ``address``."""
    v0, v1 = _values(variant, subtile_values)
    return f"stage_pair({address}, {row}, tile.row_end, {v0}, {v1}{_weights_argument(variant)});"
