"""xmoe: expert-parallel Mixture-of-Experts dispatch and combine with Python kernels.

Public API::

    group = xmoe.init()                       # mpirun, torchrun or a single process
    buffer = xmoe.Buffer(group, num_nvl_bytes)
    buffer.get_dispatch_layout(...); buffer.dispatch(...); buffer.combine(...)

Importing xmoe does not import Numba: the backend (CUDA or the CPU simulator) is fixed
by ``xmoe.init()``, and the kernels load on first use.
"""

from __future__ import annotations

from typing import Any

from xmoe.config import Config
from xmoe.event import EventOverlap
from xmoe.runtime import Group, finalize, get_group, init, is_initialized

__version__ = "0.1.0"

_LAZY = {"Buffer": "xmoe.buffer", "DispatchHandle": "xmoe.buffer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        get_group()  # the kernels need the backend that init() fixes
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xmoe' has no attribute {name!r}")


__all__ = ["Buffer", "Config", "DispatchHandle", "EventOverlap", "Group", "finalize", "get_group", "init", "is_initialized"]
