"""vmlab's pytest plugin: the `vm` marker, `--run-vm-tests`, and the `vmlab_env` fixture.

Tests that boot VMs are marked ``@pytest.mark.vm`` and are skipped unless pytest runs with
``--run-vm-tests`` (they need QEMU and take seconds each). `vmlab_env` gives each test a
fresh `Env` named after it and closes it afterwards; when the test failed, the Env's work
directory (consoles, QEMU logs) is kept and its path printed.
"""
from __future__ import annotations

import pytest

from .env import Env


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vmlab")
    group.addoption("--run-vm-tests", action="store_true", default=False,
                    help="run tests marked 'vm', which boot real VMs under QEMU")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots real VMs (skipped unless --run-vm-tests)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-vm-tests"):
        return
    skip = pytest.mark.skip(reason="boots VMs; run with --run-vm-tests")
    for item in items:
        if "vm" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    setattr(item, f"_vmlab_report_{report.when}", report)
    return report


@pytest.fixture
def vmlab_env(request: pytest.FixtureRequest):
    """A fresh Env for this test; closed afterwards, its files kept if the test failed."""
    env = Env(name=request.node.name)
    try:
        yield env
    finally:
        report = getattr(request.node, "_vmlab_report_call", None)
        if report is not None and report.failed and env.work_dir is not None:
            env.keep_work_dir = True
            print(f"\nvmlab: kept {env.work_dir} (consoles and logs of the failed test)")
        env.close()
