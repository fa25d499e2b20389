"""Every test process runs xmoe's kernels on the backend chosen once, before Numba loads,
with outputs poisoned before each kernel (XMOE_POISON) so an unwritten element shows.
The xmoe pytest plugin is registered here too when xmoe is not pip-installed (PYTHONPATH)."""

import os

import pytest

import xmoe.runtime
import xmoe.testing.plugin

#: DeepEP's own tests, run by tests/deepep/run.py under torchrun, not by pytest.
collect_ignore = ["deepep"]

os.environ.setdefault("XMOE_POISON", "1")
xmoe.runtime.select_backend(None)


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.is_registered(xmoe.testing.plugin):
        config.pluginmanager.register(xmoe.testing.plugin, "xmoe")
