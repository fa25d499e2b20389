"""Symmetric heaps and the device-side communication functions kernels call."""

from __future__ import annotations

from xmoe.comm.heap import SymmetricArray, SymmetricHeap
from xmoe.runtime import Group, at_finalize

_heaps: dict[int, SymmetricHeap] = {}


def get_heap(group: Group) -> SymmetricHeap:
    """The symmetric heap of ``group``'s backend, opened on first use and closed at finalize."""
    heap = _heaps.get(id(group))
    if heap is not None:
        return heap
    if group.backend == "cuda":
        from xmoe.comm.nvshmem import NvshmemHeap

        heap = NvshmemHeap(group)
    elif group.launcher == "torchrun":
        raise RuntimeError("the sim backend's heap uses MPI shared memory: launch the ranks with mpirun, not torchrun")
    else:
        from xmoe.comm.simulated import SimulatedHeap
        from xmoe.runtime import mpi

        MPI = mpi(group.backend)

        heap = SimulatedHeap(group.comm if group.launcher == "mpi" else MPI.COMM_SELF)
    _heaps[id(group)] = heap

    def close() -> None:
        _heaps.pop(id(group), None)
        heap.close()

    at_finalize(close)
    return heap


__all__ = ["SymmetricArray", "SymmetricHeap", "get_heap"]
