"""The import arrows of the package point one way (the project's design, section 1): kernels never
import the host side of a protocol (buffer, ep) or the CLI; comm and layout never import kernels;
layout is pure index math; the library outside ``xmoe.testing`` never imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xmoe"


def imported(path: Path) -> set[str]:
    """Every ``xmoe...`` module ``path`` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {name for name in names if name == "xmoe" or name.startswith("xmoe.")}


RULES = {  # package part -> modules it must not import (prefixes)
    "kernels": ("xmoe.buffer", "xmoe.ep", "xmoe.cli", "xmoe.demo", "xmoe.testing"),
    "comm": ("xmoe.kernels", "xmoe.buffer", "xmoe.ep", "xmoe.cli", "xmoe.testing"),
    "layout": ("xmoe.kernels", "xmoe.comm", "xmoe.buffer", "xmoe.ep", "xmoe.interop", "xmoe.device_memory",
               "xmoe.runtime", "xmoe.testing"),
    "ep": ("xmoe.buffer", "xmoe.cli", "xmoe.testing"),
}


@pytest.mark.parametrize("part", RULES)
def test_imports_point_down(part):
    for path in sorted((PACKAGE / part).rglob("*.py")):
        bad = sorted(name for name in imported(path) if name.startswith(RULES[part]))
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"


def test_kernel_modules_do_not_import_each_other():
    """Shared device-side code lives in comm/; a kernel module imports launch.py (the launch path)
    and numerics.py (device arithmetic), never another kernel family (``foo_cuda.py``, the CUDA C
    lowering of ``foo.py``'s protocol, is of foo's family)."""
    shared = {"xmoe.kernels.launch", "xmoe.kernels.raw_launch", "xmoe.kernels.numerics", "xmoe.kernels.build",
              "xmoe.kernels.cuda_c"}
    for path in sorted((PACKAGE / "kernels").glob("*.py")):
        family = {f"xmoe.kernels.{path.stem}", f"xmoe.kernels.{path.stem.removesuffix('_cuda')}"}
        others = sorted(name for name in imported(path)
                        if name.startswith("xmoe.kernels.") and name not in shared | family
                        and not name.startswith("xmoe.kernels.gemm"))
        assert not others, f"{path.name} imports {others}"
