"""Every generated kernel builds for its architecture with no register spills (with nvcc,
where this machine has it: the CPU simulator never runs the generated CUDA C)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from xmoe.kernels.gemm import candidates, kernel_source
from xmoe.kernels.gemm.spec import GemmVariant
from xmoe.kernels.router import RoutingRule, select_source

NVCC = shutil.which("nvcc")
VARIANTS = [GemmVariant(epilogue, "nk", "bf16") for epilogue in ("none", "swiglu", "row_scale")] + \
    [GemmVariant("none", "kn", "f32")]


def _build(code: str, arch: str, tmp_path) -> str:
    source = tmp_path / "kernel.cu"
    source.write_text(code)
    target = f"-gencode=arch=compute_{arch[3:]},code={arch}"
    result = subprocess.run([NVCC, target, "-cubin", "-o", str(tmp_path / "kernel.cubin"), "-Xptxas", "-v",
                             str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("compute_capability", [80, 90])
def test_every_candidate_builds_without_spills(variant, compute_capability, tmp_path):
    for config in candidates(variant, compute_capability):
        source = kernel_source(config, variant)
        report = _build(source.code, source.arch if config.kernel == "wgmma" else f"sm_{compute_capability}", tmp_path)
        spills = re.findall(r"(\d+) bytes spill stores", report)
        assert spills and all(int(n) == 0 for n in spills), f"{config.name}: {report}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("rule", [RoutingRule(256, 8, "sigmoid", True, 8, 4, True),
                                  RoutingRule(72, 6, "softmax", False, 0, 0, False)], ids=["deepseek-v3", "plain"])
def test_select_kernel_builds(rule, tmp_path):
    _build(select_source(rule), "sm_90", tmp_path)


def test_candidates_fit_shared_memory():
    from xmoe.kernels.gemm import wgmma

    for variant in VARIANTS:
        for config in candidates(variant, 90):
            assert kernel_source(config, variant).smem_bytes(1023) <= wgmma.SMEM_LIMIT
