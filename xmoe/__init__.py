"""xmoe: expert-parallel Mixture-of-Experts dispatch and combine with Python kernels.

Public API::

    group = xmoe.init()                       # mpirun, torchrun or a single process
    buffer = xmoe.Buffer(group, num_nvl_bytes)
    buffer.get_dispatch_layout(...); buffer.dispatch(...); buffer.combine(...)
    topk_idx, topk_weights, counts = xmoe.router(x, w_router, k)     # expert compute:
    y = xmoe.grouped_gemm(a, w, offs, epilogue="swiglu")              # no init() needed

Importing xmoe does not import Numba: the backend (CUDA or the CPU simulator) is fixed
by ``xmoe.init()``, and the kernels load on first use.
"""

from __future__ import annotations

from typing import Any

from xmoe.config import Config
from xmoe.event import EventOverlap
from xmoe.layer import MoELayer
from xmoe.moe import moe  # bound here: the submodule's import would otherwise shadow a lazy name
from xmoe.fused import fused_moe
from xmoe.runtime import Group, finalize, get_group, init, is_initialized

__version__ = "0.1.0"

#: Loaded on first use, without a process group or a backend (Buffer's module loads no kernels).
_LAZY = {"Buffer": "xmoe.buffer", "DispatchHandle": "xmoe.ep.handle"}
#: Expert compute: no process group needed, only the backend (the default one unless
#: ``init()`` or ``XMOE_BACKEND`` chose it).
_LAZY_COMPUTE = {"grouped_gemm": "xmoe.kernels.gemm", "GemmConfig": "xmoe.kernels.gemm",
                 "router": "xmoe.kernels.router", "router_logits": "xmoe.kernels.router",
                 "select_experts": "xmoe.kernels.router", "quantize_fp8": "xmoe.quant",
                 "dequantize_fp8": "xmoe.quant"}


def __getattr__(name: str) -> Any:
    if name == "topk_idx_t":  # DeepEP's name for topk_idx's dtype
        import torch

        return torch.int64
    if name in _LAZY or name in _LAZY_COMPUTE:
        import importlib

        from xmoe.runtime import ensure_backend

        if name in _LAZY_COMPUTE:
            ensure_backend()
        module = _LAZY.get(name) or _LAZY_COMPUTE[name]
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip this function (it is on every call's path)
        return value
    raise AttributeError(f"module 'xmoe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = ["Buffer", "Config", "DispatchHandle", "EventOverlap", "GemmConfig", "Group", "MoELayer", "dequantize_fp8", "finalize", "fused_moe",
           "get_group", "grouped_gemm", "init", "is_initialized", "moe", "quantize_fp8", "router", "router_logits",
           "select_experts"]
