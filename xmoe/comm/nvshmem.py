"""GPU symmetric heap on NVSHMEM (nvshmem4py), bootstrapped with a unique id.

Rank 0 draws the NVSHMEM unique id and the group's host channel (mpi4py under mpirun,
torch.distributed under torchrun) carries it to every rank; each rank binds to GPU
``local_rank % visible GPUs``, so several ranks may share one GPU as separate PEs.
Peer views are ``nvshmem_ptr`` views (``get_peer_array``): plain loads and stores
into the peer's memory, for every peer reachable over NVLink or the same GPU.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from xmoe.comm.heap import PeerViews, check_same_size
from xmoe.runtime import Group

INSTALL_HINT = "install the GPU extra: pip install 'xmoe[cu12]' (CUDA 12) or 'xmoe[cu13]' (CUDA 13)"


def _import_nvshmem() -> tuple[Any, Any]:
    try:
        import cupy
        import nvshmem.core as nvshmem
    except ImportError as exc:
        raise RuntimeError(f"the cuda backend needs nvshmem4py and CuPy ({exc}); {INSTALL_HINT}") from exc
    return nvshmem, cupy


class NvshmemArray(PeerViews):
    """A symmetric byte array on the NVSHMEM heap and its peers' views."""

    def __init__(self, heap: "NvshmemHeap", array: Any) -> None:
        self._heap = heap
        self._rank = heap.rank
        self._array = array
        self.nbytes = int(array.shape[0])
        peers = []
        for pe in range(heap.world_size):
            # this rank's own block is the array NVSHMEM allocated: its address is the symmetric one
            # that NVSHMEM's puts translate to a peer's (nvshmem_ptr of this PE need not return it)
            view = array if pe == heap.rank else heap.nvshmem.get_peer_array(array, pe)
            if view is None:
                raise RuntimeError(f"rank {pe} is not reachable by loads and stores from rank {heap.rank} "
                                   "(internode peers need the put path, not built yet)")
            peers.append(view)
        self._peers = tuple(peers)

    def free(self) -> None:
        if self._array is None:
            return
        self._heap.barrier()
        self._peers = ()
        self._heap.nvshmem.free_array(self._array)
        self._array = None
        self._heap._arrays.discard(self)


class NvshmemHeap:
    """Symmetric heap of one NVSHMEM job: one PE per rank of ``group``.

    Attributes:
        init_seconds: wall time ``nvshmem.init`` took on this rank.
    """

    def __init__(self, group: Group) -> None:
        nvshmem, cupy = _import_nvshmem()
        try:
            from cuda.core import Device
        except ImportError:
            from cuda.core.experimental import Device

        self.nvshmem = nvshmem
        self.group = group
        self.rank = group.rank
        self.world_size = group.world_size
        device_id = group.device
        if device_id < 0:
            raise RuntimeError(f"backend 'cuda' but no GPU is visible; {INSTALL_HINT}, or use backend='sim'")
        device = Device(device_id)
        device.set_current()
        cupy.cuda.Device(device_id).use()
        if "torch" in sys.modules:  # PyTorch users' tensors default to this rank's GPU too
            sys.modules["torch"].cuda.set_device(device_id)
        uid = nvshmem.get_unique_id(empty=group.rank != 0)
        uid_bytes = group.broadcast(uid._data.view(np.int8).tobytes() if group.rank == 0 else None)
        uid._data.view(np.int8)[:] = np.frombuffer(uid_bytes, np.int8)
        start = time.perf_counter()
        nvshmem.init(device=device, uid=uid, rank=group.rank, nranks=group.world_size, initializer_method="uid")
        self.init_seconds = time.perf_counter() - start
        self._arrays: set[NvshmemArray] = set()

    def alloc(self, nbytes: int) -> NvshmemArray:
        check_same_size(nbytes, self.group.allgather(int(nbytes)))
        array = self.nvshmem.array((max(int(nbytes), 1),), dtype="uint8")
        array[:] = 0
        symmetric = NvshmemArray(self, array)
        self.barrier()
        self._arrays.add(symmetric)
        return symmetric

    def barrier(self) -> None:
        """Every rank's device work so far is done, then a host barrier."""
        import cupy

        cupy.cuda.Device().synchronize()
        self.group.barrier()

    def close(self) -> None:
        for array in list(self._arrays):
            array.free()
        self.nvshmem.finalize()
