"""The router: logits, scores, (group-limited) top-k and the per-expert counts.

``router(x, w_router, k)`` runs the logits GEMM (the grouped GEMM with one group, fp32
out) and then one fused kernel, generated per routing rule, in which a warp owns a token:
scores (softmax or sigmoid), the biased choice scores, the group filter, k rounds of a
warp arg-max (ties to the lower expert id), the weights, and one atomic add per choice
into the expert counts. On the simulator backend the NumPy reference runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from xmoe import reference
from xmoe.event import current_stream
from xmoe.device_memory import on_gpu, xp
from xmoe.interop import Origin, as_array, new_output, poisoned, to_origin
from xmoe.kernels.cuda_c import PRELUDE

MAX_EXPERTS = 1024


@dataclass(frozen=True)
class RoutingRule:
    """What the selection kernel is specialised on."""

    num_experts: int
    num_topk: int
    scoring: str  # "softmax" or "sigmoid"
    has_bias: bool
    n_group: int  # 0: no group limit
    topk_group: int
    renormalize: bool


_SELECT = r"""
#define VPT ((EXPERTS + 31) / 32)  // scores per lane: lane l holds experts l, l + 32, ...
#define NEG_INF __int_as_float(0xff800000)

// Warp-wide arg-max of (value, index); ties go to the lower index.
__device__ __forceinline__ void warp_argmax(float& value, int& index) {
  #pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, value, d);
    const int other_index = __shfl_xor_sync(0xffffffffu, index, d);
    if (other > value || (other == value && other_index < index)) { value = other; index = other_index; }
  }
}

// The best of this lane's values among experts that pass ``in_group`` (-1: any group).
__device__ __forceinline__ void lane_best(const float* values, int group, int skip, float& best, int& index) {
  best = NEG_INF; index = 0x7fffffff;
  #pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int e = v * 32 + (threadIdx.x % 32);
    const bool eligible = e < EXPERTS && e != skip && (group < 0 || e / (EXPERTS / (N_GROUP > 0 ? N_GROUP : 1)) == group);
    if (eligible && values[v] > best) { best = values[v]; index = e; }
  }
}

// One token, by one warp; its choices are counted in the block's ``counts``.
__device__ __forceinline__ void route_token(int token, const float* __restrict__ logits, const float* __restrict__ bias,
                                            long long* __restrict__ topk_idx, float* __restrict__ topk_weights,
                                            int* counts, float scaling) {
  const int lane = threadIdx.x % 32;
  const float* row = logits + (size_t)token * EXPERTS;
  float score[VPT], choice[VPT];
  #pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int e = v * 32 + lane;
    score[v] = e < EXPERTS ? row[e] : NEG_INF;
  }
#if SIGMOID
  #pragma unroll
  for (int v = 0; v < VPT; ++v) score[v] = 1.0f / (1.0f + __expf(-score[v]));
#else
  float top = NEG_INF;
  #pragma unroll
  for (int v = 0; v < VPT; ++v) top = fmaxf(top, score[v]);
  #pragma unroll
  for (int d = 16; d > 0; d >>= 1) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, d));
  float sum = 0.0f;
  #pragma unroll
  for (int v = 0; v < VPT; ++v) { score[v] = __expf(score[v] - top); sum += score[v]; }
  #pragma unroll
  for (int d = 16; d > 0; d >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, d);
  #pragma unroll
  for (int v = 0; v < VPT; ++v) score[v] /= sum;
#endif
  #pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int e = v * 32 + lane;
    choice[v] = e < EXPERTS ? score[v] + (HAS_BIAS ? bias[e] : 0.0f) : NEG_INF;
  }
#if N_GROUP > 0
  float group_score[N_GROUP];
  #pragma unroll
  for (int g = 0; g < N_GROUP; ++g) {
    float best; int index;
    lane_best(choice, g, -1, best, index);
    warp_argmax(best, index);
#if HAS_BIAS
    float second; int second_index;
    lane_best(choice, g, index, second, second_index);
    warp_argmax(second, second_index);
    best += second;
#endif
    group_score[g] = best;
  }
  unsigned allowed = 0;  // bit g: group g is among the TOPK_GROUP best (ties to the lower group)
  #pragma unroll
  for (int round = 0; round < TOPK_GROUP; ++round) {
    int pick = -1;
    #pragma unroll
    for (int g = 0; g < N_GROUP; ++g)
      if (!(allowed >> g & 1u) && (pick < 0 || group_score[g] > group_score[pick])) pick = g;
    allowed |= 1u << pick;
  }
  #pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int e = v * 32 + lane;
    if (e < EXPERTS && !(allowed >> (e / (EXPERTS / N_GROUP)) & 1u)) choice[v] = NEG_INF;
  }
#endif
  long long my_index = 0;
  float my_weight = 0.0f, total = 0.0f;
  #pragma unroll
  for (int j = 0; j < TOPK; ++j) {
    float best; int index;
    lane_best(choice, -1, -1, best, index);
    warp_argmax(best, index);
    float mine = 0.0f;
    #pragma unroll
    for (int v = 0; v < VPT; ++v)
      if (v * 32 + lane == index) { mine = score[v]; choice[v] = NEG_INF; }
    const float weight = __shfl_sync(0xffffffffu, mine, index % 32);
    total += weight;
    if (lane == j) { my_index = index; my_weight = weight; }
    if (lane == 0) atomicAdd(counts + index, 1);  // shared memory
  }
  if (lane < TOPK) {
    topk_idx[(size_t)token * TOPK + lane] = my_index;
    topk_weights[(size_t)token * TOPK + lane] = (RENORMALIZE ? my_weight / total : my_weight) * scaling;
  }
}

// Each warp routes tokens in a grid-stride loop; the block adds its expert counts to the
// global ones once, at the end (per-choice global atomics on a few hundred counters contend).
extern "C" __global__ void select_experts(const float* __restrict__ logits, const float* __restrict__ bias,
                                          long long* __restrict__ topk_idx, float* __restrict__ topk_weights,
                                          int* __restrict__ counts, int tokens, float scaling) {
  __shared__ int block_counts[EXPERTS];
  for (int e = threadIdx.x; e < EXPERTS; e += blockDim.x) block_counts[e] = 0;
  __syncthreads();
  const int warps = blockDim.x / 32;
  for (int token = blockIdx.x * warps + threadIdx.x / 32; token < tokens; token += gridDim.x * warps)
    route_token(token, logits, bias, topk_idx, topk_weights, block_counts, scaling);
  __syncthreads();
  for (int e = threadIdx.x; e < EXPERTS; e += blockDim.x)
    if (block_counts[e]) atomicAdd(counts + e, block_counts[e]);
}
"""


def select_source(rule: RoutingRule) -> str:
    """CUDA C of the selection kernel for ``rule``."""
    defines = {
        "EXPERTS": rule.num_experts, "TOPK": rule.num_topk, "SIGMOID": int(rule.scoring == "sigmoid"),
        "HAS_BIAS": int(rule.has_bias), "N_GROUP": rule.n_group, "TOPK_GROUP": rule.topk_group,
        "RENORMALIZE": int(rule.renormalize),
    }
    return "\n".join(f"#define {name} {value}" for name, value in defines.items()) + PRELUDE + _SELECT


@lru_cache(maxsize=None)
def _select_kernel(rule: RoutingRule) -> Any:
    from xmoe.kernels.build import compile_kernel, current_device

    return compile_kernel(select_source(rule), "select_experts", f"sm_{current_device().compute_capability}")


@lru_cache(maxsize=256)
def _rule(num_experts: int, num_topk: int, scoring: str, has_bias: bool, n_group: int | None, topk_group: int | None,
          renormalize: bool) -> RoutingRule:
    """The checked rule (cached: it is on every call's path)."""
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"logits: {num_experts} experts, expected 1..{MAX_EXPERTS}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring={scoring!r}: expected 'softmax' or 'sigmoid'")
    if (n_group is None) != (topk_group is None):
        raise ValueError("n_group and topk_group: give both (group-limited routing) or neither")
    n_group, topk_group = n_group or 0, topk_group or 0
    if n_group:
        if not 1 <= n_group <= 32 or num_experts % n_group:
            raise ValueError(f"n_group={n_group}: must divide the {num_experts} experts and be at most 32")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group={topk_group}: expected 1..n_group={n_group}")
        if has_bias and num_experts // n_group < 2:
            raise ValueError(f"n_group={n_group}: with a bias a group scores its two best experts, "
                             f"but groups have {num_experts // n_group}")
    eligible = topk_group * (num_experts // n_group) if n_group else num_experts
    if not 1 <= num_topk <= min(eligible, 32):
        raise ValueError(f"num_topk={num_topk}: expected 1..{min(eligible, 32)} (experts that can be chosen, "
                         "at most 32)")
    return RoutingRule(num_experts, num_topk, scoring, has_bias, n_group, topk_group, bool(renormalize))


def select_experts(
    logits: Any,
    num_topk: int,
    *,
    scoring: str = "softmax",
    bias: Any = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    renormalize: bool = False,
    scaling: float = 1.0,
) -> tuple[Any, Any, Any]:
    """Top-k experts of each token from its router logits (one fused kernel).

    Args:
        logits: float32 ``[tokens, experts]``, experts <= 1024.
        num_topk: experts per token, at most 32.
        scoring: "softmax" or "sigmoid": each expert's score from its logit.
        bias: float32 ``[experts]`` added to the scores to choose (DeepSeek-V3's aux-loss-free
            balancing); the weights stay the unbiased scores. None: no bias.
        n_group, topk_group: group-limited routing (DeepSeek-V3): ``n_group`` (<= 32) equal groups
            of consecutive experts; a group scores the sum of its two best biased scores
            (with a bias) or its best score (without); only the ``topk_group`` best groups'
            experts can be chosen.
        renormalize: divide each token's k weights by their sum.
        scaling: multiply the weights by it (``routed_scaling_factor``).

    Returns:
        ``(topk_idx, topk_weights, num_tokens_per_expert)``: int64 ``[tokens, k]``, best first,
        ties to the lower expert id; float32 ``[tokens, k]``; int32 ``[experts]``, one count per
        choice (``Buffer.get_dispatch_layout``'s counting). The caller's tensor type.
    """
    logits_array, origin = as_array(logits, "logits")
    if origin.dtype != "float32" or logits_array.ndim != 2:
        raise ValueError(f"logits: expected float32 [tokens, experts], got {origin.dtype} {tuple(logits_array.shape)}")
    return _select(logits_array, origin, num_topk, scoring, bias, n_group, topk_group, renormalize, scaling)


def _select(logits: Any, origin: Origin, num_topk: int, scoring: str, bias: Any, n_group: int | None,
            topk_group: int | None, renormalize: bool, scaling: float, stream: Any = None) -> tuple[Any, Any, Any]:
    """:func:`select_experts` on a backend array of logits; outputs in ``origin``'s framework, work
    on ``stream`` (None: the caller's current stream)."""
    tokens, num_experts = logits.shape
    rule = _rule(num_experts, num_topk, scoring, bias is not None, n_group, topk_group, bool(renormalize))
    bias_array = None
    if bias is not None:
        bias_array, bias_origin = as_array(bias, "bias")
        if bias_origin.dtype != "float32" or bias_array.shape != (num_experts,):
            raise ValueError(f"bias: expected float32 [{num_experts}], got {bias_origin.dtype} "
                             f"{tuple(bias_array.shape)}")
    topk_idx, idx_finish = new_output((tokens, num_topk), np.int64, origin)
    topk_weights, weights_finish = new_output((tokens, num_topk), np.float32, origin)
    counts, counts_finish = new_output(num_experts, np.int32, origin)
    if not on_gpu():
        results = reference.select_experts(logits, num_topk, scoring, bias_array, rule.n_group or None,
                                           rule.topk_group or None, renormalize, scaling)
        for out, result in zip((topk_idx, topk_weights, counts), results):
            out[...] = result
    else:
        import cupy

        stream = stream or current_stream(origin.framework)
        cupy.cuda.runtime.memsetAsync(counts.data.ptr, 0, counts.nbytes, stream.ptr)
        if tokens:
            from xmoe.kernels.build import warp_per_row_launch

            with stream:
                _select_kernel(rule)(*warp_per_row_launch(tokens),
                                     (logits, bias_array if bias_array is not None else logits,
                                      topk_idx, topk_weights, counts, np.int32(tokens), np.float32(scaling)))
    return idx_finish(), weights_finish(), counts_finish()


def _logits(x: Any, w_router: Any) -> tuple[Any, Origin, Any]:
    """Router logits as a backend float32 array, the origin of ``x`` and the stream the work went
    on (None on the simulator)."""
    from xmoe.kernels.gemm import GemmVariant, Problem, gemm_into

    x_array, origin = as_array(x, "x")
    w_array, w_origin = as_array(w_router, "w_router")
    if w_origin.dtype != "bfloat16" or w_array.ndim != 2 or w_array.shape[0] % 8 or w_array.shape[1] % 8:
        raise ValueError(f"w_router: expected bfloat16 [hidden, experts], both multiples of 8, got {w_origin.dtype} "
                         f"{tuple(w_array.shape)}")
    if origin.dtype != "bfloat16" or x_array.ndim != 2 or x_array.shape[1] != w_array.shape[0]:
        raise ValueError(f"x: expected bfloat16 [tokens, {w_array.shape[0]}] to match w_router, got {origin.dtype} "
                         f"{tuple(x_array.shape)}")
    tokens, (hidden, experts) = x_array.shape[0], w_array.shape
    logits = poisoned(xp().empty((tokens, experts), np.float32))
    problem = Problem(x_array, w_array.reshape(1, hidden, experts), logits, _single_group(tokens), None,
                      tokens, experts, hidden, 1)
    stream = current_stream(origin.framework) if on_gpu() else None
    gemm_into(problem, GemmVariant("none", "kn", "f32"), stream)
    return logits, origin, stream


def route(x: Any, w_router: Any, num_topk: int, *, scoring: str, bias: Any, n_group: int | None,
          topk_group: int | None, renormalize: bool, scaling: float) -> tuple[Any, Any, Any, Any]:
    """:func:`router`'s work for callers inside xmoe, on backend arrays (CuPy on the GPU, NumPy on
    the simulator) with no conversion to the caller's type; the arguments as :func:`router` takes them.

    Returns:
        ``(logits float32 [tokens, experts], topk_idx int64 [tokens, k], topk_weights float32
        [tokens, k], num_tokens_per_expert int32 [experts])``.
    """
    logits, _, stream = _logits(x, w_router)
    backend = Origin("cupy" if on_gpu() else "numpy", "float32")
    return (logits,) + _select(logits, backend, num_topk, scoring, bias, n_group, topk_group, renormalize, scaling,
                               stream)


def router_logits(x: Any, w_router: Any) -> Any:
    """float32 ``[tokens, experts]`` logits ``x @ w_router`` (bfloat16 in, fp32 accumulation).

    Args:
        x: bfloat16 ``[tokens, hidden]``.
        w_router: bfloat16 ``[hidden, experts]``, both sizes multiples of 8.

    Returns:
        The logits, the caller's tensor type.
    """
    logits, origin, _ = _logits(x, w_router)
    return to_origin(logits, origin)


@lru_cache(maxsize=64)
def _single_group(rows: int) -> Any:
    """``offs`` of one group of ``rows`` rows (kept: the router runs at a few token counts)."""
    return xp().full((1,), rows, dtype=np.int32)


def router(
    x: Any,
    w_router: Any,
    num_topk: int,
    *,
    scoring: str = "softmax",
    bias: Any = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    renormalize: bool = False,
    scaling: float = 1.0,
) -> tuple[Any, Any, Any]:
    """Route tokens: :func:`router_logits`, then :func:`select_experts` (same arguments).

    Args:
        x: bfloat16 ``[tokens, hidden]``.
        w_router: bfloat16 ``[hidden, experts]``.

    Returns:
        ``(topk_idx int64 [tokens, k], topk_weights float32 [tokens, k], num_tokens_per_expert
        int32 [experts])``, the caller's tensor type.
    """
    logits, origin, stream = _logits(x, w_router)
    return _select(logits, origin, num_topk, scoring, bias, n_group, topk_group, renormalize, scaling, stream)
