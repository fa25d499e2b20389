"""One MoE layer across ranks with JAX arrays (the forward pass).

    python examples/moe_jax.py                                    # a world of one
    torchrun --nproc_per_node=2 examples/moe_jax.py               # 2 ranks on GPUs
    mpirun -n 2 python examples/moe_jax.py                        # 2 ranks on the CPU simulator

Each rank holds its share of the experts as ``jax.numpy`` bfloat16 arrays, draws its own
tokens and calls ``xmoe.moe``, which takes and returns JAX arrays through DLPack (on the GPU
without a copy). Rank 0 prints how far each rank's output is from the layer computed
densely in NumPy. xmoe has no JAX autodiff rule yet: training goes through ``xmoe.nn``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to NVSHMEM

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import xmoe  # noqa: E402
from xmoe.interop import BFLOAT16  # noqa: E402


def run(group: xmoe.Group | None = None, tokens: int = 16, hidden: int = 64, ffn: int = 32, experts: int = 8,
        top_k: int = 2) -> float:
    """The layer once on every rank of ``group`` (None: a world of one); the largest difference
    from the reference over the ranks."""
    jax.config.update("jax_enable_x64", True)  # the router's top-k ids are int64, as in DeepEP
    me, ranks = (group.rank, group.world_size) if group is not None else (0, 1)
    rng = np.random.default_rng(0)  # the same weights on every rank
    w_router = rng.standard_normal((hidden, experts)).astype(BFLOAT16)
    w_up = (rng.standard_normal((experts, 2 * ffn, hidden)) / np.sqrt(hidden)).astype(BFLOAT16)
    w_down = (rng.standard_normal((experts, hidden, ffn)) / np.sqrt(ffn)).astype(BFLOAT16)
    xs = [np.random.default_rng(1 + r).standard_normal((tokens + r, hidden)).astype(BFLOAT16) for r in range(ranks)]
    mine = slice(me * experts // ranks, (me + 1) * experts // ranks)
    y = xmoe.moe(jnp.asarray(xs[me]), jnp.asarray(w_router), jnp.asarray(w_up[mine]), jnp.asarray(w_down[mine]), top_k,
                 group=group)
    assert isinstance(y, type(jnp.asarray(xs[me]))) and y.dtype == jnp.bfloat16
    want = xmoe.reference.moe(xs, w_router, w_up, w_down, top_k)[me]
    error = float(np.abs(np.asarray(y, np.float32) - want.astype(np.float32)).max())
    errors = group.allgather(error) if group is not None else [error]
    if me == 0:
        print(f"xmoe.moe with JAX arrays on {ranks} rank(s): largest difference from the dense NumPy layer per "
              f"rank {[round(e, 4) for e in errors]}")
    return max(errors)


if __name__ == "__main__":
    world = xmoe.init()
    run(world if world.world_size > 1 else None)
