"""Launching generated CUDA C kernels that take one parameter struct, declared once.

A kernel's parameters are a :class:`ParamStruct`: an ordered tuple of (C type, name), every
field 8 bytes (a pointer or a ``long long``). From that one declaration come the C struct
the kernel source includes (:meth:`ParamStruct.source`) and the host's packing by name
(:class:`RawLaunch`): a launch packs every field once and repacks only the per-call
fields, at their offsets, then passes the struct to ``cuLaunchKernel`` as its parameter
buffer (a struct by value is the kernel's whole parameter block).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Any

from xmoe.device_memory import data_pointer
from xmoe.kernels.launch import ParameterBuffer

_FIELD = struct.Struct("q")


@dataclass(frozen=True)
class ParamStruct:
    """The parameters of a generated kernel: ``name`` of the C struct, ``fields`` (C type, name)
    in order; each field is 8 bytes (pointer types end in ``*``, the rest are ``long long``)."""

    name: str
    fields: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        for ctype, field in self.fields:
            if not (ctype.endswith("*") or ctype == "long long"):
                raise TypeError(f"{self.name}.{field}: {ctype} is not 8 bytes (a pointer or long long)")

    def source(self) -> str:
        """The C declaration of the struct."""
        return f"struct {self.name} {{\n" + "".join(f"  {ctype} {name};\n" for ctype, name in self.fields) + "};\n"

    def offsets(self) -> dict[str, int]:
        return {name: 8 * i for i, (_, name) in enumerate(self.fields)}

    def pointer_fields(self) -> frozenset[str]:
        return frozenset(name for ctype, name in self.fields if ctype.endswith("*"))


def field_value(value: Any, is_pointer: bool) -> int:
    """What a field holds: an array's address (None: a null pointer), or an int."""
    if not is_pointer:
        return int(value)
    return 0 if value is None else data_pointer(value)


class RawLaunch:
    """A launch of ``function`` (the ``CUfunction`` of a CUDA C kernel of one ``params`` struct) on ``blocks`` x
    ``threads`` with every field fixed but those in ``per_call``, which
    ``launch(stream, name=value, ...)`` sets (arrays by address, ints). The launch holds the
    arrays whose addresses it packed, so that their memory is not handed to another."""

    def __init__(self, function: Any, params: ParamStruct, blocks: int, threads: int, args: dict[str, Any],
                 per_call: tuple[str, ...]) -> None:
        names = [name for _, name in params.fields]
        missing = [name for name in names if name not in args]
        unknown = [name for name in args if name not in names]
        if missing or unknown:
            raise TypeError(f"{params.name}: missing fields {missing}, unknown fields {unknown}")
        offsets, pointers = params.offsets(), params.pointer_fields()
        self.per_call = frozenset(per_call)
        #: name -> (byte offset, whether it holds an address) of each per-call field
        self._slots = {name: (offsets[name], name in pointers) for name in per_call}
        self.blocks, self.threads = blocks, threads
        self._held = tuple(value for name, value in args.items() if name not in self.per_call)
        self.parameters = ParameterBuffer(8 * len(names))
        packed = b"".join(_FIELD.pack(field_value(args[name], name in pointers)) for name in names)
        ctypes.memmove(self.parameters.values_address, packed, len(packed))
        self.function = function

    def __call__(self, stream: int, **values: Any) -> None:
        if values.keys() != self.per_call:
            raise TypeError(f"this launch takes the per-call fields {sorted(self.per_call)}, got {sorted(values)}")
        buffer, slots = self.parameters.values, self._slots
        for name, value in values.items():
            offset, is_pointer = slots[name]
            _FIELD.pack_into(buffer, offset, field_value(value, is_pointer))
        self.parameters.launch(self.function, self.blocks, self.threads, stream)
