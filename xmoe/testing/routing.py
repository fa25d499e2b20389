"""Routing cases for tests and benchmarks, built on the demo's random routing
(:mod:`xmoe.demo`, re-exported here): the same inputs on every rank."""

from __future__ import annotations

from xmoe.demo import Routing, make_routing

__all__ = ["Routing", "make_routing", "standard_cases"]


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
