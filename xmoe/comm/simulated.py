"""CPU symmetric heap on MPI shared-memory windows (``MPI.Win.Allocate_shared``).

Every rank of the simulation must share one node: the windows are ordinary shared
memory, so a peer view is a NumPy array over another process's block and the kernels
(run by Numba's CUDA simulator) write into it directly.
"""

from __future__ import annotations

import numpy as np

from xmoe.comm.heap import PeerViews, check_same_size


class SimulatedArray(PeerViews):
    """A symmetric array backed by one MPI shared-memory window."""

    def __init__(self, heap: "SimulatedHeap", window, nbytes: int) -> None:
        self._heap = heap
        self._rank = heap.rank
        self._window = window
        self.nbytes = nbytes
        views = []
        for r in range(heap.world_size):
            buf, _ = window.Shared_query(r)
            views.append(np.ndarray(buffer=buf, dtype=np.uint8, shape=(nbytes,)))
        self._peers = tuple(views)

    def free(self) -> None:
        if self._window is None:
            return
        self._peers = ()
        self._heap.comm.Barrier()
        self._window.Free()
        self._window = None
        self._heap._arrays.discard(self)


class SimulatedHeap:
    """Symmetric heap over the ranks of an MPI communicator that share one node."""

    def __init__(self, comm) -> None:
        from mpi4py import MPI

        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        same_node = node.Get_size() == comm.Get_size()
        node.Free()
        if not same_node:
            raise RuntimeError("the simulated heap needs every rank on one node (MPI shared memory)")
        self.comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self._arrays: set[SimulatedArray] = set()

    def alloc(self, nbytes: int) -> SimulatedArray:
        from mpi4py import MPI

        check_same_size(nbytes, self.comm.allgather(int(nbytes)))
        window = MPI.Win.Allocate_shared(max(int(nbytes), 1), 1, comm=self.comm)
        array = SimulatedArray(self, window, int(nbytes))
        array.local[:] = 0
        self.comm.Barrier()
        self._arrays.add(array)
        return array

    def barrier(self) -> None:
        self.comm.Barrier()

    def close(self) -> None:
        for array in list(self._arrays):
            array.free()
