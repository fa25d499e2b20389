"""Random routing for tests, benchmarks and the demo: the same inputs on every rank.

Every rank draws the inputs of *all* ranks from one seed, keeps its own, and can run
the NumPy reference for any rank without communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xmoe.interop import BFLOAT16

#: Routing patterns: ``random`` (masked slots, some tokens routed nowhere), ``one_rank``
#: (every token to rank 0's experts), ``skip_last`` (the last rank receives nothing).
PATTERNS = ("random", "one_rank", "skip_last")


@dataclass
class Routing:
    """Inputs of every rank: ``x[r]`` ``[tokens_r, hidden]``, ``topk_idx[r]`` int64 ``[tokens_r, k]``,
    ``topk_weights[r]`` float32 ``[tokens_r, k]``."""

    x: list[np.ndarray]
    topk_idx: list[np.ndarray]
    topk_weights: list[np.ndarray]
    num_experts: int


def random_topk(rng: np.random.Generator, num_tokens: int, experts: np.ndarray, num_topk: int) -> np.ndarray:
    """int64 ``[num_tokens, num_topk]``: distinct experts per token drawn from ``experts``."""
    keys = rng.random((num_tokens, experts.size))
    chosen = np.argsort(keys, axis=1)[:, :num_topk]
    return experts[chosen].astype(np.int64)


def make_routing(
    seed: int,
    num_ranks: int,
    tokens: list[int] | int,
    hidden: int,
    num_experts: int,
    num_topk: int,
    dtype: np.dtype | type = BFLOAT16,
    pattern: str = "random",
    mask_prob: float = 0.2,
) -> Routing:
    """Random inputs of every rank (see :data:`PATTERNS`); ``tokens`` per rank or one count for all."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r}: expected one of {PATTERNS}")
    rng = np.random.default_rng(seed)
    counts = [tokens] * num_ranks if isinstance(tokens, int) else list(tokens)
    per_rank = num_experts // num_ranks
    experts = np.arange(num_experts)
    if pattern == "one_rank":
        experts = experts[:per_rank]
    elif pattern == "skip_last":
        experts = experts[: num_experts - per_rank]
    k = min(num_topk, experts.size)
    xs, idxs, weights = [], [], []
    for count in counts:
        xs.append(rng.standard_normal((count, hidden)).astype(np.float32).astype(dtype))
        idx = np.full((count, num_topk), -1, np.int64)
        idx[:, :k] = random_topk(rng, count, experts, k)
        if pattern == "random":
            idx[rng.random(idx.shape) < mask_prob] = -1
            idx[:: 7] = -1  # tokens routed nowhere
        idxs.append(idx)
        weights.append(rng.random((count, num_topk)).astype(np.float32))
    return Routing(xs, idxs, weights, num_experts)


def standard_cases(ranks: int, tokens: int, hidden: int, alignment: int) -> list[dict]:
    """The routing cases every multi-rank suite runs, sized by ``tokens`` per rank: random
    routing with uneven token counts, all tokens to one rank, a rank that receives nothing,
    a rank with no tokens, expert alignment, no top-k, and an odd hidden size (``hidden + 1``).
    Each is a dict of :func:`make_routing` arguments plus ``alignment`` and ``with_topk``."""
    base = dict(hidden=hidden, alignment=1, with_topk=True)
    return [
        dict(base, seed=1, tokens=[tokens // 2 + tokens // (2 * ranks) * r for r in range(ranks)], pattern="random"),
        dict(base, seed=2, tokens=tokens // 2, pattern="one_rank"),
        dict(base, seed=3, tokens=tokens // 2, pattern="skip_last"),
        dict(base, seed=4, tokens=[0] + [tokens // 2] * (ranks - 1), pattern="random"),
        dict(base, seed=5, tokens=tokens, pattern="random", alignment=alignment),
        dict(base, seed=6, tokens=tokens // 2 + 1, pattern="random", with_topk=False),
        dict(base, seed=7, tokens=tokens // 2 + 3, pattern="random", hidden=hidden + 1),
    ]
