"""Shared pytest setup for the nswrap test suite.

- Tests under ``tests/system/`` get the ``system`` marker automatically.
  System tests need root, ``ip``, ``nft``, ``unbound``, ``dig`` and the
  ability to create network namespaces; when that is missing they are
  skipped, or failed when the ``CI`` environment variable is ``true``/``1``.
- Under CI any skipped test makes the session fail (a skip there means
  something that should have been tested was not).
- The ``lab`` fixture provides a :class:`tests.lab.Lab` and checks that the
  host namespace state is unchanged when the test is done.
"""

from __future__ import annotations

import functools
import os
import pathlib

import pytest

from tests.lab import Lab, diff_states, missing_requirements

SYSTEM_DIR = pathlib.Path(__file__).parent / "system"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


@functools.cache
def _system_unavailable() -> str | None:
    reason = missing_requirements()
    return f"system tests cannot run: {reason}" if reason else None


def require_system() -> None:
    """Skip (or under CI fail) the current test unless system tests can run."""
    reason = _system_unavailable()
    if reason:
        if in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SYSTEM_DIR in item.path.parents:
            item.add_marker(pytest.mark.system)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("system"):
        require_system()


_skipped: set[str] = set()  # node ids of skipped tests and collectors


def _note_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.add(report.nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if in_ci() and _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if in_ci() and _skipped:
        terminalreporter.write_line(
            f"CI: failing the session because {len(_skipped)} test(s) were skipped",
            red=True,
        )


@pytest.fixture
def lab():
    """A fresh :class:`Lab`; fails the test if the host state was not restored.

    At teardown tracked processes still running are stopped first, then the
    host namespace state is compared with the one recorded at the start, and
    the namespaces are always deleted.
    """
    require_system()
    lab = Lab()
    try:
        before = lab.state()
        yield lab
        lab.stop_all()
        changes = diff_states(before, lab.state())
        assert not changes, f"host namespace state not restored:\n{changes}"
    finally:
        lab.close()
