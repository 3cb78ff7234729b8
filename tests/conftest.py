"""Shared test set-up: ``tests/`` on the path, and the xdist groups that keep Ray sessions apart.

The suite runs on two workers (``-n 2 --dist loadgroup`` in pyproject.toml). A module that starts
Ray (in the test process or in a subprocess it runs) goes to one of two groups, each run in order
on one worker, so that at most two Ray sessions run at once and a module's Ray fixture is started
once; every other test goes to whichever worker is free.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Two groups of about equal length (measured: ~8 minutes each on 2 cores).
RAY_GROUPS = {
    "ray-services": (
        "test_service.py",
        "test_service_nodes.py",
        "test_sweep_example.py",
        "test_faults.py",
        "test_driver_scale_bench.py",
    ),
    "ray-tune": (
        "test_tune_sweep.py",
        "test_tune_searcher.py",
        "test_tune_pbt.py",
        "test_tune_cluster.py",
        "test_tune_space.py",
        "test_tune_schedulers.py",
        "test_mlflow_tune.py",
        "test_bad_input.py",
        "test_gpu_suite.py",
    ),
}
_GROUP_OF = {name: group for group, names in RAY_GROUPS.items() for name in names}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks to name the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = _GROUP_OF.get(item.path.name)
        if group is None and "tune_integration" in item.path.parts:
            group = "ray-tune"  # its doctests
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
