"""The symmetric heap interface that the simulated and NVSHMEM heaps implement.

A symmetric array is allocated collectively: every rank asks for the same number of
bytes and gets its own block, and every rank can reach every other rank's block
(its *peer view*), so a kernel writes straight into a peer's memory.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence



def check_same_size(nbytes: int, sizes: Sequence[int]) -> None:
    """Raise ``ValueError`` on every rank when ranks asked for different sizes."""
    if nbytes < 0:
        raise ValueError(f"nbytes={nbytes}: must be >= 0")
    if len(set(sizes)) != 1:
        raise ValueError(f"symmetric allocation: nbytes differ across ranks {list(sizes)}; every rank must ask for the same size")


class SymmetricArray(Protocol):
    """One collective allocation: a byte array on each rank plus views of the peers'."""

    nbytes: int

    @property
    def local(self) -> Any:
        """This rank's block: uint8 array ``[nbytes]`` (NumPy on sim, device array on GPU)."""

    @property
    def peers(self) -> tuple[Any, ...]:
        """Every rank's block as seen from this rank, indexed by rank (own rank included)."""

    def peer(self, rank: int) -> Any:
        """The block of ``rank`` as seen from this rank."""

    def free(self) -> None:
        """Release the block (collective)."""


class SymmetricHeap(Protocol):
    """Collective allocator of symmetric arrays."""

    rank: int
    world_size: int

    def alloc(self, nbytes: int) -> SymmetricArray:
        """Collectively allocate ``nbytes`` zero-filled bytes on every rank."""

    def barrier(self) -> None:
        """Host-side barrier across the ranks of the heap."""

    def close(self) -> None:
        """Free every array still allocated and release the heap."""


class PeerViews:
    """What both heaps' arrays share: this rank's block and the peers' views, from ``_peers``."""

    _peers: tuple[Any, ...]
    _rank: int

    @property
    def local(self) -> Any:
        return self._peers[self._rank]

    @property
    def peers(self) -> tuple[Any, ...]:
        return self._peers

    def peer(self, rank: int) -> Any:
        if not 0 <= rank < len(self._peers):
            raise ValueError(f"rank={rank}: expected 0 <= rank < {len(self._peers)}")
        return self._peers[rank]
