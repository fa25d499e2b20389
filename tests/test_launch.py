"""The launch path's signatures: which arguments share a compiled kernel."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe.device_memory import DeviceArray
from xmoe.kernels.launch import pack


def view(shape: tuple[int, ...], strides: tuple[int, ...]) -> DeviceArray:
    return DeviceArray(4096, shape, np.dtype(np.int32), None, strides)


def test_empty_strided_views_compile_apart():
    """A region field of a call without top-k (``[ranks, capacity, 0]``, zero strides) may be
    typed C-contiguous by Numba; a kernel compiled for it must not serve the same field of a
    call with top-k (``[ranks, capacity, 8]``), which it would index ignoring the strides."""
    empty = pack((view((2, 100, 0), (4000, 0, 4)),))[0]
    full = pack((view((2, 100, 8), (4000, 32, 4)),))[0]
    other = pack((view((2, 50, 3), (9000, 12, 4)),))[0]
    assert empty != full
    assert full == other  # strided views of any shape share one kernel
    contiguous = pack((view((3, 4), (16, 4)), view((0, 4), (16, 4))))[0]
    assert contiguous[0] == contiguous[1]  # C-contiguous ones too, empty or not (never indexed)


def test_prepared_launch_refuses_another_signature(monkeypatch):
    """A prepared launch takes per-call arrays of the signature it was compiled for only (GPU path,
    checked without a GPU: the signature check comes before the driver call)."""
    import pytest

    from xmoe.kernels import launch

    prepared = launch.Prepared.__new__(launch.Prepared)
    prepared.per_call = frozenset({"x"})
    prepared.parameters = None
    prepared.slots = {"x": (0, launch._ARRAY[3], launch._array_signature(view((2, 100, 8), (4000, 32, 4))))}
    monkeypatch.setattr(launch, "SIMULATOR", False)
    with pytest.raises(TypeError, match="x: prepared for arrays of"):
        prepared(0, x=view((2, 100, 0), (4000, 0, 4)))


def test_param_struct_declares_once():
    """A generated kernel's parameter struct: the C declaration and the host's offsets come from one
    tuple, every field 8 bytes; a field of another size is refused; the low-latency structs name
    every field once."""
    from xmoe.kernels.low_latency_cuda import COMBINE, DISPATCH
    from xmoe.kernels.raw_launch import ParamStruct, field_value

    params = ParamStruct("P", (("long long", "count"), ("const float*", "x"), ("int*", "out")))
    assert params.source() == "struct P {\n  long long count;\n  const float* x;\n  int* out;\n};\n"
    assert params.offsets() == {"count": 0, "x": 8, "out": 16} and params.pointer_fields() == {"x", "out"}
    with pytest.raises(TypeError, match="P.n: int is not 8 bytes"):
        ParamStruct("P", (("int", "n"),))
    assert field_value(None, True) == 0 and field_value(np.int64(7), False) == 7
    array = np.zeros(4, np.float32)
    assert field_value(array, True) == array.ctypes.data
    for struct in (DISPATCH, COMBINE):
        names = [name for _, name in struct.fields]
        assert len(names) == len(set(names))
