"""Buffer: the DeepEP-shaped entry point for layout, dispatch and combine.

One Buffer owns one symmetric block of ``num_nvl_bytes`` on every rank. Every call is
collective (all ranks call the same sequence of dispatch/combine) and numbered on the
device (``xmoe.comm.device.call_number``: kernels captured in a CUDA graph number each
replay); the call number picks the parity half of the block (see ``layout/symmetric.py``)
and is the value of the signals, so the block is reused call after call with no reset.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from xmoe import runtime
from xmoe.comm import get_heap
from xmoe.comm.device import ERR_CAPACITY, ERR_MISMATCH, ERR_TIMEOUT, STATUS_ERROR, STATUS_INFO, STATUS_READY, transport
from xmoe.config import Config
from xmoe.event import EventOverlap, HostPlan, StreamPlan, check_previous_event
from xmoe.interop import (
    BFLOAT16,
    DeviceArray,
    HostWords,
    Origin,
    as_array,
    data_pointer,
    dtype_name,
    kernel_view,
    new_output,
    on_gpu,
    to_host,
    xp,
)
from xmoe.kernels.combine import prepare_combine
from xmoe.kernels.dispatch import RECEIVE, SEND, prepare_dispatch, prepare_notify
from xmoe.kernels.launch import Prepared
from xmoe.layout.dispatch import MAX_LOCAL_EXPERTS, check_threads, launch_dispatch_layout
from xmoe.layout.symmetric import SymmetricLayout, capacity_for, size_hint, symmetric_layout

PAYLOAD_DTYPES = ("float32", "bfloat16")

#: How long the host waits for a notify kernel beyond the call's own timeout (the kernel
#: may sit behind earlier work on the stream).
NOTIFY_GRACE_S = 60.0


def _empty(shape: tuple[int, ...] | int, dtype: Any, origin: Origin) -> Any:
    """A working array for the kernels, from PyTorch's allocator for PyTorch callers (CuPy's
    ``empty`` costs ~25 us of host time a call on the device machine), poisoned under
    ``XMOE_POISON=1``."""
    return new_output(shape, dtype, origin, raw=True)[0]


def _part(block: Any, first: int, shape: tuple[int, ...]) -> Any:
    """Elements ``first:first + prod(shape)`` of the flat array ``block``, shaped ``shape``."""
    if type(block) is DeviceArray:
        return block.part(first, shape)
    size = int(np.prod(shape))
    return block[first : first + size].reshape(shape)


@lru_cache(maxsize=64)
def _no_columns(rows: int, dtype: type) -> Any:
    """A ``[rows, 0]`` array: the top-k arguments of a call without top-k."""
    return kernel_view(xp().empty((rows, 0), dtype))


class DispatchHandle(NamedTuple):
    """What combine and a cached dispatch need from a dispatch (``handle[0]`` as in DeepEP).

    ``rank_prefix_matrix`` and ``num_tokens_per_rank`` are host NumPy arrays (None after a
    dispatch with ``num_worst_tokens``: the host never learns the counts); the other
    arrays live with the kernels (NumPy on the simulator; CuPy, or the caller's PyTorch
    tensors, on the GPU).

    Attributes:
        rank_prefix_matrix: int32 ``[ranks, ranks]``, ``[i][j]`` = tokens sent to rank j by ranks 0..i.
        recv_src_idx: int32 ``[num_recv]``, the source token index of every received row (-1: padding).
        is_token_in_rank: bool ``[tokens, ranks]`` of this rank's tokens.
        send_slot: int32 ``[tokens, ranks]``, slot of each token in each destination's region, -1 if not sent.
        num_tokens_per_rank: int32 ``[ranks]``, tokens this rank sends to each rank.
        recv_offsets: int32 ``[ranks + 1]``, first received row of each source rank.
        num_recv_tokens_per_expert_list: tokens received per local expert, padded to the alignment.
        num_local_experts: experts per rank.
        max_recv_per_source: the most tokens one source rank sent here (what combine sends back;
            a bound with ``num_worst_tokens``).
        num_recv: ``recv_x``'s length: the rows this rank received, or ``num_worst_tokens``.
        launches: the prepared launches (:class:`xmoe.kernels.launch.Prepared`) of the cached
            dispatches and combines that use this handle, by Buffer and argument set
            (internal: later calls change only the payloads).
    """

    rank_prefix_matrix: np.ndarray
    recv_src_idx: Any
    is_token_in_rank: Any
    send_slot: Any
    num_tokens_per_rank: Any
    recv_offsets: Any
    num_recv_tokens_per_expert_list: list[int]
    num_local_experts: int
    max_recv_per_source: int
    num_recv: int
    launches: dict


def _check_array(array: Any, origin: Origin, name: str, dtype: Any, shape: tuple[int | None, ...]) -> None:
    """``ValueError`` naming ``name`` unless ``array`` has ``dtype`` and ``shape`` (None: any size)."""
    if origin.dtype != dtype_name(dtype):
        raise ValueError(f"{name}: expected dtype {dtype_name(dtype)}, got {origin.dtype}")
    if len(array.shape) != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        wanted = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {wanted}, got {list(array.shape)}")


def _check_payload(array: Any, origin: Origin, name: str, rows: int | None = None) -> None:
    if origin.dtype not in PAYLOAD_DTYPES:
        raise ValueError(f"{name}: expected dtype float32 or bfloat16, got {origin.dtype}")
    _check_array(array, origin, name, origin.dtype, (rows, None))


_WORDS = {w: np.dtype(f"u{w}") for w in (8, 4, 2, 1)}


def _as_words(payload: Any) -> Any:
    """The rows of ``payload`` ``[rows, hidden]`` as the widest unsigned words (at most 8 bytes)
    that divide a row and the address."""
    row_bytes = payload.shape[1] * payload.itemsize
    span = row_bytes | data_pointer(payload) | 8
    word = span & -span  # its lowest set bit: the widest power of two dividing both, at most 8
    if type(payload) is DeviceArray:
        return DeviceArray(payload.ptr, (payload.shape[0], row_bytes // word), _WORDS[word], payload.owner)
    return payload.view(np.uint8).reshape(payload.shape[0], row_bytes).view(_WORDS[word])


@lru_cache(maxsize=None)  # never evicted: the Buffer's caches key on id(layout)
def _layout_for(nbytes: int, num_ranks: int, row_bytes: int, num_topk: int, num_local_experts: int) -> SymmetricLayout | None:
    capacity = capacity_for(nbytes, num_ranks, row_bytes, num_topk, num_local_experts)
    return None if capacity < 0 else symmetric_layout(num_ranks, capacity, row_bytes, num_topk, num_local_experts)


class Buffer:
    """Communication buffer for expert-parallel dispatch and combine.

    Args:
        group: the :class:`xmoe.Group` that ``xmoe.init()`` returned.
        num_nvl_bytes: bytes of symmetric memory per rank for intranode traffic; see
            :meth:`get_nvl_size_hint`.
        num_rdma_bytes: internode buffer bytes; must be 0 (intranode only for now).
        low_latency_mode: must be False (the low-latency path is not built yet).
    """

    def __init__(self, group: runtime.Group, num_nvl_bytes: int, num_rdma_bytes: int = 0, low_latency_mode: bool = False) -> None:
        runtime.get_group()
        if not isinstance(group, runtime.Group):
            raise ValueError(f"group: expected the xmoe.Group that xmoe.init() returned, got {type(group).__name__}")
        if not isinstance(num_nvl_bytes, (int, np.integer)) or num_nvl_bytes <= 0:
            raise ValueError(f"num_nvl_bytes={num_nvl_bytes!r}: must be a positive int")
        if num_rdma_bytes != 0:
            raise ValueError(f"num_rdma_bytes={num_rdma_bytes}: internode (RDMA) buffers are not supported yet; pass 0")
        if low_latency_mode:
            raise ValueError("low_latency_mode=True: the low-latency path is not supported yet")
        self.group = group
        self.rank = group.rank
        self.num_ranks = group.world_size
        self.num_nvl_bytes = int(num_nvl_bytes)
        self._block = get_heap(group).alloc(self.num_nvl_bytes)
        # where each peer's block lies from this rank's (same-GPU or NVLink peers, mapped here)
        base = data_pointer(self._block.local)
        offsets = np.array([data_pointer(peer) - base for peer in self._block.peers], np.int64)
        self._peer_offsets = kernel_view(xp().asarray(offsets))
        self._seq = 0
        # what config=None means, resolved once: reading the environment costs a few us a call
        self._default_config = Config().resolved(group.backend)
        self._work = kernel_view(xp().zeros(4, np.int32))  # the kernels' work counters (comm/device.py)
        self._calls = kernel_view(xp().zeros(1, np.int64))  # calls finished, counted on the device (call_number)
        self._rank_counts = kernel_view(xp().empty(self.num_ranks, np.int32))
        self._no_counts = kernel_view(xp().zeros(0, np.int32))
        self._status = HostWords(STATUS_INFO + self.num_ranks * self.num_ranks + MAX_LOCAL_EXPERTS)
        self._failure: str | None = None
        self._last_call = ("dispatch", 0.0)  # what a late error report names: the call and its timeout
        self._halves: dict[tuple, Any] = {}
        self._launches: dict[tuple, Prepared] = {}  # the non-cached dispatch's prepared launches
        self._comm_stream = None

    # ----------------------------------------------------------------- sizes
    @staticmethod
    def get_nvl_size_hint(
        num_max_tokens: int, hidden: int, num_ranks: int, num_experts: int, num_topk: int = 0, dtype: Any = BFLOAT16
    ) -> int:
        """Bytes of ``num_nvl_bytes`` that dispatch and combine need.

        Args:
            num_max_tokens: most tokens any rank passes to one call.
            hidden: channels per token.
            num_ranks: ranks of the group.
            num_experts: experts in total (a multiple of ``num_ranks``).
            num_topk: top-k entries per token (0 without top-k).
            dtype: payload dtype of the widest call (float32 or bfloat16).
        """
        row_bytes = hidden * np.dtype(dtype).itemsize
        return size_hint(num_max_tokens, num_ranks, row_bytes, num_topk, num_experts // num_ranks)

    # --------------------------------------------------------------- helpers
    def _check_usable(self) -> None:
        runtime.get_group()
        if self._block is None:
            raise RuntimeError("this Buffer was destroyed")
        self._take_kernel_error()
        if self._failure is not None:
            raise RuntimeError(f"this Buffer is unusable after an earlier failure ({self._failure}); create a new Buffer")

    def _config(self, config: Config | None) -> Config:
        if config is not None and not isinstance(config, Config):
            raise ValueError(f"config: expected an xmoe.Config or None, got {type(config).__name__}")
        return self._default_config if config is None else config.resolved(self.group.backend)

    def _layout(self, row_bytes: int, num_topk: int, num_local_experts: int, rows: int, what: str) -> SymmetricLayout:
        layout = _layout_for(self.num_nvl_bytes, self.num_ranks, row_bytes, num_topk, num_local_experts)
        if layout is None or rows > layout.capacity:
            need = size_hint(rows, self.num_ranks, row_bytes, num_topk, num_local_experts)
            raise ValueError(
                f"num_nvl_bytes={self.num_nvl_bytes} is too small for {what} of {rows} tokens per rank "
                f"({row_bytes} bytes each, top-{num_topk}): it needs {need} bytes (Buffer.get_nvl_size_hint)"
            )
        return layout

    def _fields(self, layout: SymmetricLayout, parity: int, word: np.dtype) -> dict[str, Any]:
        """This rank's views of the fields of half ``parity``, the payload also as ``word``-sized
        integers (``x_words``), as the kernels take them (they reach a peer's field through
        :attr:`_peer_offsets`)."""
        views = layout.views(self._block.local, parity)
        views["x_words"] = views["x"].view(word)
        return {name: kernel_view(view) for name, view in views.items()}

    def _plan(self, framework: str, previous_event: EventOverlap | None, async_finish: bool) -> StreamPlan | HostPlan:
        check_previous_event(previous_event)
        if not on_gpu():
            return HostPlan()
        if async_finish and self._comm_stream is None:
            import cupy

            self._comm_stream = cupy.cuda.Stream(non_blocking=True)
        return StreamPlan(framework, self._comm_stream, previous_event, async_finish)

    def _halves_of(self, layout: SymmetricLayout, word: np.dtype, names: tuple[str, ...],
                   field_word: np.dtype | None = None) -> Any:
        """For each parity half: this rank's view of every field in ``names`` (payloads as
        ``word``-sized integers), then, with ``field_word``, its payload field as those words.
        A kernel picks the half of its call on the device
        (see :func:`xmoe.comm.device.call_number`)."""
        key = (id(layout), word.itemsize, names, field_word)
        halves = self._halves.get(key)
        if halves is None:
            parts = []
            for parity in (0, 1):
                fields = self._fields(layout, parity, word)
                views = [fields[name] for name in names]
                if field_word is not None:
                    views.append(self._fields(layout, parity, field_word)["x_words"])
                parts.append(tuple(views))
            halves = self._halves[key] = tuple(parts)
        return halves

    def _next_call(self, what: str, config: Config) -> int:
        """The host's number of this call (``_wait_for_notify`` looks for it), remembered with the
        call's name and timeout for a later error report."""
        self._seq += 1
        self._last_call = (what, config.timeout_s)
        return self._seq

    def _take_kernel_error(self) -> None:
        """Retire this Buffer (record its failure, once) when a kernel has left an error code in
        the status words."""
        code = int(self._status.host[STATUS_ERROR])
        if code and self._failure is None:
            self._failure = self._error_message(code, *self._last_call)

    def _raise_on_error(self) -> None:
        """Raise, and retire this Buffer, when a kernel has left an error code in the status words
        (the simulator's kernels have finished when this runs; on the GPU a later call sees it)."""
        self._take_kernel_error()
        if self._failure is not None:
            raise RuntimeError(self._failure)

    def _wait_for_notify(self, seq: int, timeout_s: float) -> None:
        """Spin until the notify kernel of call ``seq`` has left its counts in the status words."""
        status = self._status.host
        if status[STATUS_READY] != seq:
            start = time.perf_counter()
            deadline = start + timeout_s + NOTIFY_GRACE_S
            while status[STATUS_READY] != seq:
                if time.perf_counter() > deadline:
                    self._failure = f"dispatch: the notify kernel did not finish within {timeout_s + NOTIFY_GRACE_S} s"
                    raise RuntimeError(self._failure)
            StreamPlan.waited_s += time.perf_counter() - start
        self._raise_on_error()

    def _error_message(self, code: int, what: str, timeout_s: float) -> str:
        if code >= ERR_CAPACITY:
            message = (f"dispatch: rank {self.rank} received {code - ERR_CAPACITY} rows, more than the "
                       f"num_worst_tokens its recv_x holds; nothing was received")
        elif code >= ERR_MISMATCH:
            peer = code - ERR_MISMATCH
            message = (
                f"{what}: rank {peer} called {what} with a different hidden size, top-k or expert count "
                f"than rank {self.rank}"
            )
        else:
            peer = code - ERR_TIMEOUT
            message = f"{what}: rank {peer} never arrived within {timeout_s} s (did every rank call {what}?)"
        return message

    def _num_local_experts(self, num_experts: Any) -> int:
        if not isinstance(num_experts, (int, np.integer)) or num_experts <= 0:
            raise ValueError(f"num_experts={num_experts!r}: must be a positive int")
        if num_experts % self.num_ranks:
            raise ValueError(f"num_experts={num_experts} is not divisible by the {self.num_ranks} ranks")
        return int(num_experts) // self.num_ranks

    # ---------------------------------------------------------------- layout
    def get_dispatch_layout(
        self, topk_idx: Any, num_experts: int, previous_event: EventOverlap | None = None, async_finish: bool = False
    ) -> tuple[Any, None, Any, Any, EventOverlap]:
        """Count the tokens each rank and each expert receives from this rank.

        Args:
            topk_idx: int64 ``[tokens, k]``, expert ids in ``[0, num_experts)``, -1 for a masked slot.
            num_experts: experts in total, a multiple of the rank count.
            previous_event / async_finish: as in DeepEP (see :class:`EventOverlap`).

        Returns:
            ``(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event)``:
            int32 ``[ranks]``, None (intranode), int32 ``[num_experts]``, bool ``[tokens, ranks]``.
        """
        self._check_usable()
        idx, origin = as_array(topk_idx, "topk_idx")
        _check_array(idx, origin, "topk_idx", np.int64, (None, None))
        self._num_local_experts(num_experts)
        config = self._config(None)
        plan = self._plan(origin.framework, previous_event, async_finish)
        arrays = xp()
        tokens_per_rank, per_rank_out = new_output(self.num_ranks, np.int32, origin)
        tokens_per_expert, per_expert_out = new_output(num_experts, np.int32, origin)
        is_token_in_rank, in_rank_out = new_output((idx.shape[0], self.num_ranks), np.bool_, origin)
        errors = arrays.zeros(1, np.int32)
        launch_dispatch_layout(idx, num_experts, tokens_per_rank, tokens_per_expert, is_token_in_rank, errors,
                               config.num_threads, plan.pointer)
        plan.synchronize()
        code = int(to_host(errors)[0])
        if code:
            t, j = divmod(code - 1, idx.shape[1])
            raise ValueError(f"topk_idx[{t}, {j}]={int(to_host(idx[t, j]))}: expert ids must be -1 or in "
                             f"[0, {num_experts})")
        return per_rank_out(), None, per_expert_out(), in_rank_out(), plan.finish()

    # -------------------------------------------------------------- dispatch
    def dispatch(
        self,
        x: Any,
        handle: DispatchHandle | None = None,
        num_tokens_per_rank: Any = None,
        is_token_in_rank: Any = None,
        num_tokens_per_expert: Any = None,
        topk_idx: Any = None,
        topk_weights: Any = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
    ) -> tuple[Any, Any, Any, list[int], DispatchHandle, EventOverlap]:
        """Send each token to every rank that holds one of its experts.

        Args:
            x: float32 or bfloat16 ``[tokens, hidden]``; hidden is the same on every rank.
            handle: a previous dispatch's handle: repeat its routing (cached mode); the
                layout arguments and top-k are then not passed.
            num_tokens_per_rank: int32 ``[ranks]`` from :meth:`get_dispatch_layout`.
            is_token_in_rank: bool ``[tokens, ranks]`` from :meth:`get_dispatch_layout`.
            num_tokens_per_expert: int32 ``[experts]`` from :meth:`get_dispatch_layout`.
            topk_idx: int64 ``[tokens, k]`` or None.
            topk_weights: float32 ``[tokens, k]`` or None (needs ``topk_idx``).
            expert_alignment: per-expert received counts are padded to a multiple of it.
            num_worst_tokens: 0, or the rows of worst-case-sized outputs (DeepEP's option): the
                host then never waits for the received count, so the whole dispatch is queued at
                once, and it can be captured in a CUDA graph (with cached dispatches and
                combines: the kernels number calls on the device). Rows past the received count are
                padding: ``recv_topk_idx`` -1, ``recv_topk_weights`` 0, ``recv_x`` unspecified;
                the per-expert list is empty and the handle's ``rank_prefix_matrix`` and
                ``num_tokens_per_rank`` are None. More rows than this is an error, raised (and
                the Buffer retired) by this call if its kernel has finished by the call's end
                (always on the simulator), else by the Buffer's next call; nothing is received.
            config: launch configuration; None for the defaults (with the environment as it was
                when the Buffer was created: ``XMOE_TIMEOUT_S``, ``XMOE_FORCE_PUT``).
            previous_event / async_finish: as in DeepEP (see :class:`EventOverlap`).

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``:
            ``recv_x`` ``[recv, hidden]`` ordered by source rank then source token;
            ``recv_topk_idx`` int64 ``[recv, k]`` local expert ids (-1: not on this rank);
            ``recv_topk_weights`` float32 ``[recv, k]`` (0 where the id is -1), both None
            without top-k or in cached mode; a list of ints per local expert. ``recv`` is
            ``num_worst_tokens`` when that is given.
        """
        self._check_usable()
        config = self._config(config)
        payload, origin = as_array(x, "x", raw=True)
        _check_payload(payload, origin, "x")
        plan = self._plan(origin.framework, previous_event, async_finish)
        num_tokens = payload.shape[0]
        if handle is not None:
            self._check_cached(handle, num_tokens, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                               topk_idx, topk_weights, num_worst_tokens)
            return self._cached_dispatch(payload, origin, handle, config, plan)
        in_rank, expert_counts, idx, weights = self._routing(num_tokens, num_tokens_per_rank, is_token_in_rank,
                                                             num_tokens_per_expert, topk_idx, topk_weights,
                                                             expert_alignment, num_worst_tokens, config)
        if not num_worst_tokens and plan.capturing():
            raise ValueError("num_worst_tokens: required to capture a dispatch in a CUDA graph (without it the "
                             "host waits for the receive counts, which a capture never produces)")
        ranks = self.num_ranks
        num_local_experts = expert_counts.shape[0] // ranks
        row_bytes = payload.shape[1] * payload.itemsize
        layout = self._layout(row_bytes, idx.shape[1], num_local_experts, num_tokens, "dispatch")
        words = _as_words(payload)
        seq = self._next_call("dispatch", config)
        writes = transport(config.force_put)
        # the handle's arrays in one allocation: send slots, receive offsets, room for the
        # source index of every row this rank can receive
        src_idx_first = num_tokens * ranks + ranks + 1
        handle_block = _empty(src_idx_first + max(ranks * layout.capacity, num_worst_tokens), np.int32, origin)
        send_slot = _part(handle_block, 0, (num_tokens, ranks))
        recv_offsets = _part(handle_block, num_tokens * ranks, (ranks + 1,))
        key = (id(layout), words.dtype, config)
        notify = self._launches.get(("notify",) + key)
        if notify is None:
            notify = self._launches[("notify",) + key] = prepare_notify(
                writes, config.num_threads,
                (in_rank, expert_counts, send_slot, self._rank_counts, self._peer_offsets,
                 self._halves_of(layout, words.dtype, ("meta", "notify_signals")), self.rank, self._calls, seq,
                 row_bytes, idx.shape[1], config.timeout_ns, self._work, recv_offsets, self._status.device),
                changing=(0, 1, 2, 8, 13))
        notify(plan.pointer, in_rank, expert_counts, send_slot, seq, recv_offsets)
        if num_worst_tokens:  # the outputs are sized already: send and receive in one launch, no waiting
            counts, num_recv, phases = None, int(num_worst_tokens), SEND | RECEIVE
        else:  # the send is queued behind notify now; the receive once the host has sized the outputs
            send = self._launches.get(("send",) + key)
            if send is None:
                no_rows = (_no_columns(0, words.dtype), self._no_counts, _no_columns(0, np.int64),
                           _no_columns(0, np.float32))
                send = self._launches[("send",) + key] = prepare_dispatch(
                    writes, SEND, config, self._dispatch_args(layout, words, idx, weights, send_slot,
                                                              num_local_experts, config, recv_offsets, *no_rows),
                    changing=(0, 1, 2, 3, 14))
            send(plan.pointer, words, idx, weights, send_slot, recv_offsets)
            self._wait_for_notify(seq, config.timeout_s)
            counts = self._status.host[STATUS_INFO : STATUS_INFO + ranks * ranks].reshape(ranks, ranks).copy()
            num_recv, phases = int(counts[:, self.rank].sum()), RECEIVE  # counts: row = source
        recv_src_idx = _part(handle_block, src_idx_first, (num_recv,))
        recv_x, recv_x_out = new_output((num_recv, payload.shape[1]), payload.dtype, origin,
                                        origin.dtype == "bfloat16", raw=True)
        has_topk = topk_idx is not None
        if has_topk:
            recv_idx, recv_idx_out = new_output((num_recv, idx.shape[1]), np.int64, origin, raw=True)
            recv_weights, recv_weights_out = new_output((num_recv, idx.shape[1]), np.float32, origin, raw=True)
        else:
            recv_idx, recv_weights = _no_columns(num_recv, np.int64), _no_columns(num_recv, np.float32)
        recv_words = _as_words(recv_x)
        receive_key = ("receive", phases, recv_words.dtype) + key
        receive = self._launches.get(receive_key)
        if receive is None:
            receive = self._launches[receive_key] = prepare_dispatch(
                writes, phases, config, self._dispatch_args(layout, words, idx, weights, send_slot,
                                                            num_local_experts, config, recv_offsets, recv_words,
                                                            recv_src_idx, recv_idx, recv_weights),
                changing=(0, 1, 2, 3, 14, 15, 16, 17, 18))
        receive(plan.pointer, words, idx, weights, send_slot, recv_offsets, recv_words, recv_src_idx, recv_idx,
                recv_weights)
        # after the launch: the GPU need not wait for this
        handle = self._new_handle(counts, num_recv, in_rank, send_slot, recv_offsets, recv_src_idx,
                                  int(expert_alignment), num_local_experts, layout.capacity)
        self._raise_on_error()
        return (
            recv_x_out(),
            recv_idx_out() if has_topk else None,
            recv_weights_out() if has_topk and topk_weights is not None else None,
            list(handle.num_recv_tokens_per_expert_list),
            handle,
            plan.finish(),
        )

    def _dispatch_args(self, layout: SymmetricLayout, words: Any, idx: Any, weights: Any, send_slot: Any,
                       num_local_experts: int, config: Config, recv_offsets: Any, recv_words: Any, recv_src_idx: Any,
                       recv_idx: Any, recv_weights: Any) -> tuple:
        """The arguments of :func:`xmoe.kernels.dispatch.dispatch_kernel` after ``phases``."""
        halves = self._halves_of(layout, words.dtype, ("x_words", "src_idx", "topk_idx", "topk_weights", "meta",
                                                       "signals"), recv_words.dtype)
        return (
            words, idx, weights, send_slot, num_local_experts, self._no_counts, self._peer_offsets, halves, self.rank,
            self._calls, words.shape[1] * words.itemsize, self._work, config.timeout_ns, self._status.device,
            recv_offsets, recv_words, recv_src_idx, recv_idx, recv_weights,
        )

    def _cached_dispatch(self, payload: Any, origin: Origin, handle: DispatchHandle, config: Config,
                         plan: StreamPlan | HostPlan) -> tuple:
        """A dispatch that repeats ``handle``'s routing: one launch that sends and receives,
        prepared once per handle and argument set."""
        recv_x, recv_x_out = new_output((handle.num_recv, payload.shape[1]), payload.dtype, origin,
                                        origin.dtype == "bfloat16", raw=True)
        words, recv_words = _as_words(payload), _as_words(recv_x)
        self._next_call("dispatch", config)
        key = ("dispatch", id(self), words.shape, words.dtype, recv_words.dtype, config)
        prepared = handle.launches.get(key)
        if prepared is None:
            row_bytes = payload.shape[1] * payload.itemsize
            layout = self._layout(row_bytes, 0, handle.num_local_experts, payload.shape[0], "dispatch")
            args = self._dispatch_args(layout, words, _no_columns(payload.shape[0], np.int64),
                                       _no_columns(payload.shape[0], np.float32), handle.send_slot,
                                       handle.num_local_experts, config, handle.recv_offsets, recv_words,
                                       handle.recv_src_idx, _no_columns(handle.num_recv, np.int64),
                                       _no_columns(handle.num_recv, np.float32))
            prepared = handle.launches[key] = prepare_dispatch(transport(config.force_put), SEND | RECEIVE, config,
                                                               args, changing=(0, 15))  # words, recv_words
        prepared(plan.pointer, words, recv_words)
        self._raise_on_error()
        return recv_x_out(), None, None, list(handle.num_recv_tokens_per_expert_list), handle, plan.finish()

    def _new_handle(self, counts: np.ndarray | None, num_recv: int, in_rank: Any, send_slot: Any, recv_offsets: Any,
                    recv_src_idx: Any, alignment: int, num_local_experts: int, capacity: int) -> DispatchHandle:
        """The handle of a dispatch from its count matrix ``counts`` (row = source), the rows it
        received and the per-expert counts the notify kernel left in the status words; with
        ``counts`` None (worst-case outputs of ``num_recv`` rows) the host knows no counts, and
        a source sent at most the ``capacity`` rows of its region."""
        if counts is None:
            return DispatchHandle(None, recv_src_idx, in_rank, send_slot, None, recv_offsets, [], num_local_experts,
                                  min(num_recv, capacity), num_recv, {})
        ranks = self.num_ranks
        first = STATUS_INFO + ranks * ranks
        per_expert = self._status.host[first : first + num_local_experts]
        if alignment > 1:
            per_expert = -(-per_expert // alignment) * alignment
        return DispatchHandle(counts.cumsum(axis=0, dtype=np.int32), recv_src_idx, in_rank, send_slot,
                              counts[self.rank], recv_offsets, per_expert.tolist(), num_local_experts,
                              int(counts[:, self.rank].max()), num_recv, {})

    def _check_cached(self, handle, num_tokens, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                      topk_idx, topk_weights, num_worst_tokens) -> None:
        if not isinstance(handle, DispatchHandle):
            raise ValueError(f"handle: expected the DispatchHandle a dispatch returned, got {type(handle).__name__}")
        passed = [name for name, value in (("num_tokens_per_rank", num_tokens_per_rank),
                                           ("is_token_in_rank", is_token_in_rank),
                                           ("num_tokens_per_expert", num_tokens_per_expert),
                                           ("topk_idx", topk_idx), ("topk_weights", topk_weights),
                                           ("num_worst_tokens", num_worst_tokens or None)) if value is not None]
        if passed:
            raise ValueError(f"{', '.join(passed)}: not taken with handle= (cached dispatch repeats the handle's routing)")
        if handle.is_token_in_rank.shape != (num_tokens, self.num_ranks):
            raise ValueError(f"x: {num_tokens} tokens, but the handle routes {handle.is_token_in_rank.shape[0]} tokens "
                             f"over {handle.is_token_in_rank.shape[1]} ranks")

    def _routing(self, num_tokens, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                 topk_weights, expert_alignment, num_worst_tokens, config):
        """The routing arguments of a non-cached dispatch, checked: ``(is_token_in_rank,
        num_tokens_per_expert, topk_idx, topk_weights)`` as kernel arrays."""
        missing = [name for name, value in (("num_tokens_per_rank", num_tokens_per_rank),
                                            ("is_token_in_rank", is_token_in_rank),
                                            ("num_tokens_per_expert", num_tokens_per_expert)) if value is None]
        if missing:
            raise ValueError(f"{', '.join(missing)}: required without handle= (from get_dispatch_layout)")
        if not isinstance(expert_alignment, (int, np.integer)) or expert_alignment < 1:
            raise ValueError(f"expert_alignment={expert_alignment!r}: must be an int >= 1")
        if not isinstance(num_worst_tokens, (int, np.integer)) or num_worst_tokens < 0:
            raise ValueError(f"num_worst_tokens={num_worst_tokens!r}: must be an int >= 0")
        check_threads(config.num_threads)
        ranks = self.num_ranks
        per_rank, origin = as_array(num_tokens_per_rank, "num_tokens_per_rank", raw=True)
        _check_array(per_rank, origin, "num_tokens_per_rank", np.int32, (ranks,))
        in_rank, origin = as_array(is_token_in_rank, "is_token_in_rank", raw=True)
        _check_array(in_rank, origin, "is_token_in_rank", np.bool_, (num_tokens, ranks))
        expert_counts, origin = as_array(num_tokens_per_expert, "num_tokens_per_expert", raw=True)
        _check_array(expert_counts, origin, "num_tokens_per_expert", np.int32, (None,))
        if self._num_local_experts(expert_counts.shape[0]) > MAX_LOCAL_EXPERTS:
            raise ValueError(f"num_tokens_per_expert: at most {MAX_LOCAL_EXPERTS} experts per rank, got "
                             f"{expert_counts.shape[0] // ranks}")
        if topk_idx is not None:
            idx, origin = as_array(topk_idx, "topk_idx", raw=True)
            _check_array(idx, origin, "topk_idx", np.int64, (num_tokens, None))
        else:
            idx = _no_columns(num_tokens, np.int64)
        if topk_weights is not None:
            if topk_idx is None:
                raise ValueError("topk_weights: passed without topk_idx")
            weights, origin = as_array(topk_weights, "topk_weights", raw=True)
            _check_array(weights, origin, "topk_weights", np.float32, idx.shape)
        elif topk_idx is None:
            weights = _no_columns(num_tokens, np.float32)
        else:
            weights = kernel_view(xp().zeros(idx.shape, np.float32))
        return in_rank, expert_counts, idx, weights

    # --------------------------------------------------------------- combine
    def combine(
        self,
        x: Any,
        handle: DispatchHandle,
        topk_weights: Any = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
    ) -> tuple[Any, Any, EventOverlap]:
        """Send every received row back to its source token and sum the copies.

        Args:
            x: float32 or bfloat16 ``[recv, hidden]``, rows in the order dispatch returned.
            handle: the dispatch's handle.
            topk_weights: float32 ``[recv, k]`` or None.
            config / previous_event / async_finish: as in :meth:`dispatch`.

        Returns:
            ``(combined_x, combined_topk_weights, event)``: ``[tokens, hidden]`` in x's dtype,
            each token the fp32 sum, in rank order, of the rows sent back for it (0 for a
            token routed nowhere); float32 ``[tokens, k]`` likewise, or None.
        """
        self._check_usable()
        config = self._config(config)
        if not isinstance(handle, DispatchHandle):
            raise ValueError(f"handle: expected the DispatchHandle a dispatch returned, got {type(handle).__name__}")
        num_recv = handle.num_recv
        payload, origin = as_array(x, "x", raw=True)
        _check_payload(payload, origin, "x", num_recv)
        if topk_weights is not None:
            weights, weights_origin = as_array(topk_weights, "topk_weights", raw=True)
            _check_array(weights, weights_origin, "topk_weights", np.float32, (num_recv, None))
        else:
            weights = _no_columns(num_recv, np.float32)
        plan = self._plan(origin.framework, previous_event, async_finish)
        num_tokens = handle.is_token_in_rank.shape[0]
        out, out_finish = new_output((num_tokens, payload.shape[1]), payload.dtype, origin, origin.dtype == "bfloat16",
                                     raw=True)
        if topk_weights is not None:
            out_weights, out_weights_finish = new_output((num_tokens, weights.shape[1]), np.float32, origin, raw=True)
        else:
            out_weights = _no_columns(num_tokens, np.float32)
        words, out_words = _as_words(payload), _as_words(out)
        self._next_call("combine", config)
        key = ("combine", id(self), words.shape, words.dtype, out_words.dtype, payload.dtype, weights.shape, config)
        prepared = handle.launches.get(key)
        if prepared is None:
            prepared = handle.launches[key] = self._prepare_combine(handle, payload, words, weights, out_words,
                                                                    out_weights, config)
        prepared(plan.pointer, words, weights, out_words, out_weights)
        self._raise_on_error()
        return out_finish(), out_weights_finish() if topk_weights is not None else None, plan.finish()

    def _prepare_combine(self, handle: DispatchHandle, payload: Any, words: Any, weights: Any, out_words: Any,
                         out_weights: Any, config: Config) -> Prepared:
        """The combine launch for ``handle`` and this argument set, prepared once: later calls
        change the payload, the top-k weights and the outputs."""
        row_bytes = payload.shape[1] * payload.itemsize
        layout = self._layout(row_bytes, weights.shape[1], handle.num_local_experts, handle.max_recv_per_source,
                              "combine")
        halves = self._halves_of(layout, words.dtype, ("x_words", "topk_weights", "meta", "signals"),
                                 out_words.dtype)
        args = (
            words, weights, handle.recv_offsets, self._peer_offsets, halves, self.rank, self._calls, row_bytes,
            handle.num_local_experts, self._no_counts, self._work, config.timeout_ns, self._status.device,
            handle.send_slot, out_words, out_weights,
        )
        return prepare_combine(transport(config.force_put), payload.dtype, out_words.dtype, config, args,
                               changing=(0, 1, 14, 15))

    # ------------------------------------------------------------- lifetime
    def destroy(self) -> None:
        """Free the symmetric block (collective: every rank calls it)."""
        if self._block is not None:
            self._halves.clear()
            self._block.free()
            self._block = None
            self._status.free()

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.destroy()
