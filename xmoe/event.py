"""EventOverlap and streams: DeepEP's handle on asynchronous work, framework-neutral.

On the GPU a call runs on the caller's current stream (PyTorch's when the inputs are
PyTorch tensors, CuPy's otherwise), or with ``async_finish=True`` on the Buffer's own
communication stream, which first waits for ``previous_event`` (or the caller's
stream); the returned :class:`EventOverlap` marks the end of the call's work there.
On the simulator every call has finished when it returns.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

from xmoe.device_memory import on_gpu


def _torch_stream_pointer() -> int:
    """PyTorch's current stream on its current device, as a pointer. ``torch.cuda.current_stream()``
    costs ~25 us of host time (it builds a Stream object); the raw query is what PyTorch's own
    compiled code calls, with the public call as the fallback."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    device = getattr(torch._C, "_cuda_getDevice", None)
    if raw is not None and device is not None:
        return raw(device())
    return torch.cuda.current_stream().cuda_stream


@lru_cache(maxsize=64)
def _external_stream(pointer: int) -> Any:
    import cupy

    return cupy.cuda.ExternalStream(pointer)


def current_stream(framework: str) -> Any:
    """The caller's current CUDA stream as a CuPy stream (PyTorch's for PyTorch tensors)."""
    if framework == "torch":
        return _external_stream(_torch_stream_pointer())
    import cupy

    return cupy.cuda.get_current_stream()


def stream_pointer(framework: str) -> int:
    """The caller's current stream as a pointer (PyTorch's for PyTorch tensors; 0 on the simulator)."""
    if not on_gpu():
        return 0
    return _torch_stream_pointer() if framework == "torch" else current_stream(framework).ptr


class EventOverlap:
    """Completion of a dispatch/combine call (DeepEP's ``EventOverlap``).

    Args:
        event: a CuPy event recorded after the call's work, or None when it has finished.
        framework: whose current stream :meth:`current_stream_wait` makes wait.
    """

    def __init__(self, event: Any = None, framework: str = "cupy") -> None:
        self.event = event
        self.framework = framework

    def current_stream_wait(self) -> None:
        """Make the caller's current stream wait for the work this event marks."""
        if self.event is not None:
            current_stream(self.framework).wait_event(self.event)

    def synchronize(self) -> None:
        """Block the host until the work this event marks has finished."""
        if self.event is not None:
            self.event.synchronize()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.current_stream_wait()


def event_on_current_stream(framework: str) -> EventOverlap:
    """An event recorded now on the caller's current stream (of ``framework``)."""
    return EventOverlap(current_stream(framework).record(), framework)


def check_previous_event(previous_event: Any) -> None:
    """``ValueError`` unless ``previous_event`` is None or an :class:`EventOverlap`."""
    if previous_event is not None and not isinstance(previous_event, EventOverlap):
        raise ValueError(f"previous_event: expected an EventOverlap or None, got {type(previous_event).__name__}")


class StreamPlan:
    """Where one call's kernels go, and the event that marks their end.

    ``StreamPlan.waited_s`` adds up the host time every call spent blocked on the GPU (a
    benchmark subtracts it from wall time to get the host overhead of a call).

    Args:
        framework: the framework of the call's tensors.
        comm_stream: the Buffer's communication stream (used with ``async_finish``).
        previous_event: an :class:`EventOverlap` the work must wait for, or None.
        async_finish: run on ``comm_stream`` instead of the caller's stream.
    """

    waited_s = 0.0

    def __init__(self, framework: str, comm_stream: Any, previous_event: EventOverlap | None, async_finish: bool):
        self.framework = framework
        self.async_finish = async_finish
        waits = previous_event is not None and previous_event.event is not None
        if not (async_finish or waits):  # the common call: only the caller's stream pointer is needed
            self.stream = None
            self.pointer = stream_pointer(framework)
            return
        compute = current_stream(framework)
        self.stream = comm_stream if async_finish else compute
        self.pointer = self.stream.ptr
        if waits:
            self.stream.wait_event(previous_event.event)
        else:
            self.stream.wait_event(compute.record())

    def capturing(self) -> bool:
        """Whether the call's stream is being captured into a CUDA graph."""
        import cupy

        return cupy.cuda.runtime.streamIsCapturing(self.pointer) != 0  # 0: cudaStreamCaptureStatusNone

    def synchronize(self) -> None:
        start = time.perf_counter()
        (self.stream or current_stream(self.framework)).synchronize()
        StreamPlan.waited_s += time.perf_counter() - start

    def finish(self) -> EventOverlap:
        """The call's event: recorded on the communication stream with ``async_finish``; without
        it the work is on the caller's stream, which orders it already (DeepEP's empty event)."""
        return EventOverlap(self.stream.record() if self.async_finish else None, self.framework)


class HostPlan:
    """The simulator's :class:`StreamPlan`: kernels finish before launch returns."""

    pointer = 0

    def capturing(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass

    def finish(self) -> EventOverlap:
        return EventOverlap()
