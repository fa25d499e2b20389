"""The pytest plugin's relaunch of multi-rank tests, run on small test files of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from xmoe import runtime
from xmoe.testing.plugin import SIM_PEER_TIMEOUT_S

CONFTEST = '''
import xmoe.testing.plugin


def pytest_configure(config):
    if not config.pluginmanager.is_registered(xmoe.testing.plugin):
        config.pluginmanager.register(xmoe.testing.plugin, "xmoe")
'''

RANK_1_FAILS = '''
import pytest


@pytest.mark.mpi(ranks=2)
def test_rank_1_fails(group):
    if group.rank == 1:
        print("rank 1 was here")
        assert group.rank == 0, "rank 1 fails at once"
    group.barrier()  # rank 0 waits here for rank 1, which never comes
'''

PEER_TIMEOUT = '''
import os

import pytest


@pytest.mark.mpi(ranks=2)
def test_peer_timeout(group):
    import xmoe

    from xmoe.config import DEFAULT_TIMEOUT_S

    want = os.environ["WANT_TIMEOUT_S"] or None  # empty: the library's default
    assert os.environ.get("XMOE_TIMEOUT_S") == want
    assert xmoe.Config().resolved(group.backend).timeout_s == float(want or DEFAULT_TIMEOUT_S)
'''


def run_pytest(tmp_path: Path, test: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m pytest`` on ``test`` in ``tmp_path``; a hang is killed (with every process
    it started) after 120 s and fails the test."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_it.py").write_text(test)
    env = {"XMOE_TEST_TIMEOUT": "100", **env}
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_it.py"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        out, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"the relaunched test hung:\n{out[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out)


SHARED_JOBS = '''
import os

import pytest


def record(group, name):
    """Rank 0 notes the job (its process) each test ran in."""
    if group.rank == 0:
        with open(os.environ["JOBS_FILE"], "a") as f:
            f.write(f"{name} {os.getpid()}\\n")


@pytest.mark.mpi(ranks=2)
def test_a(group):
    record(group, "a")


@pytest.mark.mpi(ranks=2)
def test_b_fails_on_rank_1(group):
    record(group, "b")
    assert group.rank == 0, "rank 1 fails"


@pytest.mark.mpi(ranks=2, alone=True)
def test_c_alone(group):
    record(group, "c")


@pytest.mark.mpi(ranks=2)
def test_d(group):
    record(group, "d")


@pytest.mark.mpi(ranks=2)
def test_e_hangs(group):
    if os.environ.get("HANG"):
        import time

        time.sleep(600)


@pytest.mark.mpi(ranks=2)
def test_f(group):
    record(group, "f")
'''


def jobs_of(path: Path) -> dict[str, str]:
    return dict(line.split() for line in path.read_text().splitlines())


def test_multi_rank_tests_share_jobs(tmp_path):
    """One job runs a test and the later ones of its rank count; a failure ends that job and
    the next job picks up after it; an ``alone`` test gets a job of its own."""
    env = dict(os.environ, JOBS_FILE=str(tmp_path / "jobs"))
    env.pop("XMOE_TEST_BATCH", None)
    done = run_pytest(tmp_path, SHARED_JOBS, env)
    assert done.returncode == 1, done.stdout
    assert "1 failed, 5 passed" in done.stdout, done.stdout
    assert "rank 1 fails" in done.stdout
    jobs = jobs_of(tmp_path / "jobs")
    assert jobs["a"] == jobs["b"]  # one job until b's failure ended it
    assert jobs["d"] == jobs["f"] != jobs["a"]  # the next job: the rest, but for c
    assert jobs["c"] not in (jobs["a"], jobs["d"])


def test_a_hung_test_is_reported_and_the_rest_still_run(tmp_path):
    env = dict(os.environ, JOBS_FILE=str(tmp_path / "jobs"), HANG="1", XMOE_TEST_TIMEOUT="15")
    env.pop("XMOE_TEST_BATCH", None)
    done = run_pytest(tmp_path, SHARED_JOBS, env)
    assert "2 failed, 4 passed" in done.stdout, done.stdout
    assert "test_e_hangs - Failed: 2 ranks did not finish in 15 s" in done.stdout, done.stdout
    jobs = jobs_of(tmp_path / "jobs")
    assert jobs["f"] != jobs["d"]  # f ran in a job after the hung one was killed


@pytest.mark.sim  # five jobs: on a GPU machine each starts NVSHMEM (tens of seconds); the logic is the launcher's alike
def test_each_test_its_own_job_with_batching_off(tmp_path):
    env = dict(os.environ, JOBS_FILE=str(tmp_path / "jobs"), XMOE_TEST_BATCH="0")
    run_pytest(tmp_path, SHARED_JOBS, env)
    jobs = jobs_of(tmp_path / "jobs")
    assert len(set(jobs.values())) == len(jobs) == 5


def test_a_failing_rank_ends_the_job_and_is_reported(tmp_path):
    done = run_pytest(tmp_path, RANK_1_FAILS, dict(os.environ))
    assert done.returncode == 1, done.stdout
    assert "on 2 ranks: rank 1 failed, 1 ended without an outcome" in done.stdout
    report = done.stdout[done.stdout.index("---- rank 1 failed ----"):]
    assert "E   AssertionError: rank 1 fails at once" in report
    assert "rank 1 was here" in report  # the rank's captured output
    assert "did not finish" not in done.stdout


@pytest.mark.parametrize("caller", [None, "7"])
def test_simulator_ranks_get_a_generous_peer_timeout_unless_the_caller_set_one(tmp_path, caller):
    env = {k: v for k, v in os.environ.items() if k != "XMOE_TIMEOUT_S"}
    if caller is not None:
        env["XMOE_TIMEOUT_S"] = caller
    default = str(SIM_PEER_TIMEOUT_S) if runtime.default_backend() == "sim" else ""  # the GPU keeps the library's
    env["WANT_TIMEOUT_S"] = caller or default
    done = run_pytest(tmp_path, PEER_TIMEOUT, env)
    assert done.returncode == 0, done.stdout
