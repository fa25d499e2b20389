"""Numba's disk cache across processes: every cached kernel's key is the same in two, and compiles
that read or write the cache hold a machine-wide lock."""

from __future__ import annotations

import os
import subprocess
import sys

#: Runs without a GPU: builds the cuda backend's kernels (no compile) and prints the part of
#: Numba's cache key that hashes each kernel's closure (``Cache._index_key``'s ``cvarbytes``).
KEYS = """
import hashlib
import numpy as np
import xmoe.runtime
xmoe.runtime.select_backend("cuda")
from numba.cuda.serialize import dumps
from xmoe.comm.device import STORE
from xmoe.kernels.combine import combine_kernel
from xmoe.kernels.dispatch import dispatch_kernel
from xmoe.kernels.low_latency import ll_combine_kernel, ll_dispatch_kernel
kernels = {"dispatch": dispatch_kernel(STORE), "ll_dispatch": ll_dispatch_kernel(STORE),
           "ll_combine": ll_combine_kernel(STORE),
           "combine": combine_kernel(STORE, np.dtype(np.float32), np.dtype(np.uint32))}
for name, kernel in sorted(kernels.items()):
    assert kernel._cache.__class__.__name__ != "NullCache", name  # cache=True
    closure = kernel.py_func.__closure__ or ()
    print(name, hashlib.sha256(dumps(tuple(cell.cell_contents for cell in closure))).hexdigest())
"""


def closure_keys() -> str:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", XMOE_BACKEND="cuda")
    return subprocess.run([sys.executable, "-c", KEYS], env=env, capture_output=True, text=True, check=True).stdout


def test_store_kernels_cache_keys_are_stable():
    """An intrinsic pickles with a uuid1 made in each process; one captured by a kernel's device
    functions changed the key every process, so the kernels were compiled again at each start
    (~7.5 s before the first round trip on the H200). comm/device.py fixes their names."""
    first, second = closure_keys(), closure_keys()
    assert len(first.splitlines()) == 4
    assert first == second


class _Cache:
    """Stands in for a Numba cache: counts its flushes."""

    def __init__(self, cache_path) -> None:
        self.cache_path = str(cache_path)
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


class _Kernel:
    """Stands in for a Numba CUDA dispatcher: ``compile`` reports whether another process could
    take xmoe's compile lock while it runs."""

    def __init__(self, cache) -> None:
        self._cache = cache
        self.py_func = closure_keys

    def compile(self, signature):
        import fcntl

        from xmoe.kernels.launch import COMPILE_LOCK

        with open(COMPILE_LOCK, "a") as other:  # another open file description, as another process has
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return "locked"
            fcntl.flock(other, fcntl.LOCK_UN)
            return "free"


def test_cached_compiles_hold_the_machine_lock(tmp_path):
    """Numba's disk cache is not safe when two processes save different signatures of one
    kernel at once (both take the first free data file; the index may then point one signature
    at the other's code): a kernel that caches compiles under the lock, one that does not
    (the put path's, which link NVSHMEM) compiles without waiting for other processes."""
    from numba.cuda.core.caching import NullCache

    from xmoe.kernels.launch import compile_cached

    assert compile_cached(_Kernel(_Cache(tmp_path)), ()) == "locked"
    assert compile_cached(_Kernel(NullCache()), ()) == "free"
    assert compile_cached(_Kernel(_Cache(tmp_path)), ()) == "locked"  # released after the first: no deadlock


def test_cache_emptied_when_device_sources_change(tmp_path):
    """Numba's key does not cover device functions a kernel calls from other modules: the first
    compile after xmoe's device sources changed empties the kernel's cache index, once."""
    from xmoe.kernels.launch import compile_cached, device_sources_hash

    cache = _Cache(tmp_path)
    compile_cached(_Kernel(cache), ())
    compile_cached(_Kernel(cache), ())
    assert cache.flushes == 1  # the first compile found no stamp
    (stamp,) = tmp_path.glob("*.xmoe-sources")
    assert stamp.read_text() == device_sources_hash()
    stamp.write_text("the sources of another version")
    compile_cached(_Kernel(cache), ())
    assert cache.flushes == 2 and stamp.read_text() == device_sources_hash()


STAMP = """
import xmoe.runtime
xmoe.runtime.select_backend("cuda")
from xmoe.comm.device import STORE
from xmoe.kernels.dispatch import dispatch_kernel
from xmoe.kernels.launch import _forget_if_stale
from xmoe.kernels.quant import quantize_kernel
for kernel in (dispatch_kernel(STORE), quantize_kernel):
    _forget_if_stale(kernel)
"""


def test_stale_check_runs_on_numba_dispatchers(tmp_path):
    """The stale check on real Numba CUDA dispatchers (built without a GPU, nothing compiled):
    it finds their caches under NUMBA_CACHE_DIR, empties each index and leaves its stamp."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", XMOE_BACKEND="cuda", NUMBA_CACHE_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", STAMP], env=env, capture_output=True, text=True, check=True)
    stamps = sorted(p.name for p in tmp_path.rglob("*.xmoe-sources"))
    indexes = sorted(p.name for p in tmp_path.rglob("*.nbi"))
    assert len(stamps) == 2 and len(indexes) == 2, (stamps, indexes)
