"""What the host side of every mode shares for one Buffer: the symmetric block and its views,
the device's call counter and work counters, the status words, and the Buffer's health.

Every call is collective and numbered on the device (``comm.protocol.call_number``); the
host numbers its calls too (``begin``), only to recognise the counts of its own dispatch
in the status words, and remembers the last call begun to name it in an error report.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from xmoe.comm.protocol import WORK_WORDS
from xmoe.comm.status import StatusWords, describe
from xmoe.device_memory import HostWords, data_pointer, kernel_view, strided_view, xp
from xmoe.layout.symmetric import SymmetricLayout, capacity_for, symmetric_layout

#: How long the host waits for a dispatch's counts beyond the call's own timeout (its
#: kernel may sit behind earlier work on the stream).
COUNTS_GRACE_S = 60.0


class BufferState:
    """One Buffer's symmetric block and call bookkeeping (see the module).

    Args:
        rank, num_ranks: this rank and the group's size.
        block: the :class:`xmoe.comm.heap.SymmetricArray` of the Buffer.
    """

    def __init__(self, rank: int, num_ranks: int, block: Any) -> None:
        self.rank, self.num_ranks = rank, num_ranks
        self.block = block
        self.nbytes = block.nbytes
        base = data_pointer(block.local)
        offsets = np.array([data_pointer(peer) - base for peer in block.peers], np.int64)
        self.peer_offsets = kernel_view(xp().asarray(offsets))  # where each peer's block lies from this one
        self.calls = kernel_view(xp().zeros(1, np.int64))  # calls finished, counted on the device
        self.work = kernel_view(xp().zeros(WORK_WORDS, np.int32))  # the kernels' work counters
        self.status = StatusWords(num_ranks, HostWords(StatusWords.length(num_ranks)))
        self.failure: str | None = None
        self.seq = 0
        self._last_call: tuple[str, tuple[int, ...], float] = ("dispatch", (), 0.0)
        self._layouts: dict[tuple[int, int, int], SymmetricLayout | None] = {}
        self._halves: dict[tuple, tuple] = {}
        self._shapes: dict[tuple[int, ...], Any] = {}

    # ----------------------------------------------------------- the block
    def layout(self, row_bytes: int, num_topk: int, num_scales: int = 0) -> SymmetricLayout | None:
        """The layout of this block for calls of ``row_bytes``, ``num_topk`` and ``num_scales``
        (computed once); None when the block cannot hold even the control fields."""
        key = (row_bytes, num_topk, num_scales)
        if key not in self._layouts:
            fits = capacity_for(self.nbytes, self.num_ranks, *key) >= 0
            self._layouts[key] = symmetric_layout(self.nbytes, self.num_ranks, *key) if fits else None
        return self._layouts[key]

    def halves(self, layout: SymmetricLayout, names: tuple[str, ...], word: np.dtype) -> tuple:
        """For each parity half, this rank's view of every field in ``names`` as the kernels take
        them, the ``x`` field as payload words of type ``word`` (the sender's and the receiver's
        alike). A kernel picks the half of its call on the device."""
        key = (id(layout), names, word)
        halves = self._halves.get(key)
        if halves is None:
            halves = self._halves[key] = tuple(
                tuple(self._view(layout, parity, name, word) for name in names) for parity in (0, 1))
        return halves

    def _view(self, layout: SymmetricLayout, parity: int, name: str, word: np.dtype) -> Any:
        """This rank's view of field ``name`` of half ``parity``, the ``x`` field as ``word``s."""
        field = layout.fields[name]
        dtype, shape, strides = field.dtype, field.shape, field.strides
        if name == "x":
            dtype = np.dtype(word)
            shape, strides = shape[:-1] + (shape[-1] // dtype.itemsize,), strides[:-1] + (dtype.itemsize,)
        return strided_view(self.block.local, parity * layout.nbytes + field.offset, shape, dtype, strides)

    def call_shape(self, meta: tuple[int, ...]) -> Any:
        """A call's meta words (``layout/symmetric.py``'s META_FIELDS) as an int32 kernel array."""
        shape = self._shapes.get(meta)
        if shape is None:
            shape = self._shapes[meta] = kernel_view(xp().asarray(np.array(meta, np.int32)))
        return shape

    # ----------------------------------------------------------- calls and health
    def begin(self, call: str, shape: tuple[int, ...], timeout_s: float) -> int:
        """Number a new call of this rank, remembered with its name, its meta words ``shape``
        and its timeout for a later error report."""
        self.seq += 1
        self._last_call = (call, shape, timeout_s)
        return self.seq

    def take_kernel_error(self) -> None:
        """Record this Buffer's failure (once) when a kernel has left an error in the status words:
        a dispatch or combine kernel's is named after the last call begun (an asynchronous call's
        error may land during the next one), a layout kernel's after ``get_dispatch_layout``."""
        if self.failure is not None:
            return
        code, detail = self.status.error()
        if code:
            call, shape, timeout_s = self._last_call
            self.failure = describe(code, detail, self.rank, call, shape, timeout_s)
            return
        code, detail = self.status.layout_error()
        if code:
            self.failure = describe(code, detail, self.rank, "get_dispatch_layout", (), 0.0)

    def check_usable(self) -> None:
        """``RuntimeError`` when the Buffer failed earlier (a kernel's error included)."""
        self.take_kernel_error()
        if self.failure is not None:
            raise RuntimeError(f"this Buffer is unusable after an earlier failure ({self.failure}); "
                               f"create a new Buffer")

    def raise_on_error(self) -> None:
        """Raise, and retire the Buffer, when a kernel has left an error (the simulator's kernels
        have finished when this runs; on the GPU a later call sees it)."""
        self.take_kernel_error()
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def wait_for_counts(self, seq: int, timeout_s: float) -> float:
        """Spin until the dispatch kernel of call ``seq`` has left its counts in the status words,
        then raise any error it reported; the seconds spent waiting."""
        start = time.perf_counter()
        if self.status.ready_call() != seq:
            deadline = start + timeout_s + COUNTS_GRACE_S
            while self.status.ready_call() != seq:
                if time.perf_counter() > deadline:
                    self.failure = f"dispatch: the counts did not arrive within {timeout_s + COUNTS_GRACE_S} s"
                    raise RuntimeError(self.failure)
        self.raise_on_error()
        return time.perf_counter() - start

    def free(self) -> None:
        self._halves.clear()
        self.block.free()
        self.status.free()
