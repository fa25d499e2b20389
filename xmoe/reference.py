"""NumPy oracles for every xmoe kernel: the ground truth of the tests.

They take the inputs of *all* ranks (lists indexed by rank) and return what each rank
must get, so one process can check any rank's result. Arithmetic is fp32, summed in
rank order, then rounded to the payload dtype (round to nearest even, as ml_dtypes).
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_dtypes
import numpy as np


def dispatch_layout(topk_idx: np.ndarray, num_experts: int, num_ranks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens per rank / per expert and token-in-rank flags of one rank's routing.

    Args:
        topk_idx: int64 ``[tokens, k]``, expert ids, ``-1`` for a masked slot.
        num_experts: experts in total, split evenly and in order across ranks.
        num_ranks: ranks.

    Returns:
        ``num_tokens_per_rank`` int32 ``[ranks]``, ``num_tokens_per_expert`` int32
        ``[experts]`` (one count per top-k slot naming the expert), ``is_token_in_rank``
        bool ``[tokens, ranks]``.
    """
    experts_per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    per_expert = np.bincount(topk_idx[valid].ravel(), minlength=num_experts).astype(np.int32)
    in_rank = np.zeros((topk_idx.shape[0], num_ranks), dtype=bool)
    rows, _ = np.nonzero(valid)
    in_rank[rows, topk_idx[valid] // experts_per_rank] = True
    return in_rank.sum(axis=0).astype(np.int32), per_expert, in_rank


def send_slots(is_token_in_rank: np.ndarray) -> np.ndarray:
    """Slot of each token in each destination's region: int32 ``[tokens, ranks]``, -1 if not sent."""
    slots = np.cumsum(is_token_in_rank, axis=0, dtype=np.int32) - 1
    return np.where(is_token_in_rank, slots, -1).astype(np.int32)


def rank_prefix_matrix(is_token_in_rank: Sequence[np.ndarray]) -> np.ndarray:
    """int32 ``[ranks, ranks]``: entry ``[i][j]`` = tokens sent to rank j by ranks 0..i."""
    counts = np.stack([m.sum(axis=0) for m in is_token_in_rank])
    return np.cumsum(counts, axis=0).astype(np.int32)


def dispatch(
    xs: Sequence[np.ndarray],
    topk_idx: Sequence[np.ndarray],
    topk_weights: Sequence[np.ndarray] | None,
    num_experts: int,
    expert_alignment: int = 1,
) -> list[dict[str, Any]]:
    """What each rank receives from a dispatch.

    Args:
        xs: per rank, ``[tokens_r, hidden]`` payload (any dtype; moved bit for bit).
        topk_idx: per rank, int64 ``[tokens_r, k]``.
        topk_weights: per rank, float32 ``[tokens_r, k]``, or None.
        num_experts: experts in total.
        expert_alignment: the per-expert counts are rounded up to a multiple of it.

    Returns:
        per rank a dict: ``recv_x`` ``[recv, hidden]``, ``recv_topk_idx`` int64 ``[recv, k]``
        (local expert ids, -1 elsewhere), ``recv_topk_weights`` float32 (0 where -1),
        ``recv_src_idx`` int32 ``[recv]``, ``num_recv_tokens_per_expert_list``,
        ``rank_prefix_matrix`` int32 ``[ranks, ranks]``.
    """
    num_ranks = len(xs)
    per_rank = num_experts // num_ranks
    layouts = [dispatch_layout(idx, num_experts, num_ranks) for idx in topk_idx]
    prefix = rank_prefix_matrix([layout[2] for layout in layouts])
    results = []
    for dst in range(num_ranks):
        rows_x, rows_idx, rows_w, rows_src = [], [], [], []
        per_expert = np.zeros(per_rank, dtype=np.int64)
        for src in range(num_ranks):
            tokens = np.nonzero(layouts[src][2][:, dst])[0]
            per_expert += layouts[src][1][dst * per_rank : (dst + 1) * per_rank]
            rows_x.append(xs[src][tokens])
            rows_src.append(tokens.astype(np.int32))
            local = topk_idx[src][tokens] - dst * per_rank
            local = np.where((local >= 0) & (local < per_rank) & (topk_idx[src][tokens] >= 0), local, -1)
            rows_idx.append(local.astype(np.int64))
            if topk_weights is not None:
                rows_w.append(np.where(local >= 0, topk_weights[src][tokens], 0).astype(np.float32))
        padded = -(-per_expert // expert_alignment) * expert_alignment
        results.append(
            {
                "recv_x": np.concatenate(rows_x),
                "recv_topk_idx": np.concatenate(rows_idx),
                "recv_topk_weights": np.concatenate(rows_w) if topk_weights is not None else None,
                "recv_src_idx": np.concatenate(rows_src),
                "num_recv_tokens_per_expert_list": [int(c) for c in padded],
                "rank_prefix_matrix": prefix,
            }
        )
    return results


def quantize_fp8(x: np.ndarray, round_scale: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """bfloat16 ``[tokens, hidden]`` -> (float8_e4m3fn ``[tokens, hidden]``, float32 scales
    ``[tokens, hidden / 128]``): scale = max(amax, 1e-4) / 448 per token and 128 channels (rounded
    up to a power of two with ``round_scale``), values ``x * (1 / scale)`` rounded to nearest."""
    tokens, hidden = x.shape
    groups = x.astype(np.float32).reshape(tokens, hidden // 128, 128)
    amax = np.maximum(np.abs(groups).max(axis=2), np.float32(1e-4))
    scales = (amax / np.float32(448.0)).astype(np.float32)
    if round_scale:
        bits = scales.view(np.uint32)
        scales = np.where(bits & 0x7FFFFF, (bits & 0xFF800000) + 0x800000, bits).astype(np.uint32).view(np.float32)
    inverse = (np.float32(1.0) / scales).astype(np.float32)
    values = (groups * inverse[:, :, None]).astype(np.float32)
    return values.astype(ml_dtypes.float8_e4m3fn).reshape(tokens, hidden), scales


def dequantize_fp8(x_fp8: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float8_e4m3fn ``[tokens, hidden]`` and float32 ``[tokens, hidden / 128]`` scales -> bfloat16."""
    values = x_fp8.astype(np.float32) * np.repeat(scales, 128, axis=1)
    return values.astype(np.float32).astype(ml_dtypes.bfloat16)


def round_to(values: np.ndarray, dtype: Any) -> np.ndarray:
    """fp32 ``values`` rounded to ``dtype`` (round to nearest even for bfloat16)."""
    return values.astype(np.float32).astype(dtype)


def combine(
    recv_xs: Sequence[np.ndarray],
    is_token_in_rank: Sequence[np.ndarray],
    recv_topk_weights: Sequence[np.ndarray] | None = None,
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """What each rank gets back from a combine.

    Args:
        recv_xs: per rank, ``[recv_r, hidden]`` rows in the order dispatch delivered them.
        is_token_in_rank: per rank, bool ``[tokens_r, ranks]`` of the dispatch.
        recv_topk_weights: per rank, float32 ``[recv_r, k]``, or None.

    Returns:
        per rank ``(combined_x [tokens_r, hidden], combined_topk_weights [tokens_r, k] or None)``:
        each token's rows summed in fp32 in rank order, rounded to the payload dtype.
    """
    num_ranks = len(recv_xs)
    prefix = rank_prefix_matrix(is_token_in_rank)
    slots = [send_slots(m) for m in is_token_in_rank]
    results = []
    for src in range(num_ranks):
        tokens = is_token_in_rank[src].shape[0]
        acc = np.zeros((tokens, recv_xs[0].shape[1]), dtype=np.float32)
        acc_w = None if recv_topk_weights is None else np.zeros((tokens, recv_topk_weights[0].shape[1]), np.float32)
        for r in range(num_ranks):
            sent = np.nonzero(slots[src][:, r] >= 0)[0]
            rows = (prefix[src - 1, r] if src > 0 else 0) + slots[src][sent, r]
            acc[sent] += recv_xs[r][rows].astype(np.float32)
            if acc_w is not None:
                acc_w[sent] += recv_topk_weights[r][rows].astype(np.float32)
        results.append((round_to(acc, recv_xs[0].dtype), acc_w))
    return results


def grouped_gemm(
    a: np.ndarray,
    w: np.ndarray,
    offs: np.ndarray,
    epilogue: str = "none",
    row_weights: np.ndarray | None = None,
    w_layout: str = "nk",
) -> np.ndarray:
    """``out[rows of g] = epilogue(a[rows of g] @ w[g]^T)`` in fp32 (not rounded).

    Args:
        a: ``[M, K]``; rows ``offs[g-1]:offs[g]`` belong to group g (``offs[-1]`` = 0).
        w: ``[G, N_b, K]`` ("nk") or ``[G, K, N_b]`` ("kn"); ``N_b = 2 N`` for SwiGLU (gate
            rows, then up rows), else N.
        offs: int ``[G]``, cumulative end row of each group (as ``torch._grouped_mm``).
        epilogue: "none", "swiglu" (``silu(gate) * up``) or "row_scale" (times ``row_weights``).
        row_weights: float32 ``[M]`` for "row_scale".

    Returns:
        float32 ``[M, N]``; rows at or past ``offs[-1]`` are zero.
    """
    weights = w.astype(np.float32) if w_layout == "kn" else np.swapaxes(w.astype(np.float32), 1, 2)
    width = weights.shape[2] // (2 if epilogue == "swiglu" else 1)
    out = np.zeros((a.shape[0], width), np.float32)
    start = 0
    for g, end in enumerate(np.asarray(offs, dtype=np.int64)):
        rows = a[start:end].astype(np.float32) @ weights[g]
        if epilogue == "swiglu":
            gate, up = rows[:, :width], rows[:, width:]
            rows = gate / (1.0 + np.exp(-gate)) * up
        elif epilogue == "row_scale":
            rows = rows * row_weights[start:end, None]
        out[start:end] = rows
        start = end
    return out


def gather_pairs(rows: np.ndarray, topk_idx: np.ndarray, topk_weights: np.ndarray,
                 num_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The (row, expert) pairs of ``rows`` laid out expert by expert, rows in order within one.

    Args:
        rows: ``[rows, hidden]`` (any dtype); topk_idx: int ``[rows, k]``, experts in
            ``[0, num_groups)``, -1: none; topk_weights: float32 ``[rows, k]``.

    Returns:
        ``(pair rows [pairs, hidden], pair weights float32 [pairs], row of each pair int32
        [pairs], slot int32 [rows, k]`` (the pair of (row, j), -1 for none), ``offs int32
        [num_groups]`` (cumulative ends)).
    """
    flat = topk_idx.reshape(-1)
    valid = flat >= 0
    order = np.argsort(np.where(valid, flat, num_groups), kind="stable")[:int(valid.sum())]
    slot = np.full(flat.shape, -1, np.int32)
    slot[order] = np.arange(len(order), dtype=np.int32)
    row_of = (order // topk_idx.shape[1]).astype(np.int32)
    offs = np.cumsum(np.bincount(flat[valid], minlength=num_groups)).astype(np.int32)
    return (rows[row_of], topk_weights.reshape(-1)[order].astype(np.float32), row_of,
            slot.reshape(topk_idx.shape), offs)


def sum_pairs(pair_out: np.ndarray, slot: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bits (uint16) ``[rows, hidden]``: row r's pair outputs ``pair_out[slot[r, j]]``
    (bfloat16 bits ``[pairs, hidden]``; slots -1 skipped) summed in float32 in slot order, plus
    ``extra[r]`` (float32) when given, rounded to bfloat16 once."""
    values = pair_out.view(ml_dtypes.bfloat16).astype(np.float32)
    out = np.zeros((slot.shape[0], pair_out.shape[1]), np.float32) if extra is None else extra.astype(np.float32)
    for j in range(slot.shape[1]):
        hit = slot[:, j] >= 0
        out[hit] += values[slot[hit, j]]
    return out.astype(ml_dtypes.bfloat16).view(np.uint16)


def pair_grads(grad: np.ndarray, row_of: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(grad[row_of], bfloat16(grad[row_of] * weights[:, None]))``: bfloat16 bits (uint16)
    ``[pairs, hidden]`` each, of ``grad`` bfloat16 bits ``[rows, hidden]``, ``row_of`` int ``[pairs]``,
    ``weights`` float32 ``[pairs]`` (the product in float32, rounded once)."""
    rows = grad[row_of]
    weighted = rows.view(ml_dtypes.bfloat16).astype(np.float32) * weights[:, None].astype(np.float32)
    return rows, weighted.astype(ml_dtypes.bfloat16).view(np.uint16)


def swiglu_backward(g: np.ndarray, gu: np.ndarray, h: np.ndarray,
                    weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The gradients of a weighted SwiGLU expert's up projection and of its pairs' weights.

    ``g`` float32 ``[pairs, ffn]`` (the output gradient times ``W_down``), ``gu`` bfloat16 bits
    ``[pairs, 2 * ffn]`` (gate, then up), ``h`` bfloat16 bits ``[pairs, ffn]`` (``silu(gate) * up``),
    ``weights`` float32 ``[pairs]``. Returns ``(d(gu)`` bfloat16 bits ``[pairs, 2 * ffn]`` of
    ``dh = weights * g``, ``sum(g * h)`` float32 ``[pairs])``, computed in float32.
    """
    ffn = g.shape[1]
    values = gu.view(ml_dtypes.bfloat16).astype(np.float32)
    gate, up = values[:, :ffn], values[:, ffn:]
    with np.errstate(over="ignore"):  # exp(-gate) of a very negative gate: inf, sigma 0
        sigma = 1.0 / (1.0 + np.exp(-gate))
    dh = g.astype(np.float32) * weights[:, None].astype(np.float32)
    grad_gu = np.concatenate([dh * up * sigma * (1.0 + gate * (1.0 - sigma)), dh * gate * sigma], axis=1)
    grad_weights = (g.astype(np.float32) * h.view(ml_dtypes.bfloat16).astype(np.float32)).sum(axis=1)
    return grad_gu.astype(ml_dtypes.bfloat16).view(np.uint16), grad_weights.astype(np.float32)


def expert_scores(logits: np.ndarray, scoring: str) -> np.ndarray:
    """float32 ``[tokens, experts]``: softmax over each row, or the sigmoid of each logit."""
    logits = logits.astype(np.float32)
    if scoring == "softmax":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


def select_experts(
    logits: np.ndarray,
    num_topk: int,
    scoring: str = "softmax",
    bias: np.ndarray | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    renormalize: bool = False,
    scaling: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k expert selection from router logits, as vLLM's ``grouped_topk`` / DeepSeek-V3.

    Args:
        logits: float32 ``[tokens, experts]``.
        num_topk: experts per token.
        scoring: "softmax" or "sigmoid" of the logits gives each expert's score.
        bias: float32 ``[experts]`` added to the scores for the choice only (the weights are
            the unbiased scores), or None.
        n_group, topk_group: group-limited routing: experts form ``n_group`` equal groups in
            order; a group's score is the sum of its two best choice scores with a bias, its
            best score without; only the ``topk_group`` best groups are eligible.
        renormalize: divide the k weights by their sum.
        scaling: multiply the weights by it (DeepSeek-V3's ``routed_scaling_factor``).

    Returns:
        ``topk_idx`` int64 ``[tokens, k]`` (best first, ties to the lower expert id),
        ``topk_weights`` float32 ``[tokens, k]``, ``num_tokens_per_expert`` int32 ``[experts]``.
    """
    tokens, experts = logits.shape
    scores = expert_scores(logits, scoring)
    choice = scores + bias[None, :].astype(np.float32) if bias is not None else scores.copy()
    if n_group:
        grouped = choice.reshape(tokens, n_group, experts // n_group)
        if bias is not None:
            group_scores = -np.sort(-grouped, axis=2)[:, :, :2].sum(axis=2)
        else:
            group_scores = grouped.max(axis=2)
        chosen_groups = np.argsort(-group_scores, axis=1, kind="stable")[:, :topk_group]
        allowed = np.zeros((tokens, n_group), dtype=bool)
        np.put_along_axis(allowed, chosen_groups, True, axis=1)
        choice = np.where(np.repeat(allowed, experts // n_group, axis=1), choice, -np.inf)
    topk_idx = np.argsort(-choice, axis=1, kind="stable")[:, :num_topk]
    topk_weights = np.take_along_axis(scores, topk_idx, axis=1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(axis=1, keepdims=True)
    topk_weights = (topk_weights * np.float32(scaling)).astype(np.float32)
    counts = np.bincount(topk_idx.ravel(), minlength=experts).astype(np.int32)
    return topk_idx.astype(np.int64), topk_weights, counts


def low_latency_dispatch(xs: Sequence[np.ndarray], topk_idx: Sequence[np.ndarray],
                         num_experts: int) -> list[dict[str, Any]]:
    """What each rank receives from a low-latency dispatch (``layout/low_latency.py``).

    Args:
        xs: per rank, ``[tokens_r, hidden]`` rows (any dtype; moved bit for bit).
        topk_idx: per rank, int64 ``[tokens_r, k]`` (-1: none).
        num_experts: experts in total.

    Returns:
        per rank a dict: ``rows`` (per local expert ``[count, hidden]``, source after source, each
        source's in the order of its ``topk_idx`` entries, row-major), ``src_info`` (per local
        expert int32 ``[count]``), ``layout_range`` int64 ``[local experts, ranks]`` (first row << 32 |
        rows), ``count`` int32 ``[local experts]``.
    """
    ranks = len(xs)
    local = num_experts // ranks
    results = []
    for me in range(ranks):
        rows, src_info = [], []
        layout_range = np.zeros((local, ranks), np.int64)
        for e in range(local):
            expert_rows, expert_src, first = [], [], 0
            for src in range(ranks):
                tokens = [t for t, k in zip(*np.nonzero(topk_idx[src] == me * local + e))]  # row-major
                layout_range[e, src] = (first << 32) | len(tokens)
                first += len(tokens)
                expert_rows += [xs[src][t] for t in tokens]
                expert_src += tokens
            rows.append(np.array(expert_rows, xs[0].dtype).reshape(len(expert_rows), xs[0].shape[1]))
            src_info.append(np.array(expert_src, np.int32))
        results.append(dict(rows=rows, src_info=src_info, layout_range=layout_range,
                            count=np.array([len(s) for s in src_info], np.int32)))
    return results


def low_latency_combine(expert_rows: Sequence[Sequence[np.ndarray]], topk_idx: Sequence[np.ndarray],
                        topk_weights: Sequence[np.ndarray], num_experts: int) -> list[np.ndarray]:
    """What each rank gets back from a low-latency combine.

    Args:
        expert_rows: per rank, per local expert, the expert's output rows ``[count, hidden]`` in the
            order :func:`low_latency_dispatch` received them.
        topk_idx / topk_weights: per rank, int64 / float32 ``[tokens_r, k]`` of the dispatch.

    Returns:
        per rank, bfloat16 ``[tokens_r, hidden]``: each token's sum over k, in float32 and in k order,
        of ``weight * row``; a masked id adds nothing.
    """
    ranks = len(expert_rows)
    local = num_experts // ranks
    rows_of = {}  # (source rank, token, global expert) -> row, from the dispatch's order
    for owner in range(ranks):
        for e in range(local):
            expert = owner * local + e
            position = 0
            for src in range(ranks):
                for t, _ in zip(*np.nonzero(topk_idx[src] == expert)):
                    rows_of[(src, t, expert)] = expert_rows[owner][e][position]
                    position += 1
    results = []
    for me, idx in enumerate(topk_idx):
        hidden = expert_rows[0][0].shape[1]
        out = np.zeros((idx.shape[0], hidden), np.float32)
        for t in range(idx.shape[0]):
            for k in range(idx.shape[1]):
                if idx[t, k] >= 0:
                    row = rows_of[(me, t, int(idx[t, k]))].astype(np.float32)
                    out[t] = out[t] + np.float32(topk_weights[me][t, k]) * row
        results.append(out.astype(ml_dtypes.bfloat16))
    return results


def moe(xs: Sequence[np.ndarray], w_router: np.ndarray, w_up: np.ndarray, w_down: np.ndarray, num_topk: int,
        renormalize: bool = True, shared: tuple[np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
    """What ``xmoe.moe`` returns on each rank: per rank, bfloat16 ``[tokens_r, hidden]``.

    Args:
        xs: per rank, bfloat16 ``[tokens_r, hidden]``.
        w_router: bfloat16 ``[hidden, experts]``.
        w_up / w_down: bfloat16 ``[experts, 2 * ffn, hidden]`` / ``[experts, hidden, ffn]``: every
            rank's experts in order.
        shared: the dense SwiGLU MLP's ``(w_up [2 * ffn_s, hidden], w_down [hidden, ffn_s])`` or None.

    Each token: softmax top-k of ``x @ w_router`` (fp32), and the float32 sum of
    ``weight * (h @ w_down[e]^T)`` with ``h = silu(gate) * up``, both ``h`` and each weighted
    term rounded to bfloat16 (as the grouped GEMMs store them), plus the shared MLP's output,
    rounded to bfloat16 once.
    """
    results = []
    for x in xs:
        logits = x.astype(np.float32) @ w_router.astype(np.float32)
        idx, weights, _ = select_experts(logits, num_topk, renormalize=renormalize)
        out = np.zeros(x.shape, np.float32)
        for t in range(x.shape[0]):
            for e, weight in zip(idx[t], weights[t]):
                out[t] += round_to(np.float32(weight) * _swiglu_mlp(x[t], w_up[e], w_down[e]),
                                   ml_dtypes.bfloat16).astype(np.float32)
            if shared is not None:
                out[t] += _swiglu_mlp(x[t], shared[0], shared[1])
        results.append(out.astype(ml_dtypes.bfloat16))
    return results


def _swiglu_mlp(row: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """float32 ``down(silu(gate) * up)`` of one bfloat16 row, the hidden rounded to bfloat16."""
    ffn = w_down.shape[1]
    gate_up = row.astype(np.float32) @ w_up.astype(np.float32).T
    h = (gate_up[:ffn] / (1 + np.exp(-gate_up[:ffn])) * gate_up[ffn:]).astype(ml_dtypes.bfloat16)
    return h.astype(np.float32) @ w_down.astype(np.float32).T


def moe_aux_losses(x: np.ndarray, w_router: np.ndarray, num_topk: int) -> tuple[float, float]:
    """``xmoe.moe(..., return_aux=True)``'s losses for one rank's tokens ``x`` (softmax routing):
    ``experts * sum_e f_e * P_e`` and ``mean_t logsumexp(logits_t)^2``."""
    logits = x.astype(np.float64) @ w_router.astype(np.float64)
    if not len(logits):
        return 0.0, 0.0
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :num_topk]
    fraction = np.bincount(chosen.ravel(), minlength=logits.shape[1]) / (len(logits) * num_topk)
    lse = np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)) + logits.max(axis=1)
    return float(logits.shape[1] * (fraction * probs.mean(axis=0)).sum()), float((lse ** 2).mean())
