"""The process group: rank, world, local rank, device and backend; ``init()``.

The backend is chosen before Numba is imported (Numba reads ``NUMBA_ENABLE_CUDASIM``
once, at import): ``XMOE_BACKEND=cuda|sim``, else ``cuda`` when a GPU and nvshmem4py
are present, else ``sim``. Nothing in this module imports Numba.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

BACKENDS = ("sim", "cuda")


def gpu_count() -> int:
    """Number of CUDA devices the driver reports (0 without a driver or a GPU)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def default_backend() -> str:
    """The backend ``init()`` uses when none is named (see the module docstring)."""
    name = os.environ.get("XMOE_BACKEND", "").strip().lower()
    if name:
        if name not in BACKENDS:
            raise ValueError(f"XMOE_BACKEND={name!r}: expected one of {BACKENDS}")
        return name
    if importlib.util.find_spec("nvshmem") is not None and gpu_count() > 0:
        return "cuda"
    return "sim"


def _numba_simulator_enabled() -> bool | None:
    """Whether the already imported Numba runs the CUDA simulator; None if not imported."""
    if "numba.cuda" not in sys.modules:
        return None
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


_selected_backend: str | None = None  # what select_backend fixed in this process


def select_backend(name: str | None) -> str:
    """Fix the backend for this process and configure Numba for it.

    Raises ``RuntimeError`` when Numba was already imported in the other mode.
    """
    name = default_backend() if name is None else name
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {BACKENDS} or None")
    want_sim = name == "sim"
    have_sim = _numba_simulator_enabled()
    if have_sim is not None and have_sim != want_sim:
        raise RuntimeError(
            f"backend={name!r} but numba.cuda was already imported "
            f"{'with' if have_sim else 'without'} the CUDA simulator; set "
            f"XMOE_BACKEND={name} before importing numba"
        )
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1" if want_sim else "0"
    global _selected_backend
    _selected_backend = name
    return name


def ensure_backend() -> None:
    """Fix the default backend unless one was chosen already or Numba already runs in one mode
    (functions with no process group, such as the expert compute, need no ``init()``)."""
    if _selected_backend is None and _numba_simulator_enabled() is None:
        select_backend(None)


def launcher_command(ranks: int, backend: str) -> list[str]:
    """The command that starts ``ranks`` processes running the command that follows it:
    torchrun on cuda, mpirun on sim.

    mpirun is looked up beside the Python executable first (the ``mpich`` wheel
    installs it there), then on PATH; ``RuntimeError`` when there is none.
    """
    if backend == "cuda":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "--no-python"]
    for name in ("mpiexec", "mpirun"):
        beside = Path(sys.executable).parent / name
        found = str(beside) if beside.exists() else shutil.which(name)
        if found:
            return [found, "-n", str(ranks)]
    raise RuntimeError("no mpirun found: pip install mpich (an xmoe dependency) or put an MPI's mpirun on PATH")


def launched() -> bool:
    """Whether this process was started by mpirun or torchrun."""
    return _launched_by_mpi() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


@dataclass
class Group:
    """The ranks taking part in expert parallelism.

    Attributes:
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of ranks.
        local_rank / local_world_size: rank and size within this node.
        backend: ``"sim"`` (CPU simulation) or ``"cuda"``.
        launcher: ``"mpi"``, ``"torchrun"`` or ``"single"``.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    launcher: str
    comm: Any = field(default=None, repr=False)  # mpi4py communicator when launched by MPI

    @property
    def device(self) -> int:
        """The GPU this rank uses: local rank modulo the GPUs visible."""
        count = gpu_count()
        return self.local_rank % count if count else -1

    @property
    def ranks_on_device(self) -> int:
        """How many ranks of this node share this rank's GPU (PEs on one GPU; 1 normally)."""
        count = gpu_count()
        return len(range(self.device, self.local_world_size, count)) if count else 1

    def barrier(self) -> None:
        """Host-side barrier across all ranks."""
        if self.launcher == "mpi":
            self.comm.Barrier()
        elif self.launcher == "torchrun":
            import torch.distributed as dist

            dist.barrier()

    def allgather(self, obj: Any) -> list[Any]:
        """Gather one picklable object from every rank, in rank order."""
        if self.launcher == "mpi":
            return self.comm.allgather(obj)
        if self.launcher == "torchrun":
            import torch.distributed as dist

            out: list[Any] = [None] * self.world_size
            dist.all_gather_object(out, obj)
            return out
        return [obj]

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        """Broadcast a picklable object from ``root`` to every rank."""
        return self.allgather(obj)[root]


_group: Group | None = None
_finalizers: list[Callable[[], None]] = []


def _launched_by_mpi() -> bool:
    return any(
        k in os.environ
        for k in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")
    )


def mpi(backend: str) -> Any:
    """mpi4py's ``MPI`` module, importing it (which initialises MPI) for ``backend``.

    On the sim backend, UCX's memory hooks are turned off first (``UCX_MEM_EVENTS=no``, unless
    set): MPICH's UCX queues ~144 B for every munmap/madvise in the process (UCP's registration
    cache is created with UCS_RCACHE_FLAG_SYNC_EVENTS) and drains the queue only when memory is
    registered, which xmoe never does; Numba's simulator starts a thread per simulated thread, and each
    one's exit unmaps memory twice, so RSS grew ~105 KiB per dispatch+combine without bound.
    The simulated heap needs no registration cache (MPI shared memory).
    """
    if backend == "sim":
        os.environ.setdefault("UCX_MEM_EVENTS", "no")
    from mpi4py import MPI

    return MPI


def _mpi_group(backend: str) -> Group:
    MPI = mpi(backend)

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    group = Group(world.Get_rank(), world.Get_size(), node.Get_rank(), node.Get_size(), backend, "mpi", world)
    node.Free()
    return group


def _torchrun_group(backend: str) -> Group:
    try:
        import torch.distributed as dist
    except ImportError as exc:
        raise RuntimeError("launched by torchrun (RANK/WORLD_SIZE set) but torch is not installed") from exc
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    env = os.environ
    return Group(
        int(env["RANK"]),
        int(env["WORLD_SIZE"]),
        int(env.get("LOCAL_RANK", env["RANK"])),
        int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
        backend,
        "torchrun",
    )


def init(backend: str | None = None) -> Group:
    """Start xmoe in this process and return its :class:`Group`.

    Args:
        backend: ``"sim"``, ``"cuda"`` or None for the default (``XMOE_BACKEND``, else
            ``cuda`` when a GPU and nvshmem4py are present, else ``sim``).

    Launcher: mpirun/mpiexec (mpi4py's ``COMM_WORLD``), torchrun (``RANK``/``WORLD_SIZE``
    in the environment, torch.distributed), or a single process (world of 1).
    Calling it again returns the same group; a different backend raises ``RuntimeError``.
    """
    global _group
    if _group is not None:
        if backend is not None and backend != _group.backend:
            raise RuntimeError(f"xmoe already initialised with backend {_group.backend!r}, not {backend!r}")
        return _group
    backend = select_backend(backend)
    if _launched_by_mpi():
        group = _mpi_group(backend)
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        group = _torchrun_group(backend)
    else:
        group = Group(0, 1, 0, 1, backend, "single")
    _group = group
    return group


def get_group() -> Group:
    """The group ``init()`` returned; ``RuntimeError`` before ``init()``."""
    if _group is None:
        raise RuntimeError("xmoe is not initialised: call xmoe.init() first")
    return _group


def is_initialized() -> bool:
    return _group is not None


def at_finalize(fn: Callable[[], None]) -> None:
    """Register ``fn`` to run (last registered first) in :func:`finalize`."""
    _finalizers.append(fn)


def finalize() -> None:
    """Release what xmoe holds (heaps, NVSHMEM); ``init()`` may be called again after."""
    global _group
    while _finalizers:
        _finalizers.pop()()
    _group = None
