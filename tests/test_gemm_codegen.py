"""Every generated kernel (grouped GEMM candidates, the router's selection, the pair layout)
compiles for its architecture with no register spills, with NVRTC (the ``nvidia-cuda-nvrtc``
wheel of the test extra: no GPU needed) or nvcc where one of them is here: the CPU simulator
never runs the generated CUDA C, so this is what CI checks of it."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from xmoe.kernels.gemm import candidates, kernel_source
from xmoe.kernels.gemm.spec import GemmVariant
from xmoe.kernels.expert_grads import expert_grads_source
from xmoe.kernels.pairs import pairs_source
from xmoe.kernels.router import RoutingRule, select_source

VARIANTS = [GemmVariant(epilogue, "nk", "bf16") for epilogue in ("none", "swiglu", "row_scale")] + \
    [GemmVariant("none", "nk", "f32"), GemmVariant("none", "kn", "f32")]


def _nvrtc():
    """``cuda.bindings.nvrtc`` when it and its library load, else None."""
    try:
        from cuda.bindings import nvrtc

        status, _, _ = nvrtc.nvrtcVersion()
        return nvrtc if status == nvrtc.nvrtcResult.NVRTC_SUCCESS else None
    except Exception:  # no bindings, or no libnvrtc for them to load
        return None


NVRTC = _nvrtc()
NVCC = shutil.which("nvcc")
needs_compiler = pytest.mark.skipif(NVRTC is None and NVCC is None, reason="neither NVRTC nor nvcc is here")


def _build(code: str, arch: str, tmp_path) -> str:
    """Compile ``code`` for ``arch`` (e.g. "sm_90a"); the assembler's report (registers, spills)."""
    if NVRTC is not None:
        status, program = NVRTC.nvrtcCreateProgram(code.encode(), b"kernel.cu", 0, [], [])
        options = [b"-std=c++17", f"-arch={arch}".encode(), b"--ptxas-options=-v"]
        (status,) = NVRTC.nvrtcCompileProgram(program, len(options), options)
        _, size = NVRTC.nvrtcGetProgramLogSize(program)
        log = b" " * size
        NVRTC.nvrtcGetProgramLog(program, log)
        NVRTC.nvrtcDestroyProgram(program)
        assert status == NVRTC.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")[-3000:]
        return log.decode(errors="replace")
    source = tmp_path / "kernel.cu"
    source.write_text(code)
    target = f"-gencode=arch=compute_{arch[3:].rstrip('a')},code={arch}"
    result = subprocess.run([NVCC, "-std=c++17", target, "-cubin", "-o", str(tmp_path / "kernel.cubin"), "-Xptxas",
                             "-v", str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _assert_no_spills(report: str, what: str) -> None:
    spills = re.findall(r"(\d+) bytes spill stores", report)
    assert spills and all(int(n) == 0 for n in spills), f"{what}: {report}"


@needs_compiler
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("compute_capability", [80, 90])
def test_every_candidate_builds_without_spills(variant, compute_capability, tmp_path):
    for config in candidates(variant, compute_capability):
        source = kernel_source(config, variant)
        report = _build(source.code, source.arch if config.kernel == "wgmma" else f"sm_{compute_capability}", tmp_path)
        _assert_no_spills(report, config.name)


@needs_compiler
@pytest.mark.parametrize("rule", [RoutingRule(256, 8, "sigmoid", True, 8, 4, True),
                                  RoutingRule(72, 6, "softmax", False, 0, 0, False)], ids=["deepseek-v3", "plain"])
def test_select_kernel_builds(rule, tmp_path):
    _assert_no_spills(_build(select_source(rule), "sm_90", tmp_path), "select_experts")


@needs_compiler
@pytest.mark.parametrize("top_k", [1, 8, 32])
def test_pairs_kernels_build(top_k, tmp_path):
    _assert_no_spills(_build(pairs_source(top_k), "sm_90", tmp_path), f"pairs, k={top_k}")


@needs_compiler
def test_expert_grads_kernels_build(tmp_path):
    _assert_no_spills(_build(expert_grads_source(), "sm_90", tmp_path), "expert_grads")


def test_candidates_fit_shared_memory():
    from xmoe.kernels.gemm import wgmma

    for variant in VARIANTS:
        for config in candidates(variant, 90):
            assert kernel_source(config, variant).smem_bytes(1023) <= wgmma.SMEM_LIMIT


@needs_compiler
@pytest.mark.parametrize("scope", ["gpu", "sys"])
def test_low_latency_kernels_build(scope, tmp_path):
    from xmoe.kernels.low_latency_cuda import source

    _assert_no_spills(_build(source(scope), "sm_90", tmp_path), f"low-latency dispatch and combine, {scope} scope")
