"""The low-latency mode on the GPU: the NVSHMEM put path forced, and dispatch + combine
captured in one CUDA graph and replayed with fresh inputs, against the reference."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe import reference
from xmoe.demo import torch_io
from xmoe.testing.low_latency import HIDDEN, MAX_TOKENS, check_combine, check_dispatch, make_inputs

pytestmark = pytest.mark.gpu
RANKS = [pytest.param(2, marks=pytest.mark.mpi(ranks=2)), pytest.param(4, marks=pytest.mark.mpi(ranks=4))]


@pytest.mark.mpi(ranks=2)
def test_gpu_low_latency_put_path(group, monkeypatch):
    """Every write into a peer through NVSHMEM puts (XMOE_FORCE_PUT=1): bf16 and FP8, with and without hooks."""
    import xmoe

    monkeypatch.setenv("XMOE_FORCE_PUT", "1")
    num_experts = 8
    buffer = xmoe.Buffer(group, 0, xmoe.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, 2, num_experts),
                         low_latency_mode=True)
    for seed, case in enumerate([dict(), dict(use_fp8=True, hook=True)]):
        xs, idxs, weights = make_inputs(40 + seed, 2, num_experts)
        received, handle = check_dispatch(buffer, group, xs, idxs, num_experts, **case)
        check_combine(buffer, group, received, handle, idxs, weights, num_experts, hook=case.get("hook", False))
    buffer.destroy()


@pytest.mark.parametrize("ranks", RANKS)
def test_gpu_low_latency_graph_replays(group, ranks):
    """Dispatch (bf16) and combine of its rows captured in one CUDA graph; 10 replays, each with
    fresh rows, routing and weights copied into the captured inputs, against the reference."""
    import torch

    import xmoe

    to_device, to_host = torch_io()
    me, num_experts, tokens = group.rank, 4 * ranks, MAX_TOKENS
    buffer = xmoe.Buffer(group, 0, xmoe.Buffer.get_low_latency_rdma_size_hint(tokens, HIDDEN, ranks, num_experts),
                         low_latency_mode=True)
    xs, idxs, weights = make_inputs(50, ranks, num_experts, [tokens] * ranks)
    x, idx, w = to_device(xs[me]), to_device(idxs[me]), to_device(weights[me])

    def step():
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, idx, tokens, num_experts, use_fp8=False)
        combined, _, _ = buffer.low_latency_combine(recv_x, idx, w, handle)
        return recv_x, recv_count, combined

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv_x, recv_count, combined = step()
    for replay in range(10):
        xs, idxs, weights = make_inputs(60 + replay, ranks, num_experts, [tokens] * ranks)
        x.copy_(to_device(xs[me]))
        idx.copy_(to_device(idxs[me]))
        w.copy_(to_device(weights[me]))
        graph.replay()
        torch.cuda.synchronize()
        want = reference.low_latency_dispatch(xs, idxs, num_experts)[me]
        np.testing.assert_array_equal(to_host(recv_count), want["count"])
        rows = to_host(recv_x)
        for e, n in enumerate(want["count"]):
            np.testing.assert_array_equal(rows[e, :n].view(np.uint16), want["rows"][e].view(np.uint16))
        everyone = group.allgather([rows[e, :n] for e, n in enumerate(want["count"])])
        expected = reference.low_latency_combine(everyone, idxs, weights, num_experts)[me]
        np.testing.assert_allclose(to_host(combined).astype(np.float32), expected.astype(np.float32), rtol=1e-2,
                                   atol=1e-2)
    buffer.destroy()


def test_gpu_new_outputs_are_the_arrays_the_kernels_write():
    """Each PyTorch tensor ``interop.new_outputs`` returns lies where its kernel array does, with
    its shape and dtype (FP8 and bfloat16 bits included): bytes written through the array read back
    from the tensor, every element."""
    import cupy
    import torch

    from xmoe.interop import Origin, OutputPlan, new_outputs

    specs = dict(rows=((3, 5, 7), np.uint8, "float8_e4m3fn"), bf16=((4, 9), np.uint16, "bfloat16"),
                 scales=((3, 5, 0), np.float32, None), count=((3,), np.int32, None), ranges=((3, 2), np.int64, None))
    arrays, tensors = new_outputs(OutputPlan(specs), Origin("torch", "float8_e4m3fn"))
    out = tensors()
    rng = np.random.default_rng(3)
    for name, (shape, dtype, bits) in specs.items():
        tensor, array = out[name], arrays[name]
        assert tuple(tensor.shape) == shape and tensor.is_contiguous()
        assert tensor.numel() == 0 or tensor.data_ptr() == array.ptr  # PyTorch gives an empty view pointer 0
        assert tensor.dtype == (getattr(torch, bits) if bits else getattr(torch, np.dtype(dtype).name))
        want = rng.integers(0, 120, shape).astype(dtype)  # < 0x78: finite as float8_e4m3fn
        cupy.asarray(array)[...] = cupy.asarray(want)
        np.testing.assert_array_equal(tensor.view(torch.uint8).cpu().numpy().view(dtype).reshape(shape), want)
