"""Expert-compute checks shared by the CPU and GPU suites: fresh random inputs, the
kernel's result (outputs poisoned first under ``XMOE_POISON``) against the NumPy reference,
every element of every written row."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from xmoe import reference
from xmoe.interop import BFLOAT16

#: |got - want| <= ATOL + RTOL * |want|: bfloat16 outputs are rounded once (2^-8
#: relative); fp32 outputs differ from the reference only by the order of the K sums.
TOLERANCE = {"bfloat16": (1e-3, 2.0**-7), "float32": (1e-4, 1e-4)}


def group_sizes(rng: np.random.Generator, rows: int, groups: int, pattern: str) -> np.ndarray:
    """Rows per group summing to ``rows``: "random" (some empty), "zipf" (skewed),
    "balanced", or "one" (everything in the last group)."""
    if pattern == "balanced":
        sizes = np.full(groups, rows // groups)
        sizes[: rows % groups] += 1
    elif pattern == "one":
        sizes = np.zeros(groups, np.int64)
        sizes[-1] = rows
    else:
        weights = 1.0 / np.arange(1, groups + 1) ** 1.2 if pattern == "zipf" else rng.random(groups)
        if pattern == "random":
            weights[rng.random(groups) < 0.2] = 0.0  # empty groups
            weights[0] = weights[0] or 1.0
        sizes = np.floor(weights / weights.sum() * rows).astype(np.int64)
        sizes[int(np.argmax(weights))] += rows - sizes.sum()
    return sizes


def check_grouped_gemm(
    to_device: Callable[[np.ndarray], Any],
    to_host: Callable[[Any], np.ndarray],
    seed: int,
    rows: int,
    n: int,
    k: int,
    groups: int,
    pattern: str = "random",
    epilogue: str = "none",
    row_weights: bool = False,
    w_layout: str = "nk",
    out_dtype: str = "bfloat16",
    config: Any = None,
    spare_rows: int = 0,
) -> None:
    """One grouped GEMM against the reference; ``spare_rows`` rows of ``a`` past the last group."""
    import xmoe

    rng = np.random.default_rng(seed)
    sizes = group_sizes(rng, rows, groups, pattern)
    offs = np.cumsum(sizes).astype(np.int32)
    a = rng.standard_normal((rows + spare_rows, k)).astype(BFLOAT16)
    width = 2 * n if epilogue == "swiglu" else n
    shape = (groups, width, k) if w_layout == "nk" else (groups, k, width)
    w = (rng.standard_normal(shape) / np.sqrt(k)).astype(BFLOAT16)
    weights = rng.random(rows + spare_rows).astype(np.float32) if row_weights else None
    got = xmoe.grouped_gemm(to_device(a), to_device(w), to_device(offs), epilogue=epilogue,
                            row_weights=None if weights is None else to_device(weights), w_layout=w_layout,
                            out_dtype=out_dtype, config=config)
    got = to_host(got).astype(np.float32)[:rows]
    want = reference.grouped_gemm(a, w, offs, "row_scale" if row_weights else epilogue, weights, w_layout)[:rows]
    atol, rtol = TOLERANCE[out_dtype]
    bad = ~(np.abs(got - want) <= atol + rtol * np.abs(want))  # poison (-1.7e38) and NaN count as bad
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise AssertionError(f"{int(bad.sum())} of {bad.size} elements differ (sizes {sizes.tolist()}); first at "
                             f"[{r}, {c}]: got {got[r, c]}, want {want[r, c]}")


def separated_logits(rng: np.random.Generator, tokens: int, experts: int, ties: bool = False) -> np.ndarray:
    """Logits whose scores differ by far more than rounding (a permutation of a spaced grid),
    so any correct kernel picks the reference's experts; ``ties``: pairs of equal logits."""
    grid = np.arange(experts, dtype=np.float32) * np.float32(8.0 / experts) - 4.0
    if ties:
        grid = grid[::2].repeat(2)[:experts]
    return np.stack([rng.permutation(grid) for _ in range(tokens)]).astype(np.float32)


def check_select_experts(
    to_device: Callable[[np.ndarray], Any],
    to_host: Callable[[Any], np.ndarray],
    seed: int,
    tokens: int,
    experts: int,
    num_topk: int,
    ties: bool = False,
    with_bias: bool = False,
    **rule: Any,
) -> None:
    """Selection against the reference: indices and counts exactly, weights to 1e-5."""
    import xmoe

    rng = np.random.default_rng(seed)
    logits = separated_logits(rng, tokens, experts, ties)
    # Whole-number biases order experts by bias first (scores lie in (0, 1)), so biased
    # choices are as well separated as the scores.
    bias = rng.integers(-2, 3, experts).astype(np.float32) if with_bias else None
    choice = np.sort(reference.expert_scores(logits, rule.get("scoring", "softmax")) + (0 if bias is None else bias),
                     axis=1)
    relative_gaps = np.diff(choice, axis=1) / np.abs(choice[:, 1:])
    if not ties and relative_gaps.min() < 1e-5:  # rounding could flip a near-tie: not a fair test
        raise ValueError(f"seed {seed}: choice scores closer than 1e-5 (relative), pick another seed")
    got = xmoe.select_experts(to_device(logits), num_topk, bias=None if bias is None else to_device(bias), **rule)
    idx, weights, counts = (to_host(value) for value in got)
    want_idx, want_weights, want_counts = reference.select_experts(
        logits, num_topk, rule.get("scoring", "softmax"), bias, rule.get("n_group"), rule.get("topk_group"),
        rule.get("renormalize", False), rule.get("scaling", 1.0))
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-6)
