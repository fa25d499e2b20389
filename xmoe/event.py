"""EventOverlap: DeepEP's handle on asynchronous work, framework-neutral."""

from __future__ import annotations

from typing import Any


class EventOverlap:
    """Completion of a dispatch/combine call.

    On the simulator every call has finished when it returns, so the event is already
    complete; on the GPU it wraps a CUDA event recorded on the communication stream.
    """

    def __init__(self, event: Any = None) -> None:
        self.event = event

    def current_stream_wait(self) -> None:
        """Make the caller's current stream wait for the work this event marks."""
        if self.event is not None:
            self.event.current_stream_wait()

    def synchronize(self) -> None:
        """Block the host until the work this event marks has finished."""
        if self.event is not None:
            self.event.synchronize()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.current_stream_wait()


def check_previous_event(previous_event: Any) -> None:
    """``ValueError`` unless ``previous_event`` is None or an :class:`EventOverlap`."""
    if previous_event is not None and not isinstance(previous_event, EventOverlap):
        raise ValueError(f"previous_event: expected an EventOverlap or None, got {type(previous_event).__name__}")
