"""Properties of the fused layer's layout (``layout/fused.py``): fields aligned, disjoint and
inside a rank's part; every tile and result tile has bytes of its own inside its field; cell
capacities hold what they promise; flag words round-trip and order calls; bad arguments
and a heap too small raise errors that name them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmoe.layout.fused import cell_capacity, flag_word, fused_layout, read_flag
from xmoe.layout.symmetric import FIELD_ALIGNMENT

# ranks, local experts, max tokens, hidden / 8, top-k, block_m, capacity factor (None: no drops)
shapes = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(0, 40), st.integers(1, 4), st.integers(1, 4),
                   st.sampled_from([1, 8, 16]), st.one_of(st.none(), st.floats(0.1, 3.0)))


def build(shape):
    ranks, local, tokens, hidden8, top_k, block_m, factor = shape
    experts = ranks * local
    return fused_layout(ranks, experts, tokens, 8 * hidden8, min(top_k, experts), block_m, factor)


@settings(max_examples=80, deadline=None)
@given(shapes)
def test_fields_aligned_disjoint_and_inside_the_part(shape):
    layout = build(shape)
    seen = np.zeros(layout.nbytes, np.int32)
    for field in layout.fields.values():
        assert field.offset % FIELD_ALIGNMENT == 0
        bytes_ = field.byte_offsets()
        assert len(np.unique(bytes_)) == len(bytes_), f"{field.name} overlaps itself"
        seen[bytes_] += 1
    assert seen.max() <= 1 and layout.nbytes % FIELD_ALIGNMENT == 0


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_every_tile_has_bytes_of_its_own(shape):
    layout = build(shape)
    tile_bytes = layout.block_m * layout.hidden * 2
    for name, starts in (("dispatch_x", [layout.tile_offset(e, s, i) for e in range(layout.num_local_experts)
                                         for s in range(layout.num_ranks) for i in range(layout.tiles)]),
                         ("combine_x", [layout.result_offset(e, i) for e in range(layout.num_experts)
                                        for i in range(layout.tiles)])):
        field = layout.fields[name]
        starts = np.sort(np.array(starts))
        assert (np.diff(starts) >= tile_bytes).all(), f"{name}: tiles overlap"
        assert starts[0] == field.offset and starts[-1] + tile_bytes == field.end
    with pytest.raises(ValueError, match="outside the layout"):
        layout.tile_offset(0, layout.num_ranks, 0)
    with pytest.raises(ValueError, match="outside the layout"):
        layout.result_offset(0, layout.tiles)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5000), st.integers(1, 300), st.integers(1, 8), st.sampled_from([1, 64, 128]),
       st.one_of(st.none(), st.floats(0.05, 4.0)))
def test_cell_capacity(tokens, experts, top_k, block_m, factor):
    capacity = cell_capacity(tokens, experts, min(top_k, experts), block_m, factor)
    assert capacity % block_m == 0 and capacity >= block_m
    assert capacity <= -(-max(tokens, 1) // block_m) * block_m
    if factor is None:
        assert capacity >= tokens  # no token is ever dropped
    else:
        assert capacity >= min(tokens, np.ceil(factor * tokens * min(top_k, experts) / experts) - 1e-9)


@given(st.integers(1, 2 ** 31 - 2), st.integers(0, 2 ** 31 - 1), st.booleans(), st.integers(0, 2 ** 31 - 1),
       st.booleans())
def test_flag_words_round_trip_and_order_calls(call, rows, last, other_rows, other_last):
    assert read_flag(flag_word(call, rows, last)) == (call, rows, last)
    assert flag_word(call + 1, other_rows, other_last) > flag_word(call, rows, last)
    assert flag_word(call, rows, last) >= flag_word(call, 0, False)
    assert read_flag(0) == (0, 0, False)


def test_sizes_of_the_model_shapes():
    qwen3 = fused_layout(1, 128, 4096, 2048, 8, 128)
    assert qwen3.capacity == 4096 and 4 * 128 * 4096 * 2048 <= qwen3.nbytes < 4 * 128 * 4096 * 2048 + 2 ** 20
    dsv3 = fused_layout(8, 256, 4096, 7168, 8, 128, capacity_factor=1.25)
    assert dsv3.capacity == 256  # 1.25 * 4096 * 8 / 256 = 160 rows, two tiles
    with pytest.raises(ValueError, match=rf"needs {qwen3.nbytes} bytes \(4.00 GiB\).*capacity_factor"):
        qwen3.check_fits(2 ** 30)
    qwen3.check_fits(qwen3.nbytes)


@pytest.mark.parametrize("change, message", [
    (dict(num_ranks=0), "num_ranks=0"), (dict(num_experts=6), "num_experts=6 is not divisible by the 4 ranks"),
    (dict(max_tokens=-1), "max_tokens=-1"), (dict(hidden=12), "hidden=12: must be a multiple of 8"),
    (dict(top_k=0), "top_k=0"), (dict(top_k=9), "top_k=9: more than the 8 experts"), (dict(block_m=0), "block_m=0"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0"), (dict(max_tokens=2.5), "max_tokens=2.5"),
])
def test_bad_layout_arguments(change, message):
    args = dict(num_ranks=4, num_experts=8, max_tokens=16, hidden=64, top_k=2, block_m=8) | change
    with pytest.raises(ValueError, match=message):
        fused_layout(**args)
