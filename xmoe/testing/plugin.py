"""pytest plugin (entry point ``pytest11``): multi-rank tests and xmoe fixtures.

A test marked ``@pytest.mark.mpi(ranks=N)`` is relaunched on N ranks: under mpirun (the
``mpich`` wheel) on the CPU simulator, under torchrun on the cuda backend. Each rank
runs the test function once and reports its outcome in a file; the parent test passes
when every rank passed, skips when every rank skipped, and otherwise fails with the
output of the ranks. Tests marked ``gpu`` skip cleanly without a GPU.

Fixtures: ``group`` (the :class:`xmoe.Group`), ``rank``, ``world_size``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from xmoe import runtime

#: Set in relaunched ranks: the directory each rank writes its outcome to.
CHILD_ENV = "XMOE_TEST_RESULTS"
#: Seconds a relaunched test may take before it is killed and reported as hung.
TIMEOUT_ENV = "XMOE_TEST_TIMEOUT"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mpi(ranks): run the test on N ranks (mpirun on CPU, torchrun on GPU)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and nvshmem4py; skipped without them")


def in_child() -> bool:
    return CHILD_ENV in os.environ


def mpi_ranks(item: pytest.Item) -> int | None:
    marker = item.get_closest_marker("mpi")
    if marker is None:
        return None
    ranks = marker.kwargs.get("ranks", marker.args[0] if marker.args else None)
    if not isinstance(ranks, int) or ranks < 1:
        raise pytest.UsageError(f"{item.nodeid}: mark it mpi(ranks=N) with N >= 1")
    return ranks


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and runtime.default_backend() != "cuda":
        pytest.skip("needs a CUDA GPU and nvshmem4py (pip install 'xmoe[cu12]' or 'xmoe[cu13]')")


def _relaunch(item: pytest.Function, ranks: int) -> None:
    backend = runtime.default_backend()
    try:
        command = runtime.launcher_command(ranks, backend)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    with tempfile.TemporaryDirectory(prefix="xmoe-ranks-") as results:
        env = dict(os.environ, **{CHILD_ENV: results, "XMOE_BACKEND": backend})
        if backend == "cuda" and ranks > runtime.gpu_count():  # PEs share a GPU: NVSHMEM needs MPS shares <= 100%
            env.setdefault("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", str(100 * runtime.gpu_count() // ranks))
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                "--rootdir", str(item.config.rootpath), item.nodeid]
        try:
            done = subprocess.run(command + args, cwd=item.config.rootpath, env=env, capture_output=True,
                                  text=True, timeout=float(os.environ.get(TIMEOUT_ENV, 600)))
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{ranks} ranks did not finish in {exc.timeout} s:\n{(exc.stdout or '')[-4000:]}", pytrace=False)
        outcomes = [json.loads(p.read_text()) for p in sorted(Path(results).glob("rank-*.json"))]
    output = done.stdout + done.stderr
    errors = "\n".join(line for line in output.splitlines() if line.startswith("E ") or "Error:" in line)
    report = (f"{' '.join(command)} ... exited {done.returncode}\nerror lines of every rank:\n{errors[-6000:]}\n"
              f"last output:\n{output[-4000:]}")
    if len(outcomes) == ranks and all(o["outcome"] == "skipped" for o in outcomes):
        pytest.skip(outcomes[0]["reason"])
    if done.returncode != 0 or len(outcomes) != ranks or any(o["outcome"] != "passed" for o in outcomes):
        pytest.fail(f"on {ranks} ranks: {[o['outcome'] for o in outcomes]}\n{report}", pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    ranks = mpi_ranks(pyfuncitem)
    if ranks is None or in_child():
        return None
    _relaunch(pyfuncitem, ranks)
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    report = outcome.get_result()
    if not in_child() or mpi_ranks(item) is None:
        return
    failed_setup = report.when == "setup" and not report.passed
    if report.when == "call" or failed_setup:
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
        rank = runtime.get_group().rank if runtime.is_initialized() else os.getpid()
        path = Path(os.environ[CHILD_ENV]) / f"rank-{rank}.json"
        path.write_text(json.dumps({"outcome": report.outcome, "reason": reason}))


@pytest.fixture
def group(request: pytest.FixtureRequest) -> Any:
    """The :class:`xmoe.Group` of this test's ranks (None in the parent of a relaunched test)."""
    ranks = mpi_ranks(request.node)
    if ranks is not None and not in_child():
        return None
    import xmoe

    group = xmoe.init()
    if ranks is not None and group.world_size != ranks:
        pytest.skip(f"needs {ranks} ranks, running on {group.world_size}")
    return group


@pytest.fixture
def rank(group: Any) -> int:
    """This process's rank."""
    return 0 if group is None else group.rank


@pytest.fixture
def world_size(group: Any) -> int:
    """Number of ranks."""
    return 1 if group is None else group.world_size
