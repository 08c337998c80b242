"""Shared pytest setup for the nswrap test suite.

- Tests under ``tests/system/`` get the ``system`` marker automatically.
  System tests need root, ``ip``, ``nft``, ``unbound``, ``dig`` and the
  ability to create network namespaces; when that is missing they are
  skipped, or failed when the ``CI`` environment variable is ``true``/``1``.
- Under CI any skipped test makes the session fail (a skip there means
  something that should have been tested was not).
- The ``lab`` fixture provides a :class:`tests.lab.Lab` and checks that the
  host namespace state is unchanged when the test is done, and that nswrap
  keeps no record of an instance for it. It is parametrized over nswrap's
  datapaths: every test that uses it runs once with ``--datapath nft`` and
  once with ``--datapath bpf`` (``NSWRAP_DATAPATH``, which nswrap reads like
  the option; a test's own ``--datapath`` wins). A test about what only one
  datapath has is marked ``nft_only(reason)`` or ``bpf_only(reason)``: its
  other variant is deselected, not skipped.
"""

from __future__ import annotations

import functools
import os
import pathlib
import shutil

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


DATAPATHS = ("nft", "bpf")
ONLY = {"nft_only": "nft", "bpf_only": "bpf"}


def datapath_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("lab") if callspec is not None else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, deselected = [], []
    for item in items:
        if SYSTEM_DIR in item.path.parents:
            item.add_marker(pytest.mark.system)
        datapath = datapath_of(item)
        only = [ONLY[m.name] for m in item.iter_markers() if m.name in ONLY]
        for marker in item.iter_markers():
            if marker.name in ONLY and not marker.args:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{marker.name} needs its reason")
        (deselected if datapath is not None and only and datapath not in only else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


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


def nswrap_state_dir(cookie: int) -> pathlib.Path:
    """nswrap's state directory for the network namespace with this cookie."""
    return pathlib.Path(f"/run/nswrap/c{cookie}")


def nswrap_state_left(cookie: int) -> list[str]:
    """Records nswrap still keeps for a namespace: the files in its state directory but for the
    directory's own `netns` and `lock`."""
    try:
        return sorted(name for name in os.listdir(nswrap_state_dir(cookie)) if name not in ("netns", "lock"))
    except FileNotFoundError:
        return []


@pytest.fixture(params=DATAPATHS)
def lab(request):
    """A fresh :class:`Lab`, nswrap's datapath set for the test (the parameter); fails the test if
    the host state was not restored.

    At teardown tracked processes still running are stopped first, then the
    host namespace state is compared with the one recorded at the start, and
    nswrap's state for the namespace must hold no record. The namespaces are
    always deleted, and nswrap's state directory for the host namespace with
    them (read-only commands leave an empty one: a known nswrap bug, tested by
    test_nswrap.py::test_no_state_directory_is_left_for_the_namespace).
    """
    require_system()
    saved = os.environ.get("NSWRAP_DATAPATH")
    os.environ["NSWRAP_DATAPATH"] = request.param
    lab = Lab()
    cookie = None
    try:
        cookie = lab.netns_cookie(lab.host)
        before = lab.state()
        yield lab
        lab.stop_all()
        changes = diff_states(before, lab.state())
        assert not changes, f"host namespace state not restored:\n{changes}"
        assert not nswrap_state_left(cookie), f"nswrap's state left behind: {nswrap_state_left(cookie)}"
    finally:
        lab.close()
        if cookie is not None:
            shutil.rmtree(nswrap_state_dir(cookie), ignore_errors=True)
        if saved is None:
            os.environ.pop("NSWRAP_DATAPATH", None)
        else:
            os.environ["NSWRAP_DATAPATH"] = saved
