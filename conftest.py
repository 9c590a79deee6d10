"""This repository's own pytest setup.

align's pytest plugin (align/pytest_plugin.py: options, markers, the cases/ fixtures) is
registered once, by the `pytest11` entry point of the installed package, never from here.
"""

from __future__ import annotations

import os

import pytest
import torch

from align import pytest_plugin


def pytest_configure(config: pytest.Config) -> None:
    """Stop with the fix when the plugin is missing (cases/ needs it), unless turned off."""
    plugins = config.pluginmanager
    if not plugins.is_registered(pytest_plugin) and not plugins.is_blocked("align"):
        raise pytest.UsageError(
            "align's pytest plugin is not loaded: install this checkout (pip install -e .), "
            "or with PYTEST_DISABLE_PLUGIN_AUTOLOAD set pass -p align.pytest_plugin"
        )
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # under pytest-xdist -n: each worker its share of the cores, not all
        threads = max(1, torch.get_num_threads() // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # and the processes its tests start


@pytest.fixture(scope="module")
def one_thread():
    """CPU reductions depend on the thread count: pin it, so verdicts are reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
