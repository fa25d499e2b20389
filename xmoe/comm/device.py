"""Device functions that kernels call to talk to peers: signals, waits, clocks, fences.

Payload stores are plain indexed stores into peer views (tuples of arrays indexed by
rank); this module holds what differs between the GPU and Numba's CUDA simulator:
the clock and the back-off of a bounded spin. Under the simulator a "device function"
is ordinary Python running in a simulated thread, so the clock is the host's.
"""

from __future__ import annotations

import numpy as np
from numba import cuda
from numba.cuda.core import config

SIMULATOR = bool(config.ENABLE_CUDASIM)

# Error codes a wait leaves in a kernel's error array: 0 = fine, otherwise
# ERR_TIMEOUT + peer (no signal from that peer) or ERR_MISMATCH + peer (the peer's
# call did not match this rank's: other hidden size, top-k or expert count).
ERR_TIMEOUT = 1 << 20
ERR_MISMATCH = 2 << 20

if SIMULATOR:
    import time

    def now_ns() -> int:
        return time.monotonic_ns()

    def backoff() -> None:
        time.sleep(20e-6)  # let the other simulated threads and ranks run

else:
    from llvmlite import ir
    from numba.cuda import types
    from numba.cuda.cgutils import get_or_insert_function
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _globaltimer(typingctx):
        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(ir.IntType(64), [])
            fn = get_or_insert_function(builder.module, fnty, "llvm.nvvm.read.ptx.sreg.globaltimer")
            return builder.call(fn, [])

        return types.uint64(), codegen

    @cuda.jit(device=True, inline=True)
    def now_ns():
        return np.int64(_globaltimer())

    @cuda.jit(device=True, inline=True)
    def backoff():
        cuda.nanosleep(64)


@cuda.jit(device=True)
def wait_signal(signals, peer, expected, timeout_ns):
    """Spin until ``signals[peer] == expected``; False after ``timeout_ns``."""
    start = now_ns()
    while cuda.atomic.add(signals, peer, 0) != expected:
        if now_ns() - start > timeout_ns:
            return False
        backoff()
    return True


@cuda.jit(device=True)
def raise_signal(peer_signals, source, value):
    """Make this thread's earlier stores visible system-wide, then publish ``value``."""
    cuda.threadfence_system()
    cuda.atomic.exch(peer_signals, source, value)


@cuda.jit(device=True)
def record_error(errors, code):
    """Keep the first error code a kernel reports in ``errors[0]``."""
    cuda.atomic.cas(errors, 0, 0, code)


@cuda.jit(device=True)
def last_block_done(done_counter, flag):
    """Count this block as finished; True in every thread of the block that finishes last.

    Every thread must have fenced its stores before calling. ``flag`` is a shared int32
    array of one element; the counter is reset by the last block for the next launch.
    """
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        flag[0] = 0
        if cuda.atomic.add(done_counter, 0, 1) == cuda.gridDim.x - 1:
            done_counter[0] = 0
            flag[0] = 1
    cuda.syncthreads()
    return flag[0] == 1
