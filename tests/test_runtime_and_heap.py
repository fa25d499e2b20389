"""init(), backend selection, and the simulated symmetric heap across ranks."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe import runtime


#: The backend this test process runs (tests/conftest.py fixes the default one before Numba loads)
#: and the other one.
BACKEND = runtime.default_backend()
OTHER = "cuda" if BACKEND == "sim" else "sim"


def test_single_process_group(group):
    assert (group.rank, group.world_size, group.local_rank, group.local_world_size) == (0, 1, 0, 1)
    assert group.backend == BACKEND and group.launcher == "single"
    assert runtime.get_group() is group and runtime.init() is group


def test_init_with_other_backend_raises(group):
    with pytest.raises(RuntimeError, match=f"already initialised with backend '{BACKEND}', not '{OTHER}'"):
        runtime.init(OTHER)


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("XMOE_BACKEND", "tpu")
    with pytest.raises(ValueError, match="XMOE_BACKEND='tpu'"):
        runtime.default_backend()
    with pytest.raises(ValueError, match="backend='tpu'"):
        runtime.select_backend("tpu")


def test_numba_already_in_the_other_mode_raises():
    from numba import cuda  # noqa: F401  (loaded in the mode conftest chose)

    mode = "with" if BACKEND == "sim" else "without"
    with pytest.raises(RuntimeError, match=f"backend='{OTHER}' but numba.cuda was already imported {mode} the CUDA"):
        runtime.select_backend(OTHER)


@pytest.mark.skipif(BACKEND != "sim", reason="the simulated heap (MPI shared-memory windows under mpirun) needs the "
                                             "sim backend; tests/test_gpu.py exercises the GPU's heap through Buffer")
@pytest.mark.mpi(ranks=4)
def test_mpi_group_and_heap_peer_views(group):
    from xmoe.comm import get_heap

    assert group.world_size == 4 and group.launcher == "mpi" and group.local_world_size == 4
    heap = get_heap(group)
    array = heap.alloc(4 * 64)
    zeroed = not array.local.any()
    heap.barrier()  # before any rank writes into its peers, every rank has looked at its own block
    assert zeroed
    rng = np.random.default_rng(group.rank)
    mine = rng.integers(1, 255, 64, dtype=np.uint8)
    for peer in range(4):  # each rank writes its row of every peer's block
        array.peer(peer)[group.rank * 64 : (group.rank + 1) * 64] = mine
    heap.barrier()
    rows = group.allgather(mine)
    for source in range(4):
        np.testing.assert_array_equal(array.local[source * 64 : (source + 1) * 64], rows[source])
    with pytest.raises(ValueError, match="rank=4"):
        array.peer(4)
    array.free()


@pytest.mark.skipif(runtime.default_backend() != "sim", reason="the MPI heap of the sim backend")
def test_unmapped_memory_is_not_kept_by_mpi(group):
    """MPICH's UCX queued ~145 bytes for every munmap in the process and never freed them: RSS grew
    ~105 KiB per dispatch + combine on the simulator (a thread per simulated thread, each
    unmapping its stack). xmoe turns UCX's memory hooks off before MPI starts."""
    import mmap

    import xmoe

    buffer = xmoe.Buffer(group, 1 << 16)  # MPI is initialised by now

    def rss_mib() -> float:
        line = next(line for line in open("/proc/self/status") if line.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    for _ in range(2000):
        mmap.mmap(-1, 4096).close()
    before = rss_mib()
    for _ in range(50_000):
        mmap.mmap(-1, 4096).close()
    assert rss_mib() - before < 1.0  # +6.9 MiB with the hooks on
    buffer.destroy()
