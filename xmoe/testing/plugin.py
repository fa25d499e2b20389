"""pytest plugin (entry point ``pytest11``): multi-rank tests and xmoe fixtures.

A test marked ``@pytest.mark.mpi(ranks=N)`` is relaunched on N ranks: under mpirun (the
``mpich`` wheel) on the CPU simulator, under torchrun on the cuda backend. Each rank
runs the test function once and reports its outcome in a file; the parent test passes
when every rank passed, skips when every rank skipped, and otherwise fails with the
error report of each failed rank and the end of the job's output. Tests marked ``gpu``
skip cleanly without a GPU.

The multi-rank tests of one rank count share jobs: when the parent reaches the first of
them, one job runs it and every later one of that count (in the session's order), and
the parent then reports each from its outcome files. A launch and a rank's start-up cost
more than most tests (imports, the runtime, the kernels loaded). A job that ends early
(a failure ends it, see below) leaves the tests after it to the next job; a test that
makes no progress for ``XMOE_TEST_TIMEOUT`` seconds is reported as hung and the job killed.
``mpi(ranks=N, alone=True)`` gives a test a job of its own, as ``XMOE_TEST_BATCH=0`` does
every test (and as pytest-xdist workers do: each runs only the tests it is given).

A rank whose test fails ends the whole job at once, right after writing its outcome
(``MPI_Abort`` when MPI is initialised, which makes mpirun kill the other ranks; else
``os._exit(1)``, after which torchrun stops the others): its peers would otherwise wait
for it, at a barrier or a peer wait, until their timeout or the parent's limit
(``XMOE_TEST_TIMEOUT``, 600 s).

Since a failure ends the job, a rank waiting for a peer only waits for one that is slow,
never for one that is gone. So ranks on the simulator get a generous peer timeout:
``XMOE_TIMEOUT_S`` defaults to 300 s there (the library's default, 60 s, was too short for
4 simulated ranks sharing 2 loaded CPU cores). An ``XMOE_TIMEOUT_S`` set by the caller, or a
test's own ``Config(timeout_s=...)``, still wins.

Fixtures: ``group`` (the :class:`xmoe.Group`), ``rank``, ``world_size``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from xmoe import runtime

#: Set in relaunched ranks: the directory each rank writes its outcome to.
CHILD_ENV = "XMOE_TEST_RESULTS"
#: Seconds a relaunched test may take before it is killed and reported as hung.
TIMEOUT_ENV = "XMOE_TEST_TIMEOUT"
#: The peer timeout (``XMOE_TIMEOUT_S``) ranks on the simulator get unless the caller set one.
SIM_PEER_TIMEOUT_S = 300
#: "0": every multi-rank test in a job of its own.
BATCH_ENV = "XMOE_TEST_BATCH"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mpi(ranks): run the test on N ranks (mpirun on CPU, torchrun on GPU)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and nvshmem4py; skipped without them")
    config.addinivalue_line("markers", "sim: runs where the simulator is the default backend (NumPy or CPU "
                                       "tensors into the kernels); skipped on a GPU machine")


def in_child() -> bool:
    return CHILD_ENV in os.environ


def runs_alone(item: pytest.Item) -> bool:
    """Whether ``item`` gets a job of its own (see the module)."""
    return (os.environ.get(BATCH_ENV) == "0" or hasattr(item.config, "workerinput")
            or bool(item.get_closest_marker("mpi").kwargs.get("alone", False)))


def outcome_file(nodeid: str, rank: int) -> str:
    """The name of the file rank ``rank`` writes the outcome of test ``nodeid`` to."""
    return f"{hashlib.sha1(nodeid.encode()).hexdigest()[:16]}-rank-{rank}.json"


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
    if item.get_closest_marker("sim") is not None and runtime.default_backend() != "sim":
        pytest.skip("passes NumPy or CPU tensors into the kernels: the simulator's test (tests/test_gpu*.py run "
                    "these kernels on the GPU)")


def _failure_report(outcomes: list[dict], ranks: int, command: list[str], returncode: int, output: str) -> str:
    """What the parent shows when a relaunched test failed: each rank's outcome, the error
    report of each failed rank (from its outcome file), then the end of the job's output."""
    states = [f"rank {o['rank']} {o['outcome']}" for o in outcomes]
    if len(outcomes) < ranks:
        states.append(f"{ranks - len(outcomes)} ended without an outcome (the job ends when a rank fails)")
    failed = [f"---- rank {o['rank']} failed ----\n{o['longrepr']}" for o in outcomes if o["outcome"] == "failed"]
    if not failed:  # no rank got to report: show the error lines of the output (a crash, an import error)
        lines = [line for line in output.splitlines() if line.startswith("E ") or "Error:" in line]
        failed = ["error lines of every rank:\n" + "\n".join(lines)[-6000:]]
    return (f"on {ranks} ranks: {', '.join(states)}\n" + "\n".join(failed)[-8000:]
            + f"\n---- {' '.join(command)} ... exited {returncode}; last output ----\n{output[-3000:]}")


class _Job:
    """One launch of ``nodeids`` on ``ranks`` ranks, run to its end: the outcomes each rank
    wrote (nodeid -> outcomes sorted by rank), the launcher's exit code and output, and the
    test that was running when no progress came for ``XMOE_TEST_TIMEOUT`` seconds (or None)."""

    def __init__(self, config: pytest.Config, nodeids: list[str], ranks: int) -> None:
        backend = runtime.default_backend()
        self.command = runtime.launcher_command(ranks, backend)
        env = dict(os.environ, XMOE_BACKEND=backend)
        if backend == "sim":
            env.setdefault("XMOE_TIMEOUT_S", str(SIM_PEER_TIMEOUT_S))
        if backend == "cuda" and ranks > runtime.gpu_count():  # PEs share a GPU: NVSHMEM needs MPS shares <= 100%
            env.setdefault("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", str(100 * runtime.gpu_count() // ranks))
        args = [sys.executable, "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider", "-p", "no:randomly",
                "--rootdir", str(config.rootpath), *nodeids]
        limit = float(os.environ.get(TIMEOUT_ENV, 600))
        with tempfile.TemporaryDirectory(prefix="xmoe-ranks-") as results, tempfile.TemporaryFile("w+") as log:
            env[CHILD_ENV] = results
            process = subprocess.Popen(self.command + args, cwd=config.rootpath, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
            self.hung = self._watch(process, Path(results), nodeids, ranks, limit)
            self.returncode = process.returncode
            log.seek(0)
            self.output = log.read()
            self.outcomes: dict[str, list[dict]] = {}
            for path in Path(results).glob("*.json"):
                outcome = json.loads(path.read_text())
                self.outcomes.setdefault(outcome["nodeid"], []).append(outcome)
        for outcomes in self.outcomes.values():
            outcomes.sort(key=lambda o: o["rank"])

    @staticmethod
    def _watch(process: subprocess.Popen, results: Path, nodeids: list[str], ranks: int,
               limit: float) -> str | None:
        """Wait for ``process``; kill its process group when no outcome file appeared for
        ``limit`` seconds and return the first test that not every rank had finished then."""
        seen, last = 0, time.monotonic()
        while process.poll() is None:
            time.sleep(0.2)
            count = sum(1 for _ in results.glob("*.json"))
            if count != seen:
                seen, last = count, time.monotonic()
            elif time.monotonic() - last > limit:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                finished = [json.loads(p.read_text())["nodeid"] for p in results.glob("*.json")]
                return next((nodeid for nodeid in nodeids if finished.count(nodeid) < ranks), nodeids[-1])
        return None

    def reports(self, nodeid: str, ranks: int) -> bool:
        """Whether this job's outcome files settle test ``nodeid``: every rank's outcome, or a
        failure (which ended the job), or the hang. A test some ranks finished before another
        rank's failure in an earlier test ended the job is left to the next job."""
        outcomes = self.outcomes.get(nodeid, [])
        return nodeid == self.hung or len(outcomes) == ranks or any(o["outcome"] == "failed" for o in outcomes)


#: nodeid -> the job that ran it (or tried to), for the tests a shared job has run.
_JOBS: dict[str, _Job] = {}


def _job_for(item: pytest.Function, ranks: int) -> _Job:
    """The job whose outcomes report ``item``: one started now for it and every later test of
    ``ranks`` ranks that shares jobs and has none yet (only ``item`` when it runs alone)."""
    job = _JOBS.pop(item.nodeid, None)
    if job is not None:
        return job
    nodeids = [item.nodeid]
    if not runs_alone(item):
        later = item.session.items[item.session.items.index(item) + 1:]
        nodeids += [other.nodeid for other in later
                    if mpi_ranks(other) == ranks and not runs_alone(other) and other.nodeid not in _JOBS]
    job = _Job(item.config, nodeids, ranks)
    for nodeid in nodeids[1:]:
        if job.reports(nodeid, ranks):
            _JOBS[nodeid] = job
    return job


def _relaunch(item: pytest.Function, ranks: int) -> None:
    try:
        job = _job_for(item, ranks)
    except RuntimeError as exc:  # no launcher
        pytest.skip(str(exc))
    if job.hung == item.nodeid:
        pytest.fail(f"{ranks} ranks did not finish in {os.environ.get(TIMEOUT_ENV, 600)} s (no rank finished "
                    f"a test for that long):\n{job.output[-4000:]}", pytrace=False)
    outcomes = job.outcomes.get(item.nodeid, [])
    if len(outcomes) == ranks and all(o["outcome"] == "skipped" for o in outcomes):
        pytest.skip(outcomes[0]["reason"])
    if len(outcomes) != ranks or any(o["outcome"] != "passed" for o in outcomes):
        pytest.fail(_failure_report(outcomes, ranks, job.command, job.returncode, job.output), pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    ranks = mpi_ranks(pyfuncitem)
    if ranks is None or in_child():
        return None
    _relaunch(pyfuncitem, ranks)
    return True


def _end_job() -> None:
    """End every rank of this job now: ``MPI_Abort`` where MPI is initialised (mpirun then
    kills the other ranks), else exit at once (torchrun then stops the others)."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.COMM_WORLD.Abort(1)
    os._exit(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """In a relaunched rank: write the test's outcome (and, for a failure, its error report
    and captured output) to this rank's file; a failure of a test on two or more ranks then ends the job."""
    outcome = yield
    report = outcome.get_result()
    ranks = mpi_ranks(item)
    if not in_child() or ranks is None:
        return
    failed_setup = report.when == "setup" and not report.passed
    if report.when == "call" or failed_setup:
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
        longrepr = ""
        if report.failed:
            longrepr = report.longreprtext + "".join(f"\n---- {title} ----\n{text}" for title, text in report.sections)
        rank = runtime.get_group().rank if runtime.is_initialized() else os.getpid()
        path = Path(os.environ[CHILD_ENV]) / outcome_file(item.nodeid, rank)
        path.write_text(json.dumps({"nodeid": item.nodeid, "rank": rank, "outcome": report.outcome,
                                    "reason": reason, "longrepr": longrepr}))
        if report.failed and ranks > 1:
            _end_job()


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
