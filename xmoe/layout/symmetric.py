"""The symmetric tensor layout: where every token of every peer lands in the heap.

A Buffer's symmetric block is split in two halves: call number ``seq`` of a Buffer
uses half ``seq % 2``, so a rank may already write call ``seq + 1`` into a peer while
that peer still reads call ``seq`` (two calls ahead is impossible: finishing call
``seq + 1`` needs every peer's signal of call ``seq + 1``, sent after that peer
finished reading call ``seq``). Calls of different shapes lay a half out differently,
so the halves are split first and each is laid out on its own.

A half holds *fields*, each a typed array. Source rank ``s`` owns row block
``[s, 0:capacity]`` of every field,
and its ``i``-th token bound for this rank (in source token order) lands in slot
``i``. Writers therefore never collide, and a receiver learns everything it needs
(counts, shapes) from the sender's ``meta`` row, published with its signal: no
handshake before the data moves. All functions here are pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Byte alignment of every field (a multiple of any vector width a kernel uses).
FIELD_ALIGNMENT = 128
#: Byte alignment of one token row inside the ``x`` field.
ROW_ALIGNMENT = 16
#: meta row: [row_bytes, num_topk, num_local_experts, tokens to rank 0..R-1, tokens per local expert of the receiver]
META_ROW_BYTES, META_TOPK, META_LOCAL_EXPERTS, META_HEADER = 0, 1, 2, 3


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def meta_length(num_ranks: int, num_local_experts: int) -> int:
    """Length (int32 entries) of one sender's meta row."""
    return META_HEADER + num_ranks + num_local_experts


@dataclass(frozen=True)
class Field:
    """A typed array inside the symmetric block: ``shape`` of ``dtype`` at ``offset`` bytes."""

    name: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class SymmetricLayout:
    """Layout of one half of a Buffer's symmetric block for one call shape.

    Attributes:
        num_ranks: ranks writing into the block (one region each).
        capacity: tokens one source may send to one receiver (its tokens per rank).
        row_bytes: payload bytes of one token (hidden * element size).
        num_topk: top-k entries carried with each token (0: none).
        num_local_experts: experts per rank.
        fields: name -> :class:`Field`; ``signals`` int64 ``[R]`` (data written),
            ``notify_signals`` int64 ``[R]`` (counts published, before the data), ``meta`` int32
            ``[R, meta_length]``, ``src_idx`` int32 ``[R, cap, 1]``, ``topk_idx`` int32
            ``[R, cap, k]``, ``topk_weights`` float32 ``[R, cap, k]``, ``x`` uint8
            ``[R, cap, row_stride]``.
        nbytes: bytes one half needs.
    """

    num_ranks: int
    capacity: int
    row_bytes: int
    num_topk: int
    num_local_experts: int
    fields: dict[str, Field]
    nbytes: int

    @property
    def row_stride(self) -> int:
        return self.fields["x"].shape[-1]

    def row_offset(self, parity: int, source: int, slot: int) -> int:
        """Byte offset in the whole block (both halves) where token ``slot`` of ``source`` lands."""
        if not (0 <= parity < 2 and 0 <= source < self.num_ranks and 0 <= slot < self.capacity):
            raise ValueError(f"(parity, source, slot)=({parity}, {source}, {slot}) outside the layout")
        return parity * self.nbytes + self.fields["x"].offset + (source * self.capacity + slot) * self.row_stride

    def views(self, block: Any, parity: int) -> dict[str, Any]:
        """Typed views of every field of half ``parity`` of ``block`` (uint8, at least ``2 * nbytes``)."""
        if block.shape[0] < 2 * self.nbytes:
            raise ValueError(f"block of {block.shape[0]} bytes is smaller than the layout's 2 x {self.nbytes}")
        base = parity * self.nbytes
        return {
            f.name: block[base + f.offset : base + f.end].view(f.dtype).reshape(f.shape) for f in self.fields.values()
        }


def symmetric_layout(
    num_ranks: int, capacity: int, row_bytes: int, num_topk: int, num_local_experts: int
) -> SymmetricLayout:
    """The layout for ``capacity`` tokens per source of ``row_bytes`` each (see the module)."""
    for name, value in (("num_ranks", num_ranks), ("num_local_experts", num_local_experts)):
        if value < 1:
            raise ValueError(f"{name}={value}: must be >= 1")
    for name, value in (("capacity", capacity), ("row_bytes", row_bytes), ("num_topk", num_topk)):
        if value < 0:
            raise ValueError(f"{name}={value}: must be >= 0")
    regions = (num_ranks,)
    specs = [
        ("signals", np.int64, regions),
        ("notify_signals", np.int64, regions),
        ("meta", np.int32, regions + (meta_length(num_ranks, num_local_experts),)),
        ("src_idx", np.int32, regions + (capacity, 1)),
        ("topk_idx", np.int32, regions + (capacity, num_topk)),
        ("topk_weights", np.float32, regions + (capacity, num_topk)),
        ("x", np.uint8, regions + (capacity, round_up(row_bytes, ROW_ALIGNMENT))),
    ]
    fields: dict[str, Field] = {}
    offset = 0
    for name, dtype, shape in specs:
        field = Field(name, offset, np.dtype(dtype), shape)
        fields[name] = field
        offset = round_up(field.end, FIELD_ALIGNMENT)
    return SymmetricLayout(num_ranks, capacity, row_bytes, num_topk, num_local_experts, fields, offset)


def size_hint(num_max_tokens: int, num_ranks: int, row_bytes: int, num_topk: int, num_local_experts: int) -> int:
    """Bytes of symmetric memory (both halves) a Buffer needs for up to ``num_max_tokens`` tokens per rank."""
    return 2 * symmetric_layout(num_ranks, num_max_tokens, row_bytes, num_topk, num_local_experts).nbytes


def capacity_for(nbytes: int, num_ranks: int, row_bytes: int, num_topk: int, num_local_experts: int) -> int:
    """The most tokens per rank that ``nbytes`` of symmetric memory holds (-1: not even 0)."""

    def fits(capacity: int) -> bool:
        return size_hint(capacity, num_ranks, row_bytes, num_topk, num_local_experts) <= nbytes

    if not fits(0):
        return -1
    low, high = 0, 1
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
