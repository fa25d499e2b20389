"""One MoE layer across ranks with NumPy arrays on the CPU simulator (any laptop).

    python examples/moe_numpy.py                 # a world of one
    mpirun -n 4 python examples/moe_numpy.py     # 4 ranks (mpirun from the mpich wheel)

Each rank draws its own tokens, holds its share of the experts, and calls ``xmoe.moe``:
the router picks each token's top-2 of 8 experts, dispatch moves the tokens to the ranks
that hold them, the experts run as grouped GEMMs, and combine brings the results home.
Rank 0 prints how far each rank's output is from the layer computed densely in NumPy.
"""

from __future__ import annotations

import numpy as np

import xmoe
from xmoe.interop import BFLOAT16


def run(group: xmoe.Group | None = None, tokens: int = 16, hidden: int = 64, ffn: int = 32, experts: int = 8,
        top_k: int = 2) -> float:
    """Run the layer once on every rank of ``group`` (None: a world of one); return the largest
    difference from the reference."""
    me, ranks = (group.rank, group.world_size) if group is not None else (0, 1)
    rng = np.random.default_rng(0)  # the same weights on every rank
    w_router = rng.standard_normal((hidden, experts)).astype(BFLOAT16)
    w_up = (rng.standard_normal((experts, 2 * ffn, hidden)) / np.sqrt(hidden)).astype(BFLOAT16)
    w_down = (rng.standard_normal((experts, hidden, ffn)) / np.sqrt(ffn)).astype(BFLOAT16)
    xs = [np.random.default_rng(1 + r).standard_normal((tokens + r, hidden)).astype(BFLOAT16) for r in range(ranks)]
    local = experts // ranks
    mine = slice(me * local, (me + 1) * local)
    y = xmoe.moe(xs[me], w_router, w_up[mine], w_down[mine], top_k, group=group)
    want = xmoe.reference.moe(xs, w_router, w_up, w_down, top_k)[me]
    error = float(np.abs(y.astype(np.float32) - want.astype(np.float32)).max())
    errors = group.allgather(error) if group is not None else [error]
    if me == 0:
        print(f"xmoe.moe on {ranks} rank(s), {experts} experts top-{top_k}: largest difference from the dense "
              f"NumPy layer per rank {[round(e, 4) for e in errors]}")
    return max(errors)


if __name__ == "__main__":
    world = xmoe.init()
    run(world if world.world_size > 1 else None)
