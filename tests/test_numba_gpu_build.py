"""The low-latency mode's Numba kernels (the simulator's and the put path's twin of the CUDA C
ones) compiled for sm_90 with the argument types of real calls, on a machine with no GPU.

On a GPU the store path runs the CUDA C kernels, so these compile there only for the put
path; the simulator types nothing, so an error that only Numba's CUDA target raises (a
``shared.array`` of a non-literal size, say) would otherwise first show on the device. The
argument types are recorded from a world-of-one dispatch and combine on the simulator and
handed to a process that compiles the kernels to PTX with NVVM (no driver needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.sim

#: Run in a fresh process (Numba's CUDA target, not the simulator): compile each recorded kernel.
COMPILE = textwrap.dedent("""
    import json, sys, types as pytypes
    import numpy as np
    import numba.cuda.dispatcher
    from numba import cuda, types
    from numba.np.numpy_support import from_dtype

    # device functions ask the current device for its compute capability; there is none here
    numba.cuda.dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))
    from xmoe.comm.device import STORE
    from xmoe.kernels.low_latency import ll_combine_kernel, ll_dispatch_kernel

    kernels = {"dispatch": ll_dispatch_kernel(STORE), "combine": ll_combine_kernel(STORE)}
    for name, params in json.load(open(sys.argv[1])).items():
        signature = tuple(types.int64 if p is None else types.Array(from_dtype(np.dtype(p[0])), p[1], p[2])
                          for p in params)
        cuda.compile_ptx(kernels[name].py_func, signature, cc=(9, 0))
        print(name, "compiled")
""")


def argument_type(value) -> list | None:
    """What Numba's dispatcher would type ``value`` as: (dtype, ndim, layout) of an array, None for an int."""
    if isinstance(value, (bool, int, np.integer)):
        return None
    array = np.asarray(value)
    return [array.dtype.str, array.ndim, "C" if array.flags.c_contiguous else "A"]


def test_low_latency_numba_kernels_compile_for_the_gpu(group, tmp_path, monkeypatch):
    import xmoe
    import xmoe.ep.low_latency
    from xmoe.kernels.launch import ordered
    from xmoe.testing.low_latency import HIDDEN, MAX_TOKENS, check_combine, check_dispatch, make_inputs

    recorded = {}
    original = xmoe.ep.low_latency.Prepared

    def recording(kernel, blocks, threads, args, per_call, spins=False):
        recorded[kernel.py_func.__name__] = [argument_type(v) for v in ordered(kernel, args)]
        return original(kernel, blocks, threads, args, per_call, spins)

    monkeypatch.setattr(xmoe.ep.low_latency, "Prepared", recording)
    num_experts = 4
    buffer = xmoe.Buffer(group, 0, xmoe.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, 1, num_experts),
                         low_latency_mode=True)
    xs, idxs, weights = make_inputs(7, 1, num_experts)
    received, handle = check_dispatch(buffer, group, xs, idxs, num_experts, use_fp8=True)
    check_combine(buffer, group, received, handle, idxs, weights, num_experts)
    buffer.destroy()
    assert sorted(recorded) == ["combine", "dispatch"]

    path = tmp_path / "signatures.json"
    path.write_text(json.dumps(recorded))
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "XMOE_BACKEND")}
    done = subprocess.run([sys.executable, "-c", COMPILE, str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(done.stdout.split()) == ["combine", "compiled", "compiled", "dispatch"]
