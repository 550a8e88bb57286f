"""vmlab's pytest plugin: the `vm` marker, `--run-vm-tests`, and the `vmlab_env` fixture.

Tests that boot VMs are marked ``@pytest.mark.vm`` and are skipped unless pytest runs with
``--run-vm-tests`` (they need QEMU and take seconds each). `vmlab_env` gives each test a
fresh `Env` named after it and closes it afterwards; when the test failed, the Env's work
directory (consoles, QEMU logs) is kept and its path printed.

``--vmlab-web[=ADDR]`` serves each such Env's live dashboard (default 127.0.0.1 and a port
derived from the test's name) and prints its URL; the test's outcome is published on it at
teardown. ``--vmlab-web-keep`` keeps the page up after the test until Ctrl-C. Fixtures that
build their own Env get the same with ``Env(..., **web_options(request.config, say))``.
"""
from __future__ import annotations

import logging
from typing import Callable

import pytest

from .env import Env


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vmlab")
    group.addoption("--run-vm-tests", action="store_true", default=False,
                    help="run tests marked 'vm', which boot real VMs under QEMU")
    group.addoption("--vmlab-web", nargs="?", const="", default=None, metavar="ADDR",
                    help="serve a live dashboard of each test's VMs at ADDR (HOST:PORT; "
                         "default 127.0.0.1 and a port derived from the test name)")
    group.addoption("--vmlab-web-keep", action="store_true", default=False,
                    help="keep the dashboard up after the test until Ctrl-C")


def web_options(config: pytest.Config, say: Callable[[str], None] | None = None) -> dict:
    """Env keyword arguments for the --vmlab-web options (empty when not given)."""
    addr = config.getoption("--vmlab-web", None)
    if addr is None:
        return {}
    return {"web": addr, "web_keep": bool(config.getoption("--vmlab-web-keep", False)),
            "progress": _progress_printer(config, say)}


def _progress_printer(config: pytest.Config, say: Callable[[str], None] | None):
    """Log every progress line; show the dashboard's own lines on the terminal even while
    pytest captures output (the URL must be visible while the test runs)."""
    log = logging.getLogger("vmlab.env")
    capman = config.pluginmanager.getplugin("capturemanager")

    def progress(msg: str) -> None:
        (say or log.info)(msg)
        if msg.startswith("dashboard") and capman is not None:
            with capman.global_and_fixture_disabled():
                print(f"\nvmlab {msg}", flush=True)
    return progress


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
    env = Env(name=request.node.name, **web_options(request.config))
    try:
        yield env
    finally:
        report = getattr(request.node, "_vmlab_report_call", None)
        if report is not None:
            env.dashboard.test_status("failed" if report.failed else "passed",
                                      f"{'Failed' if report.failed else 'Passed'} in "
                                      f"{report.duration:.1f} s")
        if report is not None and report.failed and env.work_dir is not None:
            env.keep_work_dir = True
            print(f"\nvmlab: kept {env.work_dir} (consoles and logs of the failed test)")
        env.close()
