"""The low-latency mode's symmetric layout: a slot for every (expert, source, token).

A low-latency dispatch sends token ``t`` of source ``s`` routed to expert ``e`` straight into
slot ``(e's local index, s, i)`` of ``e``'s owner, where ``i`` counts the tokens of ``s``
routed to ``e`` before ``t``; a combine sends expert ``e``'s output for token ``t`` into slot
``(e, t)`` of the token's source. Writers therefore never collide and nothing is allocated
at run time. The block is laid out as::

    [control, half 0 | control, half 1 | data, half 0 | data, half 1 | send fields]

- *control* (``dispatch_signals`` / ``combine_signals`` int64 ``[R]``, ``dispatch_meta`` /
  ``combine_meta`` int32 ``[R, meta_length(R)]``): at offsets that depend on the rank count
  only, so ranks that disagree on a call still agree on where its signals lie (a receiver
  compares the sender's meta row with its own call before it reads any slot);
- *data* of a half, laid out from the call's shape (M tokens per rank at most, hidden H,
  E experts, L = E / R local): ``dispatch_x`` uint8 ``[L, R, M, row_stride(2 H)]`` (a bf16 or
  FP8 row), ``dispatch_scales`` float32 ``[L, R, M, H / 128]``, ``dispatch_src_idx`` int32
  ``[L, R, M, 1]``, ``dispatch_counts`` int64 ``[L, R]`` (source ``s``'s count word for a local
  expert: ``(call << 32) | rows``), ``combine_x`` uint8 ``[E, M, row_stride(2 H)]``,
  ``combine_flags`` int64 ``[E]`` (the call whose rows of expert ``e`` have all landed);
- *send fields*, one copy (a call's sends end before the next call's begin, in stream
  order): ``send_x`` uint8 ``[M, H]`` and ``send_scales`` float32 ``[M, H / 128]`` (FP8 rows cast
  before they go out), ``combine_send`` uint8 ``[L, R * M, 2 H]`` (a zero-copy combine's input).

Low-latency calls alternate between the halves (two batches in flight on one Buffer:
dispatch A, dispatch B, combine A, combine B), and a dispatch and a combine of one half
have control fields of their own, so a combine may land while a peer has yet to receive
the dispatch before it. Every half field is an array ``[2, ...]`` whose first stride is the
distance between the halves. All functions here are pure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xmoe.layout.symmetric import FIELD_ALIGNMENT, FP8_GROUP, Field, contiguous_field, meta_length, round_up, row_stride

CONTROL = ("dispatch_signals", "dispatch_meta", "combine_signals", "combine_meta")
DATA = ("dispatch_x", "dispatch_scales", "dispatch_src_idx", "dispatch_counts", "combine_x", "combine_flags")
SEND = ("send_x", "send_scales", "combine_send")


def _place(specs: list[tuple[str, object, tuple[int, ...]]], offset: int) -> tuple[dict[str, Field], int]:
    """Fields of ``specs`` (name, dtype, shape) one after another from ``offset``, each aligned;
    the fields and the offset past the last."""
    fields = {}
    for name, dtype, shape in specs:
        offset = round_up(offset, FIELD_ALIGNMENT)
        fields[name] = contiguous_field(name, offset, dtype, shape)
        offset = fields[name].end if 0 not in shape else offset
    return fields, round_up(offset, FIELD_ALIGNMENT)


def _doubled(fields: dict[str, Field], half_bytes: int, first: int) -> dict[str, Field]:
    """``fields`` of one half (at offsets from 0) as ``[2, ...]`` arrays from ``first``."""
    return {f.name: Field(f.name, first + f.offset, f.dtype, (2,) + f.shape, (half_bytes,) + f.strides)
            for f in fields.values()}


@dataclass(frozen=True)
class LowLatencyLayout:
    """Where the low-latency fields of one call shape lie in a Buffer's block (see the module).

    Attributes:
        num_ranks, num_max_tokens, hidden, num_experts: the call shape it was made for.
        nbytes: bytes the block needs.
        fields: name -> :class:`xmoe.layout.symmetric.Field` (offsets from the block's start).
    """

    num_ranks: int
    num_max_tokens: int
    hidden: int
    num_experts: int
    nbytes: int
    fields: dict[str, Field]

    def slot_offset(self, parity: int, local_expert: int, source: int, slot: int) -> int:
        """Byte offset in the block where slot ``slot`` of ``source`` for ``local_expert`` lands."""
        x = self.fields["dispatch_x"]
        if not (0 <= parity < 2 and 0 <= local_expert < x.shape[1] and 0 <= source < self.num_ranks
                and 0 <= slot < self.num_max_tokens):
            raise ValueError(f"(parity, local_expert, source, slot)=({parity}, {local_expert}, {source}, {slot}) "
                             f"outside the layout")
        return x.offset + parity * x.strides[0] + local_expert * x.strides[1] + source * x.strides[2] + slot * x.strides[3]


def low_latency_layout(num_max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> LowLatencyLayout:
    """The layout for up to ``num_max_tokens`` tokens per rank of ``hidden`` channels routed to
    ``num_experts`` experts over ``num_ranks`` ranks; ``ValueError`` naming a bad size."""
    for name, value, low in (("num_max_dispatch_tokens_per_rank", num_max_tokens, 1), ("hidden", hidden, 1),
                             ("num_ranks", num_ranks, 1), ("num_experts", num_experts, 1)):
        if value < low:
            raise ValueError(f"{name}={value}: must be >= {low}")
    if num_experts % num_ranks:
        raise ValueError(f"num_experts={num_experts} is not divisible by the {num_ranks} ranks")
    local, groups, row = num_experts // num_ranks, hidden // FP8_GROUP, row_stride(2 * hidden)
    control, control_bytes = _place([(n, np.int64 if n.endswith("signals") else np.int32,
                                      (num_ranks,) if n.endswith("signals") else (num_ranks, meta_length(num_ranks)))
                                     for n in CONTROL], 0)
    data, data_bytes = _place([("dispatch_x", np.uint8, (local, num_ranks, num_max_tokens, row)),
                               ("dispatch_scales", np.float32, (local, num_ranks, num_max_tokens, groups)),
                               ("dispatch_src_idx", np.int32, (local, num_ranks, num_max_tokens, 1)),
                               ("dispatch_counts", np.int64, (local, num_ranks)),
                               ("combine_x", np.uint8, (num_experts, num_max_tokens, row)),
                               ("combine_flags", np.int64, (num_experts,))], 0)
    first_data = 2 * control_bytes
    send, end = _place([("send_x", np.uint8, (num_max_tokens, hidden)),
                        ("send_scales", np.float32, (num_max_tokens, groups)),
                        ("combine_send", np.uint8, (local, num_ranks * num_max_tokens, 2 * hidden))],
                       first_data + 2 * data_bytes)
    fields = _doubled(control, control_bytes, 0) | _doubled(data, data_bytes, first_data) | send
    return LowLatencyLayout(num_ranks, num_max_tokens, hidden, num_experts, end, fields)


def low_latency_size_hint(num_max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Bytes of symmetric memory a low-latency Buffer needs for these calls (DeepEP's
    ``get_low_latency_rdma_size_hint``)."""
    return low_latency_layout(num_max_tokens, hidden, num_ranks, num_experts).nbytes
