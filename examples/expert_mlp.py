"""The experts of one MoE layer on one rank, with xmoe's router and grouped GEMM.

    python examples/expert_mlp.py

Route each token to its top-k experts, lay the (token, expert) rows out expert by expert,
run the SwiGLU up projection and the down projection weighted by the routing weights
(both epilogues fused into the GEMMs), and sum each token's rows back. The result is
checked against the same layer written densely in NumPy. Runs on the CPU simulator with
NumPy arrays, or on a GPU with PyTorch tensors.
"""

from __future__ import annotations

import numpy as np

import xmoe
from xmoe.interop import BFLOAT16
from xmoe.demo import backend_io


def dense_reference(x, w_router, w1, w2, num_topk):
    """The layer in NumPy, fp32, rounding the SwiGLU output to bfloat16 as the kernel stores it."""
    idx, weights, _ = xmoe.reference.select_experts(x.astype(np.float32) @ w_router.astype(np.float32), num_topk,
                                                    renormalize=True)
    ffn = w2.shape[2]
    out = np.zeros(x.shape, np.float32)
    for t in range(x.shape[0]):
        for e, weight in zip(idx[t], weights[t]):
            gate_up = x[t].astype(np.float32) @ w1[e].astype(np.float32).T
            h = (gate_up[:ffn] / (1 + np.exp(-gate_up[:ffn])) * gate_up[ffn:]).astype(BFLOAT16)
            out[t] += weight * (h.astype(np.float32) @ w2[e].astype(np.float32).T)
    return out


def run(tokens: int = 96, hidden: int = 128, ffn: int = 64, experts: int = 8, num_topk: int = 2,
        seed: int = 0) -> float:
    """Run the layer once; return the largest difference from the dense reference."""
    to_device, to_host = backend_io()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, hidden)).astype(BFLOAT16)
    w_router = rng.standard_normal((hidden, experts)).astype(BFLOAT16)
    w1 = (rng.standard_normal((experts, 2 * ffn, hidden)) / np.sqrt(hidden)).astype(BFLOAT16)  # gate, up
    w2 = (rng.standard_normal((experts, hidden, ffn)) / np.sqrt(ffn)).astype(BFLOAT16)

    # 1. route: top-k experts and weights per token, and how many rows each expert gets
    idx, weights, counts = (to_host(v) for v in
                            xmoe.router(to_device(x), to_device(w_router), num_topk, renormalize=True))
    # 2. rows expert by expert: row r is token token_of_row[r] for its expert
    order = np.argsort(idx.ravel(), kind="stable")
    token_of_row = order // num_topk
    offs = np.cumsum(counts).astype(np.int32)
    # 3. the experts: silu(x W_gate) * (x W_up), then (h W_down) * routing weight
    h = xmoe.grouped_gemm(to_device(x[token_of_row]), to_device(w1), to_device(offs), epilogue="swiglu")
    y = xmoe.grouped_gemm(h, to_device(w2), to_device(offs), row_weights=to_device(weights.ravel()[order]))
    # 4. back to tokens
    out = np.zeros((tokens, hidden), np.float32)
    np.add.at(out, token_of_row, to_host(y).astype(np.float32))

    error = float(np.abs(out - dense_reference(x, w_router, w1, w2, num_topk)).max())
    print(f"expert MLP: {tokens} tokens, {experts} experts, top-{num_topk}; rows per expert {counts.tolist()}; "
          f"largest difference from the dense layer {error:.4f}")
    return error


if __name__ == "__main__":
    run()
