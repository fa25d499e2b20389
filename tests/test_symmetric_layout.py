"""Properties of the symmetric tensor layout: regions never overlap and always fit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmoe.layout.symmetric import (
    FIELD_ALIGNMENT,
    ROW_ALIGNMENT,
    capacity_for,
    size_hint,
    symmetric_layout,
)

shapes = st.tuples(
    st.integers(1, 16),  # ranks
    st.integers(0, 300),  # capacity
    st.integers(0, 20000),  # row bytes
    st.integers(0, 16),  # top-k
    st.integers(1, 64),  # local experts
)


@settings(max_examples=200, deadline=None)
@given(shapes)
def test_fields_aligned_disjoint_and_inside(shape):
    layout = symmetric_layout(*shape)
    fields = sorted(layout.fields.values(), key=lambda f: f.offset)
    for field in fields:
        assert field.offset % FIELD_ALIGNMENT == 0
        assert 0 <= field.offset and field.end <= layout.nbytes
    for first, second in zip(fields, fields[1:]):
        assert first.end <= second.offset
    assert layout.row_stride % ROW_ALIGNMENT == 0 and layout.row_stride >= layout.row_bytes


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(1, 40), st.integers(0, 3))
def test_rows_of_every_source_and_parity_never_collide(ranks, capacity, row_bytes, topk):
    layout = symmetric_layout(ranks, capacity, row_bytes, topk, 2)
    starts = [layout.row_offset(p, s, i) for p in range(2) for s in range(ranks) for i in range(capacity)]
    assert len(set(starts)) == len(starts)
    intervals = sorted((o, o + layout.row_bytes) for o in starts)
    for (_, end), (next_start, _) in zip(intervals, intervals[1:]):
        assert end <= next_start
    x = layout.fields["x"]
    for p in range(2):
        for s in range(ranks):
            for i in range(capacity):
                offset = layout.row_offset(p, s, i)
                assert p * layout.nbytes + x.offset <= offset
                assert offset + layout.row_bytes <= p * layout.nbytes + x.end


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1 << 26), st.integers(1, 8), st.integers(1, 16384), st.integers(0, 8), st.integers(1, 32))
def test_capacity_is_the_largest_that_fits(nbytes, ranks, row_bytes, topk, local_experts):
    capacity = capacity_for(nbytes, ranks, row_bytes, topk, local_experts)
    if capacity < 0:
        assert size_hint(0, ranks, row_bytes, topk, local_experts) > nbytes
        return
    assert size_hint(capacity, ranks, row_bytes, topk, local_experts) <= nbytes
    assert size_hint(capacity + 1, ranks, row_bytes, topk, local_experts) > nbytes


@settings(max_examples=50, deadline=None)
@given(shapes, st.integers(0, 1))
def test_views_land_where_row_offset_says(shape, parity):
    layout = symmetric_layout(*shape)
    block = np.zeros(2 * layout.nbytes, np.uint8)
    views = layout.views(block, parity)
    for name, field in layout.fields.items():
        assert views[name].shape == field.shape and views[name].dtype == field.dtype
    if layout.capacity and layout.row_bytes:
        source, slot = shape[0] - 1, layout.capacity - 1
        views["x"][source, slot, 0] = 7
        assert block[layout.row_offset(parity, source, slot)] == 7


@pytest.mark.parametrize("bad", [dict(num_ranks=0), dict(capacity=-1), dict(row_bytes=-2), dict(num_local_experts=0)])
def test_bad_layout_arguments(bad):
    args = dict(num_ranks=2, capacity=4, row_bytes=8, num_topk=2, num_local_experts=2) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        symmetric_layout(**args)
