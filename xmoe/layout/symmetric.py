"""The symmetric tensor layout: where every token of every peer lands in the heap.

A Buffer's symmetric block is split in two halves: call number ``seq`` of a Buffer
uses half ``seq % 2``, so a rank may already write call ``seq + 1`` into a peer while
that peer still reads call ``seq`` (two calls ahead is impossible: finishing call
``seq + 1`` needs every peer's signal of call ``seq + 1``, sent after that peer
finished reading call ``seq``).

A half is laid out from the block size and the rank count alone, never from the shape
of a call, so that ranks which disagree on a call (another hidden size, top-k, dtype)
still agree on where everything lies:

- the *control* fields at its start: ``signals`` int64 ``[R]`` (data written),
  ``notify_signals`` int64 ``[R]`` (counts published) and ``meta`` int32 ``[R, meta_length]``
  (each sender's call shape, :data:`META_FIELDS`, then its counts);
- then one *region* of ``region_bytes`` per source rank. Source ``s`` writes only into
  region ``s`` of a receiver, and lays it out from its own call shape: ``src_idx`` int32
  ``[cap, 1]``, ``topk_idx`` int32 ``[cap, k]``, ``topk_weights`` float32 ``[cap, k]``, ``scales``
  float32 ``[cap, s]`` (an FP8 row's scales; s = 0 otherwise), ``x`` uint8 ``[cap, row_stride]``, where ``cap`` is the most rows of that shape the region holds.

Writers therefore never collide, whatever they passed; a receiver reads a region only
after the sender's ``meta`` row (published with its signal) has matched its own call,
so a mismatch is caught before any row is used, with no handshake before the data
moves. A field seen across sources is an array ``[R, cap, ...]`` whose first stride is
``region_bytes``. All functions here are pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Byte alignment of every field and region (a multiple of any vector width a kernel uses).
FIELD_ALIGNMENT = 128
#: Byte alignment of one token row inside the ``x`` field.
ROW_ALIGNMENT = 16
#: Channels that share one float32 scale in an FP8 row (the ``scales`` field holds a row's scales).
FP8_GROUP = 128
#: Most experts per rank: the meta row has room for the counts of this many.
MAX_LOCAL_EXPERTS = 1024
#: A sender's call shape, the first words of its meta row; receivers compare them with their own
#: ("tokens per rank": the low-latency mode's slots per source, 0 in the normal mode).
META_FIELDS = ("call", "payload dtype", "row bytes", "top-k", "experts per rank", "tokens per rank")
META_LOCAL_EXPERTS = META_FIELDS.index("experts per rank")
META_HEADER = len(META_FIELDS)
#: Values of the meta row's "call" and "payload dtype" words.
CALL_CODES = {"dispatch": 1, "combine": 2, "low_latency_dispatch": 3, "low_latency_combine": 4}
DTYPE_CODES = {"float32": 1, "bfloat16": 2, "float8_e4m3fn": 3}


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def round_down(value: int, multiple: int) -> int:
    return value // multiple * multiple


def meta_length(num_ranks: int) -> int:
    """Length (int32 entries) of one sender's meta row: its call shape, tokens to each rank,
    tokens to each expert of the receiver."""
    return META_HEADER + num_ranks + MAX_LOCAL_EXPERTS


@dataclass(frozen=True)
class Field:
    """A typed array in one half of the block: ``shape`` of ``dtype`` at ``offset`` bytes from
    the half's start, with byte ``strides`` (a region field's first stride is the region size)."""

    name: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def end(self) -> int:
        """One past the last byte the field covers."""
        if 0 in self.shape:
            return self.offset
        return self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.strides)) + self.dtype.itemsize

    def byte_offsets(self) -> np.ndarray:
        """int64: every byte offset the field covers, element by element (for checks of a layout)."""
        index = np.zeros(1, np.int64)
        for n, stride in zip(self.shape, self.strides):
            index = (index[:, None] + np.arange(n) * stride).ravel()
        return (self.offset + index[:, None] + np.arange(self.dtype.itemsize)).ravel()


def contiguous_field(name: str, offset: int, dtype: Any, shape: tuple[int, ...], first_stride: int | None = None) -> Field:
    dtype = np.dtype(dtype)
    strides = [dtype.itemsize] * len(shape)
    for axis in range(len(shape) - 1, 0, -1):
        strides[axis - 1] = strides[axis] * shape[axis]
    if first_stride is not None:
        strides[0] = first_stride
    return Field(name, offset, dtype, shape, tuple(strides))


def control_fields(num_ranks: int) -> tuple[dict[str, Field], int]:
    """The control fields of a half and the bytes they take (a multiple of FIELD_ALIGNMENT)."""
    fields, offset = {}, 0
    for name, dtype, shape in (("signals", np.int64, (num_ranks,)), ("notify_signals", np.int64, (num_ranks,)),
                               ("meta", np.int32, (num_ranks, meta_length(num_ranks)))):
        fields[name] = contiguous_field(name, offset, dtype, shape)
        offset = round_up(fields[name].end, FIELD_ALIGNMENT)
    return fields, offset


def row_stride(row_bytes: int) -> int:
    return round_up(row_bytes, ROW_ALIGNMENT)


def region_parts(capacity: int, row_bytes: int, num_topk: int,
                 num_scales: int = 0) -> tuple[list[tuple[str, Any, tuple, int]], int]:
    """The fields of one source's region, ``(name, dtype, row shape, offset in the region)``,
    and the bytes the region needs (a multiple of FIELD_ALIGNMENT)."""
    parts, offset = [], 0
    for name, dtype, row in (("src_idx", np.int32, (1,)), ("topk_idx", np.int32, (num_topk,)),
                             ("topk_weights", np.float32, (num_topk,)), ("scales", np.float32, (num_scales,)),
                             ("x", np.uint8, (row_stride(row_bytes),))):
        parts.append((name, dtype, row, offset))
        offset = round_up(offset + capacity * row[0] * np.dtype(dtype).itemsize, FIELD_ALIGNMENT)
    return parts, offset


def half_bytes(nbytes: int) -> int:
    """Bytes of one half of a block of ``nbytes``."""
    return round_down(nbytes // 2, FIELD_ALIGNMENT)


def region_bytes(nbytes: int, num_ranks: int) -> int:
    """Bytes of one source's region in a block of ``nbytes`` (negative: not even the control fields fit)."""
    control = control_fields(num_ranks)[1]
    spare = half_bytes(nbytes) - control
    return round_down(spare // num_ranks, FIELD_ALIGNMENT) if spare >= 0 else -1


@dataclass(frozen=True)
class SymmetricLayout:
    """Layout of one half of a Buffer's block for one call shape (the same half for every shape:
    only the inside of each region depends on it).

    Attributes:
        num_ranks: ranks writing into the block (one region each).
        capacity: rows of this shape one region holds (tokens one source may send).
        row_bytes: payload bytes of one token (hidden * element size).
        num_topk: top-k entries carried with each token (0: none).
        region_bytes: bytes of one source's region.
        nbytes: bytes of one half.
        fields: name -> :class:`Field` (see the module docstring).
    """

    num_ranks: int
    capacity: int
    row_bytes: int
    num_topk: int
    region_bytes: int
    nbytes: int
    fields: dict[str, Field]

    @property
    def row_stride(self) -> int:
        return self.fields["x"].shape[-1]

    def row_offset(self, parity: int, source: int, slot: int) -> int:
        """Byte offset in the whole block (both halves) where token ``slot`` of ``source`` lands."""
        if not (0 <= parity < 2 and 0 <= source < self.num_ranks and 0 <= slot < self.capacity):
            raise ValueError(f"(parity, source, slot)=({parity}, {source}, {slot}) outside the layout")
        x = self.fields["x"]
        return parity * self.nbytes + x.offset + source * x.strides[0] + slot * x.strides[1]

    def views(self, block: np.ndarray, parity: int) -> dict[str, np.ndarray]:
        """Typed NumPy views of every field of half ``parity`` of ``block`` (uint8, at least ``2 * nbytes``)."""
        if block.shape[0] < 2 * self.nbytes:
            raise ValueError(f"block of {block.shape[0]} bytes is smaller than the layout's 2 x {self.nbytes}")
        return {f.name: np.ndarray(f.shape, f.dtype, buffer=block, offset=parity * self.nbytes + f.offset,
                                   strides=f.strides) for f in self.fields.values()}


def capacity_for(nbytes: int, num_ranks: int, row_bytes: int, num_topk: int, num_scales: int = 0) -> int:
    """The most tokens per source that a block of ``nbytes`` holds (-1: not even 0)."""
    region = region_bytes(nbytes, num_ranks)
    if region < 0:
        return -1
    per_row = 4 + 8 * num_topk + 4 * num_scales + row_stride(row_bytes)  # src_idx, top-k, scales, x
    capacity = region // per_row  # an upper bound: the fields' padding may take a few rows off
    while capacity > 0 and region_parts(capacity, row_bytes, num_topk, num_scales)[1] > region:
        capacity -= 1
    return capacity


def _check_sizes(num_ranks: int, **sizes: int) -> None:
    """``ValueError`` naming the argument unless ``num_ranks >= 1`` and every one of ``sizes`` is ``>= 0``."""
    for name, value in sizes.items():
        if value < 0:
            raise ValueError(f"{name}={value}: must be >= 0")
    if num_ranks < 1:
        raise ValueError(f"num_ranks={num_ranks}: must be >= 1")


def symmetric_layout(nbytes: int, num_ranks: int, row_bytes: int, num_topk: int,
                     num_scales: int = 0) -> SymmetricLayout:
    """The layout of a block of ``nbytes`` for calls of ``row_bytes``, ``num_topk`` and ``num_scales``
    float32 scales a row (FP8 payloads; see the module)."""
    _check_sizes(num_ranks, nbytes=nbytes, row_bytes=row_bytes, num_topk=num_topk, num_scales=num_scales)
    capacity = capacity_for(nbytes, num_ranks, row_bytes, num_topk, num_scales)
    if capacity < 0:
        raise ValueError(f"nbytes={nbytes}: too small for the control fields of {num_ranks} ranks")
    fields, control = control_fields(num_ranks)
    region = region_bytes(nbytes, num_ranks)
    for name, dtype, row, offset in region_parts(capacity, row_bytes, num_topk, num_scales)[0]:
        fields[name] = contiguous_field(name, control + offset, dtype, (num_ranks, capacity) + row, region)
    return SymmetricLayout(num_ranks, capacity, row_bytes, num_topk, region, half_bytes(nbytes), fields)


def size_hint(num_max_tokens: int, num_ranks: int, row_bytes: int, num_topk: int, num_scales: int = 0) -> int:
    """Bytes of symmetric memory (both halves) a Buffer needs for up to ``num_max_tokens`` tokens per rank."""
    _check_sizes(num_ranks, num_max_tokens=num_max_tokens, row_bytes=row_bytes, num_topk=num_topk,
                 num_scales=num_scales)
    parts = region_parts(num_max_tokens, row_bytes, num_topk, num_scales)
    return 2 * (control_fields(num_ranks)[1] + num_ranks * parts[1])
