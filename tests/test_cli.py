"""python -m xmoe demo and info, as a user runs them."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import xmoe
from xmoe import cli, runtime

#: The backend a plain ``python -m xmoe`` picks on this machine.
BACKEND = runtime.default_backend()


def imported_modules(source: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` statement of ``source`` names."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_cli_and_the_rest_of_the_library_never_import_the_test_support():
    package = Path(xmoe.__file__).parent
    for path in package.rglob("*.py"):
        if path.relative_to(package).parts[0] != "testing":
            testing = {name for name in imported_modules(path.read_text()) if name.startswith("xmoe.testing")}
            assert not testing, f"{path.relative_to(package)} imports {sorted(testing)}"


def test_demo_launches_its_ranks_and_matches_the_reference():
    done = subprocess.run([sys.executable, "-m", "xmoe", "demo", "--ranks", "2", "--tokens", "24", "--hidden", "32",
                           "--experts", "8", "--topk", "3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "ranks=2 tokens=24" in done.stdout
    assert "result matches the NumPy reference on every rank" in done.stdout
    assert len([line for line in lines if line.split()[:1] in (["0"], ["1"])]) == 2


def test_demo_says_where_it_runs_and_reports_each_step():
    done = subprocess.run([sys.executable, "-m", "xmoe", "demo", "--ranks", "2", "--tokens", "8", "--hidden", "16",
                           "--experts", "4", "--topk", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    steps = [line.split()[2] for line in lines if line.lstrip().startswith("step ")]
    assert steps == ["layout", "dispatch", "expert", "combine"], done.stdout
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["rank"])
    assert all(not line.lstrip().startswith("step ") for line in lines[header:])  # progress comes before the table
    if BACKEND == "sim":
        assert lines[0].startswith("xmoe demo: starting 2 ranks on the CPU simulator (Numba's CUDA simulator")
        assert "layout ms (sim)" in lines[header] and "combine ms (sim)" in lines[header]
    else:
        assert lines[0].startswith("xmoe demo: starting 2 ranks on the GPU")
        assert "(sim)" not in lines[header]


@pytest.mark.parametrize("args, message", [
    (["--ranks", "0"], "argument --ranks: must be >= 1, got 0"),
    (["--ranks", "two"], "argument --ranks: expected an integer, got 'two'"),
    (["--tokens", "0"], "argument --tokens: must be >= 1, got 0"),
    (["--hidden", "-3"], "argument --hidden: must be >= 1, got -3"),
    (["--experts", "0"], "argument --experts: must be >= 1, got 0"),
    (["--topk", "0"], "argument --topk: must be >= 1, got 0"),
    (["--topk", "20"], "--topk 20 is more than --experts 16"),
    (["--ranks", "3"], "--experts 16 is not divisible by --ranks 3"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
])
def test_demo_rejects_bad_arguments_before_launching_ranks(args, message, monkeypatch, capsys):
    def no_launch(*_: object) -> None:
        raise AssertionError("ranks launched")

    monkeypatch.setattr(runtime, "launcher_command", no_launch)
    with pytest.raises(SystemExit) as exited:
        cli.main(["demo", *args])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"python -m xmoe demo: error: {message}")


def test_demo_rejects_experts_not_divisible_by_ranks():
    done = subprocess.run([sys.executable, "-m", "xmoe", "demo", "--ranks", "2", "--experts", "7"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[-1].startswith(
        "python -m xmoe demo: error: --experts 7 is not divisible by --ranks 2")


def test_demo_without_a_launcher_says_what_to_install(monkeypatch, capsys):
    def no_mpirun(*_: object) -> None:
        raise RuntimeError("no mpirun found: pip install mpich")

    monkeypatch.setattr(runtime, "launcher_command", no_mpirun)
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err == "xmoe demo: no mpirun found: pip install mpich\n"


def test_demo_on_the_gpu_without_torch_says_what_to_install(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(runtime, "default_backend", lambda: "cuda")
    monkeypatch.setattr(runtime, "launcher_command", lambda ranks, backend: ["torchrun"])
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "torch" else find_spec(name, *rest))
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install torch" in err


def test_info_names_backend_and_versions():
    out = subprocess.run([sys.executable, "-m", "xmoe", "info"], capture_output=True, text=True, check=True).stdout
    assert f"backend: {BACKEND}" in out and "numba-cuda:" in out
