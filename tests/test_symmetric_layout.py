"""Properties of the symmetric tensor layout: regions never overlap, always fit, and lie where
they lie whatever the call's shape."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmoe.layout.symmetric import (
    FIELD_ALIGNMENT,
    ROW_ALIGNMENT,
    capacity_for,
    control_fields,
    size_hint,
    symmetric_layout,
)

ranks = st.integers(1, 16)
call_shapes = st.tuples(st.integers(0, 20000), st.integers(0, 16))  # row bytes, top-k


def blocks(ranks_: int) -> st.SearchStrategy[int]:
    """Block sizes from just big enough for the control fields to a few MB."""
    return st.integers(2 * control_fields(ranks_)[1], 1 << 22)


def extents(field, source: int) -> tuple[int, int]:
    """Bytes ``[start, end)`` of ``source``'s part of a region field (of a whole control field)."""
    if field.name in ("signals", "notify_signals", "meta"):
        return field.offset, field.end
    inner = field.end - field.offset - (field.shape[0] - 1) * field.strides[0]
    start = field.offset + source * field.strides[0]
    return start, start + inner


@settings(max_examples=200, deadline=None)
@given(ranks.flatmap(lambda r: st.tuples(st.just(r), blocks(r))), call_shapes)
def test_fields_aligned_disjoint_and_inside_their_region(ranks_blocks, call):
    num_ranks, nbytes = ranks_blocks
    layout = symmetric_layout(nbytes, num_ranks, *call)
    control = control_fields(num_ranks)[1]
    assert 2 * layout.nbytes <= nbytes and control + num_ranks * layout.region_bytes <= layout.nbytes
    spans = []
    for field in layout.fields.values():
        assert field.offset % FIELD_ALIGNMENT == 0
        sources = range(num_ranks) if field.name not in ("signals", "notify_signals", "meta") else [None]
        for source in sources:
            start, end = extents(field, source or 0)
            if source is None:
                assert end <= control
            else:  # inside the source's own region
                region = control + source * layout.region_bytes
                assert region <= start and end <= region + layout.region_bytes
            if end > start:
                spans.append((start, end))
    spans.sort()
    for (_, end), (next_start, _) in zip(spans, spans[1:]):
        assert end <= next_start
    assert layout.row_stride % ROW_ALIGNMENT == 0 and layout.row_stride >= layout.row_bytes


@settings(max_examples=200, deadline=None)
@given(ranks.flatmap(lambda r: st.tuples(st.just(r), blocks(r))), call_shapes, call_shapes)
def test_regions_do_not_depend_on_the_call(ranks_blocks, call, other):
    """Ranks that disagree on a call's shape still agree on the control fields and on where each
    source's region lies: a writer of one shape stays inside its own region of a reader of another."""
    num_ranks, nbytes = ranks_blocks
    first, second = symmetric_layout(nbytes, num_ranks, *call), symmetric_layout(nbytes, num_ranks, *other)
    assert (first.nbytes, first.region_bytes) == (second.nbytes, second.region_bytes)
    for name in ("signals", "notify_signals", "meta"):
        assert first.fields[name] == second.fields[name]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(1, 40), st.integers(0, 3))
def test_rows_of_every_source_and_parity_never_collide(num_ranks, capacity, row_bytes, topk):
    nbytes = size_hint(capacity, num_ranks, row_bytes, topk)
    layout = symmetric_layout(nbytes, num_ranks, row_bytes, topk)
    assert layout.capacity >= capacity
    starts = [layout.row_offset(p, s, i) for p in range(2) for s in range(num_ranks) for i in range(capacity)]
    intervals = sorted((o, o + layout.row_bytes) for o in starts)
    for (_, end), (next_start, _) in zip(intervals, intervals[1:]):
        assert end <= next_start


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1 << 26), st.integers(1, 8), st.integers(1, 16384), st.integers(0, 8))
def test_capacity_is_the_largest_that_fits(nbytes, num_ranks, row_bytes, topk):
    capacity = capacity_for(nbytes, num_ranks, row_bytes, topk)
    if capacity < 0:
        assert size_hint(0, num_ranks, row_bytes, topk) > nbytes
        return
    assert size_hint(capacity, num_ranks, row_bytes, topk) <= nbytes
    assert size_hint(capacity + 1, num_ranks, row_bytes, topk) > nbytes
    assert capacity_for(size_hint(capacity, num_ranks, row_bytes, topk), num_ranks, row_bytes, topk) == capacity


@settings(max_examples=50, deadline=None)
@given(ranks.flatmap(lambda r: st.tuples(st.just(r), blocks(r))), call_shapes, st.integers(0, 1))
def test_views_land_where_row_offset_says(ranks_blocks, call, parity):
    num_ranks, nbytes = ranks_blocks
    layout = symmetric_layout(nbytes, num_ranks, *call)
    block = np.zeros(nbytes, np.uint8)
    views = layout.views(block, parity)
    for name, field in layout.fields.items():
        assert views[name].shape == field.shape and views[name].dtype == field.dtype
    if layout.capacity and layout.row_bytes:
        source, slot = num_ranks - 1, layout.capacity - 1
        views["x"][source, slot, 0] = 7
        assert block[layout.row_offset(parity, source, slot)] == 7 and block.sum() == 7


@pytest.mark.parametrize("bad", [dict(num_ranks=0), dict(nbytes=-1), dict(row_bytes=-2), dict(num_topk=-1),
                                 dict(nbytes=64)])
def test_bad_layout_arguments(bad):
    args = dict(nbytes=1 << 16, num_ranks=2, row_bytes=8, num_topk=2) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        symmetric_layout(**args)
