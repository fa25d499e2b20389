"""The examples run and agree with their own checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_expert_mlp_matches_the_dense_layer():
    # outputs are bfloat16 (2^-8 relative) of values of magnitude ~1
    assert _load("expert_mlp").run() < 0.05


def test_moe_numpy_matches_the_reference():
    assert _load("moe_numpy").run() < 0.05
