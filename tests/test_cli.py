"""python -m xmoe demo and info, as a user runs them."""

from __future__ import annotations

import subprocess
import sys


def test_demo_launches_its_ranks_and_matches_the_reference():
    done = subprocess.run([sys.executable, "-m", "xmoe", "demo", "--ranks", "2", "--tokens", "24", "--hidden", "32",
                           "--experts", "8", "--topk", "3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ranks=2 tokens=24" in done.stdout
    assert "result matches the NumPy reference on every rank" in done.stdout
    assert len([line for line in done.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]) == 2


def test_demo_rejects_experts_not_divisible_by_ranks():
    done = subprocess.run([sys.executable, "-m", "xmoe", "demo", "--ranks", "2", "--experts", "7"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--experts 7 is not divisible by --ranks 2" in done.stdout + done.stderr


def test_info_names_backend_and_versions():
    out = subprocess.run([sys.executable, "-m", "xmoe", "info"], capture_output=True, text=True, check=True).stdout
    assert "backend: sim" in out and "numba-cuda:" in out
