"""Properties of the low-latency layout: every (half, expert, source, slot) and every combine
slot has bytes of its own, fields do not overlap and fit the block, and the control fields
lie where they lie whatever the call's shape."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmoe.layout.low_latency import CONTROL, low_latency_layout, low_latency_size_hint
from xmoe.layout.symmetric import FIELD_ALIGNMENT

shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 4), st.integers(1, 8)).map(
    lambda s: (s[0], 128 * s[1], s[2], s[2] * s[3]))  # max tokens, hidden, ranks, experts


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_fields_aligned_disjoint_and_inside_the_block(shape):
    layout = low_latency_layout(*shape)
    seen = np.zeros(layout.nbytes, np.int32)
    for field in layout.fields.values():
        assert field.offset % FIELD_ALIGNMENT == 0
        bytes_ = field.byte_offsets()
        assert len(np.unique(bytes_)) == len(bytes_), f"{field.name} overlaps itself"
        assert bytes_.max(initial=0) < layout.nbytes
        seen[bytes_] += 1
    assert seen.max() <= 1
    assert low_latency_size_hint(*shape) == layout.nbytes


@settings(max_examples=60, deadline=None)
@given(shapes, shapes)
def test_control_fields_do_not_depend_on_the_call(shape, other):
    if shape[2] != other[2]:
        return
    a, b = low_latency_layout(*shape), low_latency_layout(*other)
    for name in CONTROL:
        assert a.fields[name] == b.fields[name]


def test_slot_offsets_are_distinct_and_bounded():
    layout = low_latency_layout(3, 256, 2, 4)
    offsets = {layout.slot_offset(p, e, s, i) for p in range(2) for e in range(2) for s in range(2) for i in range(3)}
    assert len(offsets) == 24
    with pytest.raises(ValueError, match="outside the layout"):
        layout.slot_offset(0, 2, 0, 0)


@pytest.mark.parametrize("bad, message", [((0, 128, 2, 4), "num_max_dispatch_tokens_per_rank=0"),
                                          ((4, 128, 2, 5), "num_experts=5 is not divisible"),
                                          ((4, 128, 0, 4), "num_ranks=0")])
def test_bad_layout_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        low_latency_layout(*bad)
