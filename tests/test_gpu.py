"""The multi-rank suite on the GPU: several NVSHMEM PEs (one GPU shared, or one GPU each),
PyTorch and CuPy tensors, DeepEP's test shape, and the NVSHMEM put path forced."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe.interop import BFLOAT16
from xmoe.demo import torch_io
from xmoe.testing.checks import run_and_check, run_standard_cases
from xmoe.testing.routing import make_routing

pytestmark = pytest.mark.gpu


def cupy_io():
    import cupy

    return cupy.asarray, lambda array: array.get()


def jax_io():
    import os

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to NVSHMEM and the others
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)  # top-k ids are int64, as in DeepEP
    from xmoe.interop import to_host

    def jax_to_host(array):  # JAX results, or a handle's own (CuPy) arrays
        return np.asarray(array) if isinstance(array, jax.Array) else to_host(array)

    return jax.numpy.asarray, jax_to_host


IO = {"torch": torch_io, "cupy": cupy_io, "jax": jax_io}
RANKS = [pytest.param(2, marks=pytest.mark.mpi(ranks=2)), pytest.param(4, marks=pytest.mark.mpi(ranks=4))]


@pytest.mark.parametrize("framework, dtype", [("torch", BFLOAT16), ("torch", np.float32), ("cupy", np.float32),
                                             ("jax", BFLOAT16)],
                         ids=["torch-bf16", "torch-f32", "cupy-f32", "jax-bf16"])
@pytest.mark.parametrize("ranks", RANKS)
def test_gpu_patterns(group, ranks, framework, dtype):
    """The CPU suite's routing patterns, on GPU tensors, one Buffer reused by every call."""
    import xmoe

    to_device, to_host = IO[framework]()
    num_experts, topk = 8 * ranks, 4
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(512, 257, ranks, num_experts, topk, np.float32))
    run_standard_cases(buffer, group, 512, 256, num_experts, topk, dtype, 128, to_device, to_host)
    buffer.destroy()


@pytest.mark.parametrize("force_put", [False, True], ids=["store", "put"])
@pytest.mark.parametrize("ranks", RANKS)
def test_gpu_deepep_shape(group, ranks, force_put):
    """DeepEP's test shape: 4096 tokens x 7168 hidden, top-8 of 256 experts, bfloat16."""
    import xmoe

    to_device, to_host = torch_io()
    routing = make_routing(11, ranks, 4096, 7168, 256, 8, BFLOAT16, "random", mask_prob=0.05)
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(4096, 7168, ranks, 256, 8))
    run_and_check(buffer, group, routing, 1, True, to_device, to_host, xmoe.Config(force_put=force_put))
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_gpu_deepep_call_sequence(group):
    """DeepEP's test_intranode order on one Buffer, 24 blocks, three times: a round without top-k,
    one with, one with worst-case outputs (each: layout, dispatch, combine, cached dispatch).
    Measured failing on one H200 at 7464350: the kernel compiled for the empty top-k fields of
    the first round served the next round's, indexing them as C-contiguous (rows 0..9 of
    source 0 overwritten by source 1's top-k weights); fixed by ``launch._pack``'s signature."""
    import xmoe

    to_device, to_host = torch_io()
    routing = make_routing(13, 2, 4096, 7168, 256, 8, BFLOAT16, "random")
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(4096, 7168, 2, 256, 8))
    config = xmoe.Config(24)
    for _ in range(3):
        run_and_check(buffer, group, routing, 1, False, to_device, to_host, config)
        run_and_check(buffer, group, routing, 1, True, to_device, to_host, config)
        run_and_check(buffer, group, routing, 1, True, to_device, to_host, config, num_worst_tokens=2 * 4096)
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_gpu_repeated_cached_dispatch_and_combine(group):
    """Repeated cached dispatch and combine with one handle reuse their packed launches; every
    round must see its own payload."""
    import xmoe
    from xmoe.testing.checks import check_repeated_calls

    to_device, to_host = torch_io()
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(300, 256, 2, 16, 4))
    check_repeated_calls(buffer, group, make_routing(8, 2, 300, 256, 16, 4, BFLOAT16), 4, to_device, to_host)
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_gpu_missing_rank_raises(group):
    import torch

    import xmoe

    buffer = xmoe.Buffer(group, 1 << 20)
    routing = make_routing(0, 2, 64, 32, 4, 2, np.float32)
    if group.rank == 0:
        idx = torch.from_numpy(routing.topk_idx[0]).cuda()
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
        with pytest.raises(RuntimeError, match="rank 1 never arrived"):
            buffer.dispatch(torch.from_numpy(routing.x[0]).cuda(), num_tokens_per_rank=per_rank,
                            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                            config=xmoe.Config(timeout_s=1.0))
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_gpu_combine_missing_rank_raises_at_next_call(group):
    """combine does not wait for the device: a peer that never arrives is reported by the next call."""
    import torch

    import xmoe

    buffer = xmoe.Buffer(group, 1 << 20)
    routing = make_routing(0, 2, 64, 32, 4, 2, np.float32)
    idx = torch.from_numpy(routing.topk_idx[group.rank]).cuda()
    x = torch.from_numpy(routing.x[group.rank]).cuda()
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                 num_tokens_per_expert=per_expert)
    if group.rank == 0:
        buffer.combine(recv_x, handle, config=xmoe.Config(timeout_s=1.0))
        torch.cuda.synchronize()
        with pytest.raises(RuntimeError, match="combine: rank 1 never arrived"):
            buffer.dispatch(x, handle=handle)
    buffer.destroy()


#: Clock cycles ``torch.cuda._sleep`` spins before a payload gets its final values: about 0.5 s
#: at the 2 GHz of an H100/H200, far longer than the host takes to queue the call under test.
SLEEP_CYCLES = 1_000_000_000


def _caller_stream_event():
    """An :class:`xmoe.EventOverlap` marking the work queued so far on PyTorch's current stream:
    a CuPy event recorded on that stream (what a DeepEP user passes as ``previous_event``)."""
    import cupy
    import torch

    import xmoe

    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    return xmoe.EventOverlap(stream.record(), "torch")


def _write_after_sleep(*pairs):
    """Queue on PyTorch's current stream a kernel that spins :data:`SLEEP_CYCLES`, then the copy of
    each ``(target, final)`` pair: until then the targets keep their stale values. Returns
    ``(previous_event, slept)``: an :class:`xmoe.EventOverlap` after the copies, and a
    ``torch.cuda.Event`` after the spin (not yet complete while the copies are still to come)."""
    import torch

    torch.cuda._sleep(SLEEP_CYCLES)
    slept = torch.cuda.Event()
    slept.record()
    for target, final in pairs:
        target.copy_(final)
    return _caller_stream_event(), slept


@pytest.mark.mpi(ranks=2)
def test_gpu_async_finish_and_previous_event(group):
    """async_finish runs a call on the Buffer's stream after ``previous_event``; the caller's
    stream waits on the returned event.

    Each checked call reads an input that PyTorch's current stream (a side stream) writes only
    after a ~0.5 s spin kernel (``torch.cuda._sleep``); a CuPy event recorded after that write
    is the call's ``previous_event``, and until then the input holds stale values (zeros, or
    -1 ids). The Buffer's stream is non-blocking: nothing but the ``previous_event`` wait
    orders the call's kernels after that write. If that wait is broken (not made, or made on
    a stream other than the one the kernels are launched on), the kernels run at once on the
    stale input and the comparison with the reference fails: the cached dispatch receives
    rows of zeros, the combine returns zeros, the layout counts no token, the non-cached
    dispatch receives rows and top-k weights of zeros.

    A cached dispatch and a combine do not wait on the host, so the test also asserts that
    they returned while the spin was still running (else a wait on the host would hide a
    broken GPU wait); the layout (which still synchronises) and the non-cached dispatch
    (which waits on the host for its receive counts) are checked for their results only:
    their kernels are queued before the host waits, so a broken wait still shows. The
    outputs are read on the caller's stream after ``current_stream_wait()`` on the returned
    event, so an event that marks less than the call's work shows as poisoned
    (``XMOE_POISON``) or missing rows too.
    """
    import torch

    import xmoe
    from xmoe import reference

    torch.cuda.set_device(group.device)
    to_device, to_host = torch_io()
    me, ranks, num_experts = group.rank, group.world_size, 16
    routing = make_routing(21, ranks, 300, 128, num_experts, 4, BFLOAT16)
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(300, 128, ranks, num_experts, 4))
    want = reference.dispatch(routing.x, routing.topk_idx, routing.topk_weights, num_experts)
    in_ranks = [reference.dispatch_layout(i, num_experts, ranks)[2] for i in routing.topk_idx]
    payloads2 = [(p.astype(np.float32) - 3).astype(BFLOAT16) for p in routing.x]
    want2 = reference.dispatch(payloads2, routing.topk_idx, None, num_experts)
    expert_out = [(w["recv_x"].astype(np.float32) * 1.5).astype(BFLOAT16) for w in want]
    want_x, want_w = reference.combine(expert_out, in_ranks, [w["recv_topk_weights"] for w in want])[me]
    want_per_rank, want_per_expert, want_in_rank = reference.dispatch_layout(routing.topk_idx[me], num_experts, ranks)
    # every input's final values on the device before anything is queued behind a spin
    # (an upload from pageable memory would wait for it on the host)
    idx, x, weights, x2, out = (to_device(a) for a in (routing.topk_idx[me], routing.x[me], routing.topk_weights[me],
                                                       payloads2[me], expert_out[me]))
    idx_in, x_in, weights_in, out_in = idx.clone(), x.clone(), weights.clone(), out.clone()
    torch.cuda.synchronize()

    def checked(array, expected):  # payloads bit for bit, the rest by value
        got = to_host(array)
        if expected.dtype == BFLOAT16:
            got, expected = got.view(np.uint16), expected.view(np.uint16)
        np.testing.assert_array_equal(got, expected)

    with torch.cuda.stream(torch.cuda.Stream()):  # a non-blocking stream, as PyTorch's streams are
        # warm-up with the final inputs: compiles the kernels, makes the Buffer's stream, and
        # prepares the handle's cached dispatch and combine, so the calls below only launch
        per_rank, _, per_expert, in_rank, event = buffer.get_dispatch_layout(idx_in, num_experts, async_finish=True)
        recv_x, _, recv_w, _, handle, event = buffer.dispatch(
            x_in, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idx_in, topk_weights=weights_in, previous_event=event, async_finish=True)
        event = buffer.dispatch(x_in, handle=handle, previous_event=event, async_finish=True)[5]
        event = buffer.combine(out_in, handle, topk_weights=recv_w, previous_event=event, async_finish=True)[2]
        event.current_stream_wait()
        torch.cuda.current_stream().synchronize()

        # cached dispatch: x_in is zeros until the spin ends, then x2
        x_in.zero_()
        torch.cuda.current_stream().synchronize()
        previous, slept = _write_after_sleep((x_in, x2))
        recv_x2, _, _, _, _, event = buffer.dispatch(x_in, handle=handle, previous_event=previous, async_finish=True)
        assert not slept.query(), "the cached dispatch waited on the host: this test cannot check its GPU wait"
        event.current_stream_wait()
        checked(recv_x2, want2[me]["recv_x"])

        # combine: out_in is zeros until the spin ends, then the experts' outputs
        out_in.zero_()
        torch.cuda.current_stream().synchronize()
        previous, slept = _write_after_sleep((out_in, out))
        combined, combined_w, event = buffer.combine(out_in, handle, topk_weights=recv_w, previous_event=previous,
                                                     async_finish=True)
        assert not slept.query(), "the combine waited on the host: this test cannot check its GPU wait"
        event.current_stream_wait()
        checked(combined, want_x)
        checked(combined_w, want_w)

        # layout: idx_in is -1 everywhere (no token routed) until the spin ends
        idx_in.fill_(-1)
        torch.cuda.current_stream().synchronize()
        previous, _ = _write_after_sleep((idx_in, idx))
        per_rank, _, per_expert, in_rank, event = buffer.get_dispatch_layout(idx_in, num_experts, async_finish=True,
                                                                             previous_event=previous)
        event.current_stream_wait()
        checked(per_rank, want_per_rank)
        checked(per_expert, want_per_expert)
        checked(in_rank, want_in_rank)

        # non-cached dispatch: payload and top-k weights are zeros until the spin ends
        x_in.zero_()
        weights_in.zero_()
        torch.cuda.current_stream().synchronize()
        previous, _ = _write_after_sleep((x_in, x), (weights_in, weights))
        recv_x, recv_idx, recv_w, _, _, event = buffer.dispatch(
            x_in, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idx_in, topk_weights=weights_in, previous_event=previous, async_finish=True)
        event.current_stream_wait()
        checked(recv_x, want[me]["recv_x"])
        checked(recv_idx, want[me]["recv_topk_idx"])
        checked(recv_w, want[me]["recv_topk_weights"])
    torch.cuda.synchronize()
    buffer.destroy()


@pytest.mark.parametrize("ranks", RANKS)
def test_gpu_worst_case_outputs(group, ranks):
    """num_worst_tokens: the routing patterns into outputs of every token of every rank, then
    DeepEP's shape with the put path forced (no host wait, padding rows, combine ignores them)."""
    import xmoe

    to_device, to_host = torch_io()
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(512, 257, ranks, 8 * ranks, 4, np.float32))
    run_standard_cases(buffer, group, 512, 256, 8 * ranks, 4, BFLOAT16, 128, to_device, to_host, worst_case=True)
    buffer.destroy()
    routing = make_routing(12, ranks, 4096, 7168, 256, 8, BFLOAT16, "random", mask_prob=0.05)
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(4096, 7168, ranks, 256, 8))
    run_and_check(buffer, group, routing, 1, True, to_device, to_host, xmoe.Config(force_put=True),
                  num_worst_tokens=4096 * ranks)
    buffer.destroy()


@pytest.mark.mpi(ranks=2)
def test_gpu_worst_case_too_short_raises(group):
    """More rows than num_worst_tokens: the dispatch does not wait for the count, so the error
    raises from it when its kernel has finished by its end, else from the next call (which
    checks before it communicates). Rank 0 receives every token; rank 1 none, and succeeds."""
    import torch

    import xmoe
    from xmoe.interop import to_host

    buffer = xmoe.Buffer(group, 1 << 20)
    routing = make_routing(5, 2, 64, 32, 4, 2, np.float32, "one_rank")
    idx = torch.from_numpy(routing.topk_idx[group.rank]).cuda()
    x = torch.from_numpy(routing.x[group.rank]).cuda()
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=idx, num_worst_tokens=10)
    if group.rank == 0:
        with pytest.raises(RuntimeError, match="received 128 rows, more than the num_worst_tokens"):
            handle = buffer.dispatch(x, **args)[4]
            torch.cuda.synchronize()
            buffer.dispatch(x, handle=handle)
    else:
        recv_x, _, _, _, handle, _ = buffer.dispatch(x, **args)
        assert recv_x.shape[0] == 10 and (to_host(handle.recv_src_idx) == -1).all()
    buffer.destroy()


@pytest.mark.parametrize("ranks", RANKS)
def test_gpu_cuda_graph_replays(group, ranks):
    """A worst-case dispatch and a combine captured in one CUDA graph: the kernels number each
    replay's calls on the device, so every replay, with a new payload copied into the captured
    input, gives that payload's results; eager calls after the replays still pair up with the
    peers'. The captured outputs are poisoned before every replay (the capture itself takes
    no poisoning)."""
    import torch

    import xmoe
    import xmoe.interop
    from xmoe import reference

    to_device, to_host = torch_io()
    me, num_experts = group.rank, 16
    routing = make_routing(31, ranks, 200, 256, num_experts, 4, BFLOAT16)
    buffer = xmoe.Buffer(group, xmoe.Buffer.get_nvl_size_hint(200, 256, ranks, num_experts, 4))
    idx, x, weights = (to_device(a[me]) for a in (routing.topk_idx, routing.x, routing.topk_weights))
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=idx, topk_weights=weights, num_worst_tokens=ranks * 200)

    def layer():
        recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(x, **args)
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
        return recv_x, recv_idx, combined, combined_w

    layer()  # compiles and prepares every launch before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv_x, recv_idx, combined, combined_w = layer()
    in_ranks = [reference.dispatch_layout(i, num_experts, ranks)[2] for i in routing.topk_idx]
    for replay in range(4):
        payloads = [(p.astype(np.float32) * (replay + 2) - replay).astype(BFLOAT16) for p in routing.x]
        x.copy_(to_device(payloads[me]))
        for output in (recv_x, recv_idx, combined, combined_w):
            output.view(torch.uint8).fill_(xmoe.interop.POISON_BYTE)
        torch.cuda.synchronize()
        group.barrier()
        graph.replay()
        torch.cuda.synchronize()
        want = reference.dispatch(payloads, routing.topk_idx, routing.topk_weights, num_experts)
        rows = len(want[me]["recv_src_idx"])
        np.testing.assert_array_equal(to_host(recv_x)[:rows].view(np.uint16), want[me]["recv_x"].view(np.uint16))
        np.testing.assert_array_equal(to_host(recv_idx)[:rows], want[me]["recv_topk_idx"])
        assert (to_host(recv_idx)[rows:] == -1).all()
        want_x, want_w = reference.combine([w["recv_x"] for w in want], in_ranks,
                                           [w["recv_topk_weights"] for w in want])[me]
        np.testing.assert_array_equal(to_host(combined).view(np.uint16), want_x.view(np.uint16))
        np.testing.assert_array_equal(to_host(combined_w), want_w)
    eager_recv_x = layer()[0]  # eager again: the device's call count went on with the replays
    torch.cuda.synchronize()
    np.testing.assert_array_equal(to_host(eager_recv_x)[:rows].view(np.uint16), want[me]["recv_x"].view(np.uint16))
    counted = {name: value for name, value in args.items() if name != "num_worst_tokens"}
    with pytest.raises(ValueError, match="num_worst_tokens"):  # it would wait for counts a capture never makes
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            buffer.dispatch(x, **counted)
    buffer.destroy()


def test_gpu_packed_arguments_match_numba():
    """xmoe packs kernel arguments itself (``kernels/launch.py``) in what it takes to be Numba's
    kernel ABI: the bytes must equal what Numba's own dispatcher passes for the same
    arguments (ints, C-contiguous and strided arrays of several ranks, nested tuples), so
    that a numba-cuda upgrade that changes the ABI fails here instead of corrupting launches."""
    import ctypes

    import cupy
    from numba import cuda

    from xmoe.device_memory import DeviceArray
    from xmoe.kernels.launch import kernel_arg, pack

    @cuda.jit
    def kernel(a, n, b, pair, c):
        pass

    block = cupy.zeros(4096, np.uint8)
    strided = DeviceArray(block.data.ptr + 128, (3, 5, 4), np.dtype(np.int32), block, (1024, 16, 4))
    args = (cupy.arange(12, dtype=np.float32).reshape(3, 4), 7, strided,
            (cupy.zeros(5, np.int64), (3, DeviceArray(block.data.ptr, (8,), np.dtype(np.uint16), block))),
            cupy.zeros((2, 3, 4), np.uint8)[:, 1:])
    signature = tuple(kernel.typeof_pyval(kernel_arg(a)) for a in args)
    compiled = kernel.compile(signature)
    numba_args: list = []
    for ty, value in zip(compiled.argument_types, args):
        compiled._prepare_args(ty, kernel_arg(value), 0, [], numba_args)
    numba_bytes = b"".join(value.to_bytes(8, "little", signed=True) if isinstance(value, int) else bytes(value)
                           for value in numba_args)
    assert all(isinstance(v, int) or ctypes.sizeof(v) == 8 for v in numba_args)
    assert b"".join(pack(args)[1]) == numba_bytes


def test_gpu_prepared_launch_owns_its_arrays():
    """A launch prepared with a scratch array that nothing else holds keeps it alive: the packed
    bytes hold only its pointer, and CuPy's pool would hand the freed block to the next
    allocation of its size, which the launch would then write into (the low-latency dispatch's
    count scratch overwrote a combine's call-shape words so on the H200)."""
    import gc

    import cupy
    from numba import cuda

    from xmoe.device_memory import kernel_view
    from xmoe.kernels.launch import Prepared

    @cuda.jit
    def fill(out, value):
        for i in range(cuda.threadIdx.x, out.shape[0], cuda.blockDim.x):
            out[i] = value

    prepared = Prepared(fill, 1, 64, dict(out=kernel_view(cupy.zeros(4096, np.int32)), value=7), ())
    gc.collect()
    probe = cupy.zeros(4096, np.int32)  # the pool's most recently freed block of this size, if any
    prepared(0)
    cupy.cuda.Device().synchronize()
    assert int(cupy.count_nonzero(probe)) == 0
