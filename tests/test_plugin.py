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
    env = dict(env, XMOE_TEST_TIMEOUT="100")
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
