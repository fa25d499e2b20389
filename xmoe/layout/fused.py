"""The fused MoE layer's symmetric layout (FlashMoE's symmetric tensor layout): where every
tile of every (expert, source) cell lands, and the flags that say a tile has landed.

In a fused forward (issue 17) a source rank packs its tokens routed to expert ``e`` as tiles
of ``block_m`` rows into cell ``(e's local index, source)`` of ``e``'s owner; the owner's expert
processors run each tile as soon as its flag is up and store the result tile into cell ``e``
of the source, in the same row order, so the source knows which token each result row is
(it packed them) and no index travels. Per rank::

    [tile_flags | result_flags | dispatch_x | combine_x]

- ``tile_flags`` int64 ``[L, R, T]``: tile ``i`` of cell (local expert, source), set by the
  source; ``result_flags`` int64 ``[E, T]``: result tile ``i`` of expert ``e`` for this rank's
  tokens, set by ``e``'s owner. A flag word is :func:`flag_word` ``(call, rows, last)``: the
  call's number (so flags need no clearing between calls), the rows in the tile and whether it
  is the cell's last (a cell with no rows sends tile 0 with 0 rows, marked last);
- ``dispatch_x`` uint16 (bfloat16 bits) ``[L, R, C, H]`` and ``combine_x`` uint16
  ``[E, C, H]``, with ``C`` the cell capacity (rows) and ``T = C / block_m`` tiles a cell.

Writers never collide: source ``s`` writes only ``[:, s]`` of a peer's ``tile_flags`` and
``dispatch_x``, and the owner of expert ``e`` only row ``e`` of a peer's ``result_flags`` and
``combine_x``. One copy serves consecutive calls: a source's next call writes cell (e, s)
again only after every result tile of that cell came back, which the owner sends after it
has read the tile, and flags carry the call's number.

Capacity: without a capacity factor a cell holds every token of a rank (a token goes to an
expert once), so no token is dropped; that is ``4 E max_tokens H`` bytes a rank (4.3 GB at
Qwen3-30B-A3B's 128 experts, hidden 2048, 4096 tokens; 30 GB at DeepSeek-V3's 256 and 7168),
which :meth:`FusedLayout.check_fits` reports against the heap. With ``capacity_factor`` f a
cell holds ``f * max_tokens * k / E`` rows (rounded up to whole tiles) and the rows past it are
dropped. All functions here are pure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xmoe.layout.symmetric import FIELD_ALIGNMENT, Field, contiguous_field, round_up

#: The fields of one rank's part, in order.
FIELDS = ("tile_flags", "result_flags", "dispatch_x", "combine_x")
#: Bits of a flag word below the call's number: rows in the tile (31 bits) and the last-tile bit.
CALL_SHIFT = 32
LAST_BIT = 1 << 31


def flag_word(call: int, rows: int, last: bool) -> int:
    """The int64 word that marks a tile of call number ``call`` (>= 1, below 2**31) with
    ``rows`` rows (< 2**31) as landed; ``last``: the cell's last tile. A later call's words are
    larger than an earlier call's, so a wait for ``word >= flag_word(call, 0, False)`` needs
    no clearing between calls."""
    return (call << CALL_SHIFT) | (LAST_BIT if last else 0) | rows


def read_flag(word: int) -> tuple[int, int, bool]:
    """``(call, rows, last)`` of a flag word (0: no tile of any call has landed)."""
    return word >> CALL_SHIFT, word & (LAST_BIT - 1), bool(word & LAST_BIT)


def cell_capacity(max_tokens: int, num_experts: int, top_k: int, block_m: int,
                  capacity_factor: float | None) -> int:
    """Rows of one (expert, source) cell: every token of a rank without a capacity factor, else
    ``capacity_factor * max_tokens * top_k / num_experts``; whole tiles, at least one, at most
    the tiles of ``max_tokens`` rows."""
    whole = round_up(max(max_tokens, 1), block_m)
    if capacity_factor is None:
        return whole
    return min(whole, round_up(max(1, int(np.ceil(capacity_factor * max_tokens * top_k / num_experts))), block_m))


@dataclass(frozen=True)
class FusedLayout:
    """Where the fused layer's fields lie in one rank's part of the symmetric heap.

    Attributes:
        num_ranks, num_experts, max_tokens, hidden, top_k, block_m: the layer shape it was made for.
        capacity: rows of one cell; tiles: tiles of one cell (``capacity / block_m``).
        nbytes: bytes a rank's part takes.
        fields: name -> :class:`xmoe.layout.symmetric.Field` (see the module).
    """

    num_ranks: int
    num_experts: int
    max_tokens: int
    hidden: int
    top_k: int
    block_m: int
    capacity: int
    tiles: int
    nbytes: int
    fields: dict[str, Field]

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    def tile_offset(self, local_expert: int, source: int, tile: int) -> int:
        """Byte offset of the first row of tile ``tile`` of cell (``local_expert``, ``source``)."""
        x = self.fields["dispatch_x"]
        if not (0 <= local_expert < self.num_local_experts and 0 <= source < self.num_ranks
                and 0 <= tile < self.tiles):
            raise ValueError(f"(local_expert, source, tile)=({local_expert}, {source}, {tile}) outside the layout")
        return x.offset + local_expert * x.strides[0] + source * x.strides[1] + tile * self.block_m * x.strides[2]

    def result_offset(self, expert: int, tile: int) -> int:
        """Byte offset of the first row of result tile ``tile`` of expert ``expert``."""
        x = self.fields["combine_x"]
        if not (0 <= expert < self.num_experts and 0 <= tile < self.tiles):
            raise ValueError(f"(expert, tile)=({expert}, {tile}) outside the layout")
        return x.offset + expert * x.strides[0] + tile * self.block_m * x.strides[1]

    def size_message(self, available_bytes: int | None) -> str:
        """What a rank's part needs, against ``available_bytes`` where known, and what to do."""
        have = "the heap could not give them" if available_bytes is None else f"{available_bytes} are available"
        return (f"the fused layer needs {self.nbytes} bytes ({self.nbytes / 2 ** 30:.2f} GiB) of symmetric memory a "
                f"rank for {self.max_tokens} tokens of hidden {self.hidden} over {self.num_experts} experts "
                f"({self.capacity} rows a cell), {have}: pass a capacity_factor (rows past it are dropped) or "
                f"fewer tokens a call")

    def check_fits(self, available_bytes: int) -> None:
        """``ValueError`` giving the bytes needed unless a rank's part fits in ``available_bytes``."""
        if self.nbytes > available_bytes:
            raise ValueError(self.size_message(available_bytes))


def fused_layout(num_ranks: int, num_experts: int, max_tokens: int, hidden: int, top_k: int, block_m: int,
                 capacity_factor: float | None = None) -> FusedLayout:
    """The layout for up to ``max_tokens`` tokens a rank of ``hidden`` bfloat16 channels routed
    to ``top_k`` of ``num_experts`` experts over ``num_ranks`` ranks, in tiles of ``block_m``
    rows; ``ValueError`` naming a bad argument."""
    for name, value, low in (("num_ranks", num_ranks, 1), ("num_experts", num_experts, 1),
                             ("max_tokens", max_tokens, 0), ("hidden", hidden, 8), ("top_k", top_k, 1),
                             ("block_m", block_m, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r}: must be an int >= {low}")
    if num_experts % num_ranks:
        raise ValueError(f"num_experts={num_experts} is not divisible by the {num_ranks} ranks")
    if hidden % 8:
        raise ValueError(f"hidden={hidden}: must be a multiple of 8 (16-byte rows)")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k}: more than the {num_experts} experts")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r}: must be > 0 (None: no token dropped)")
    capacity = cell_capacity(max_tokens, num_experts, top_k, block_m, capacity_factor)
    tiles, local = capacity // block_m, num_experts // num_ranks
    fields, offset = {}, 0
    for name, dtype, shape in (("tile_flags", np.int64, (local, num_ranks, tiles)),
                               ("result_flags", np.int64, (num_experts, tiles)),
                               ("dispatch_x", np.uint16, (local, num_ranks, capacity, hidden)),
                               ("combine_x", np.uint16, (num_experts, capacity, hidden))):
        fields[name] = contiguous_field(name, offset, dtype, shape)
        offset = round_up(fields[name].end, FIELD_ALIGNMENT)
    return FusedLayout(num_ranks, num_experts, max_tokens, hidden, top_k, block_m, capacity, tiles, offset, fields)
