"""The examples run and agree with their own checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_expert_mlp_matches_the_dense_layer():
    # outputs are bfloat16 (2^-8 relative) of values of magnitude ~1
    assert _load("expert_mlp").run() < 0.05


@pytest.mark.sim  # NumPy arrays into the kernels, ranks under mpiexec: the simulator's example
def test_moe_numpy_matches_the_reference():
    assert _load("moe_numpy").run() < 0.05


@pytest.mark.sim
def test_notebook_runs_on_the_simulator():
    """examples/notebooks/dispatch_combine.ipynb executes top to bottom with no error, and its
    checks print differences within bfloat16 rounding."""
    import nbclient
    import nbformat

    folder = EXAMPLES / "notebooks"
    notebook = nbformat.read(folder / "dispatch_combine.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(folder)}}).execute()
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.get("outputs", []))
    differences = [float(line.rsplit(" ", 1)[1]) for line in printed.splitlines() if "largest difference:" in line]
    assert len(differences) == 2 and max(differences) < 0.05
    assert "xmoe.moe on 2 rank(s)" in printed


def test_moe_torch_trains():
    """examples/moe_torch.py: five Adam steps through xmoe's forward and backward lower the loss."""
    pytest.importorskip("torch")
    losses = _load("moe_torch").run()
    assert losses[-1] < 0.7 * losses[0], losses


def test_moe_jax_matches_the_reference():
    pytest.importorskip("jax")
    assert _load("moe_jax").run() < 0.05


@pytest.mark.mpi(ranks=2)
def test_moe_jax_without_x64_names_the_setting(group):
    jax = pytest.importorskip("jax")
    import xmoe

    jax.config.update("jax_enable_x64", False)
    x = jax.numpy.zeros((4, 64), jax.numpy.bfloat16)
    w = jax.numpy.zeros((2, 64, 64), jax.numpy.bfloat16)
    with pytest.raises(ValueError, match="jax_enable_x64"):
        xmoe.moe(x, jax.numpy.zeros((64, 4), jax.numpy.bfloat16), w, w[:, :, :32], 2, group=group)
