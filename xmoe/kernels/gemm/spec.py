"""What a generated grouped-GEMM kernel is: its tile configuration and its variant.

``C[rows of group g] = epilogue(A[rows of group g] @ B[g]^T)`` with B in the weight layout
of ``nn.Linear`` and vLLM's fused MoE (``[groups, N, K]``, "nk") or its transpose
(``[groups, K, N]``, "kn", as a router's ``[hidden, experts]`` weight is stored).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Epilogues: none; SwiGLU (B holds the gate rows, then the up rows: out = silu(gate) * up,
#: vLLM's ``silu_and_mul`` order); a per-row fp32 weight multiplied into each output row.
EPILOGUES = ("none", "swiglu", "row_scale")
B_LAYOUTS = ("nk", "kn")
OUT_DTYPES = ("bf16", "f32")


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape of one kernel.

    Attributes:
        kernel: "wgmma" (sm_90a: warp-specialised, one loader warpgroup and two math
            warpgroups issuing ``wgmma`` from swizzled shared memory) or "mma" (sm_80+:
            ``mma.sync`` fed by ``ldmatrix``).
        block_m: output rows per tile (128 for "wgmma": 64 per math warpgroup).
        block_n: output columns per tile (SwiGLU computes twice as many columns of B).
        block_k: K per pipeline stage (64 for "wgmma": one 128-byte swizzle row).
        stages: shared-memory pipeline depth.
        warps_m, warps_n: the warp grid of an "mma" tile.
        cluster_m: CTAs per cluster ("wgmma"): they take consecutive row tiles of one group
            and share each weight tile, every CTA loading a part and multicasting it to all.
    """

    kernel: str
    block_m: int
    block_n: int
    block_k: int
    stages: int
    warps_m: int = 2
    warps_n: int = 4
    cluster_m: int = 1

    @property
    def name(self) -> str:
        shape = f"_w{self.warps_m}x{self.warps_n}" if self.kernel == "mma" else f"_c{self.cluster_m}"
        return f"{self.kernel}_{self.block_m}x{self.block_n}x{self.block_k}_s{self.stages}{shape}"


@dataclass(frozen=True)
class GemmVariant:
    """What a kernel computes, beyond its tile shape."""

    epilogue: str = "none"
    b_layout: str = "nk"
    out_dtype: str = "bf16"

    @property
    def b_subtiles(self) -> int:
        """Column tiles of B per output tile: SwiGLU reads a gate tile and an up tile."""
        return 2 if self.epilogue == "swiglu" else 1

    @property
    def name(self) -> str:
        return f"{self.epilogue}_{self.b_layout}_{self.out_dtype}"


@dataclass(frozen=True)
class KernelSource:
    """A generated kernel: CUDA C, its entry point, launch shape and NVRTC options."""

    code: str
    entry: str
    threads: int
    static_smem_bytes: int  # dynamic shared memory before the per-group tile table
    arch: str  # "sm_80" or "sm_90a"

    def smem_bytes(self, groups: int) -> int:
        return self.static_smem_bytes + 4 * (groups + 1)
