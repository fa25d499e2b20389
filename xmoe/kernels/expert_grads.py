"""The elementwise parts of the routed experts' backward (``xmoe.nn``), one pass over the pairs each.

With ``A`` an expert's pair rows, ``gu = A @ W_up^T`` (gate columns, then up columns),
``h = silu(gate) * up``, each pair's weight ``w`` and the gradient ``dY`` of the layer's rows:

- ``pair_grads``: each pair's row of ``dY`` (which the ``g = dY @ W_down`` GEMM reads) and that
  row times ``w`` (which the ``dW_down = (w dY)^T @ h`` GEMM reads), from one read of ``dY``;
- ``swiglu_backward``: from ``g``, ``d(gu)`` (``dh = w g`` through SwiGLU's derivative) and each
  pair's weight gradient ``<g, h>``, from one read of ``g``, ``gu`` and ``h``.

They replace ~15 PyTorch passes over ``[pairs, 2 ffn]`` float32 temporaries. On the GPU each is
one generated kernel, a warp a pair, 8 channels (16 bytes of bfloat16) a lane at a time; on
the simulator the NumPy references (``reference.pair_grads`` / ``reference.swiglu_backward``) run.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from xmoe import reference
from xmoe.device_memory import on_gpu, xp
from xmoe.interop import poisoned
from xmoe.kernels.build import warp_per_row_launch
from xmoe.kernels.cuda_c import PRELUDE

_SOURCE = r"""
// A warp a pair p: pair_grad[p] = grad[row_of[p]], weighted[p] = bf16(grad[row_of[p]] * weights[p]).
extern "C" __global__ void pair_grads(const uint4* __restrict__ grad, const int* __restrict__ row_of,
                                      const float* __restrict__ weights, uint4* __restrict__ pair_grad,
                                      uint4* __restrict__ weighted, int num_pairs, int vecs) {
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int p = blockIdx.x * warps + threadIdx.x / 32; p < num_pairs; p += gridDim.x * warps) {
    const uint4* src = grad + (size_t)row_of[p] * vecs;
    const float w = weights[p];
    for (int v = lane; v < vecs; v += 32) {
      const uint4 value = __ldg(src + v);
      float f[8];
      unpack8(value, f);
      #pragma unroll
      for (int c = 0; c < 8; ++c) f[c] *= w;
      pair_grad[(size_t)p * vecs + v] = value;
      weighted[(size_t)p * vecs + v] = pack8(f);
    }
  }
}

// A warp a pair p, ffn = 8 * vecs channels: with dh = weights[p] * g[p], sigma = sigmoid(gate),
// d(gate) = dh * up * sigma * (1 + gate * (1 - sigma)), d(up) = dh * gate * sigma (rounded to
// bfloat16 into grad_gu[p] = [d(gate) | d(up)]), and grad_weights[p] = sum over channels of g * h.
extern "C" __global__ void swiglu_backward(const float4* __restrict__ g, const uint4* __restrict__ gu,
                                           const uint4* __restrict__ h, const float* __restrict__ weights,
                                           uint4* __restrict__ grad_gu, float* __restrict__ grad_weights,
                                           int num_pairs, int vecs) {
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int p = blockIdx.x * warps + threadIdx.x / 32; p < num_pairs; p += gridDim.x * warps) {
    const float w = weights[p];
    float dot = 0.0f;
    for (int v = lane; v < vecs; v += 32) {
      const size_t row = (size_t)p * vecs + v, pair = (size_t)p * 2 * vecs + v;
      const float4 lo = __ldg(g + 2 * row), hi = __ldg(g + 2 * row + 1);
      const float gv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      float gate[8], up[8], hv[8], d_gate[8], d_up[8];
      unpack8(__ldg(gu + pair), gate);
      unpack8(__ldg(gu + pair + vecs), up);
      unpack8(__ldg(h + row), hv);
      #pragma unroll
      for (int c = 0; c < 8; ++c) {
        dot += gv[c] * hv[c];
        const float dh = gv[c] * w, sigma = 1.0f / (1.0f + __expf(-gate[c]));
        d_gate[c] = dh * up[c] * sigma * (1.0f + gate[c] * (1.0f - sigma));
        d_up[c] = dh * gate[c] * sigma;
      }
      grad_gu[pair] = pack8(d_gate);
      grad_gu[pair + vecs] = pack8(d_up);
    }
    #pragma unroll
    for (int d = 16; d > 0; d >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, d);
    if (lane == 0) grad_weights[p] = dot;
  }
}
"""


def expert_grads_source() -> str:
    """CUDA C of both kernels."""
    return PRELUDE + _SOURCE


@lru_cache(maxsize=None)
def _kernels() -> tuple[Any, Any]:
    from xmoe.kernels.build import compile_kernel, current_device

    code, arch = expert_grads_source(), f"sm_{current_device().compute_capability}"
    return compile_kernel(code, "pair_grads", arch), compile_kernel(code, "swiglu_backward", arch)


def _check_channels(name: str, channels: int) -> None:
    if channels % 8:
        raise ValueError(f"{name}: {channels} channels, not a multiple of 8")


def pair_grads(grad: Any, row_of: Any, weights: Any, stream: Any) -> tuple[Any, Any]:
    """Each pair's row of the layer's output gradient, plain and weighted.

    Args:
        grad: uint16 (bfloat16 bits) ``[rows, hidden]``, hidden a multiple of 8.
        row_of: int32 ``[pairs]``, each pair's row (``Pairs.row_of``).
        weights: float32 ``[pairs]``, each pair's top-k weight.
        stream: the CuPy stream to run on (None on the simulator).

    Returns:
        ``(grad[row_of], bf16(grad[row_of] * weights[:, None]))``, both uint16 ``[pairs, hidden]``.
    """
    _check_channels("grad", grad.shape[1])
    if weights.shape != row_of.shape or row_of.ndim != 1:
        raise ValueError(f"row_of {tuple(row_of.shape)} / weights {tuple(weights.shape)}: expected one [pairs] each")
    if not on_gpu():
        return reference.pair_grads(grad, row_of, weights)
    num_pairs, hidden = row_of.shape[0], grad.shape[1]
    kernel, _ = _kernels()
    with stream:  # the outputs' memory ordered on the stream that writes them
        pair_grad = poisoned(xp().empty((num_pairs, hidden), np.uint16))
        weighted = poisoned(xp().empty((num_pairs, hidden), np.uint16))
        kernel(*warp_per_row_launch(num_pairs),
               (grad, row_of, weights, pair_grad, weighted, np.int32(num_pairs), np.int32(hidden // 8)))
    return pair_grad, weighted


def swiglu_backward(g: Any, gu: Any, h: Any, weights: Any, stream: Any) -> tuple[Any, Any]:
    """The gradient of each pair's up projection and of its top-k weight.

    Args:
        g: float32 ``[pairs, ffn]``, ``dY[row] @ W_down`` of each pair (ffn a multiple of 8).
        gu: uint16 (bfloat16 bits) ``[pairs, 2 * ffn]``, the forward's up projection (gate, then up).
        h: uint16 (bfloat16 bits) ``[pairs, ffn]``, the forward's ``silu(gate) * up``.
        weights: float32 ``[pairs]``, each pair's top-k weight.
        stream: the CuPy stream to run on (None on the simulator).

    Returns:
        ``(d(gu)`` uint16 (bfloat16 bits) ``[pairs, 2 * ffn]``, ``d(weight)`` float32 ``[pairs]``).
    """
    num_pairs, ffn = g.shape
    _check_channels("g", ffn)
    if gu.shape != (num_pairs, 2 * ffn) or h.shape != (num_pairs, ffn) or weights.shape != (num_pairs,):
        raise ValueError(f"gu {tuple(gu.shape)} / h {tuple(h.shape)} / weights {tuple(weights.shape)}: expected "
                         f"[{num_pairs}, {2 * ffn}] / [{num_pairs}, {ffn}] / [{num_pairs}] for g [{num_pairs}, {ffn}]")
    if not on_gpu():
        return reference.swiglu_backward(g, gu, h, weights)
    _, kernel = _kernels()
    with stream:
        grad_gu = poisoned(xp().empty((num_pairs, 2 * ffn), np.uint16))
        grad_weights = poisoned(xp().empty(num_pairs, np.float32))
        kernel(*warp_per_row_launch(num_pairs),
               (g, gu, h, weights, grad_gu, grad_weights, np.int32(num_pairs), np.int32(ffn // 8)))
    return grad_gu, grad_weights
